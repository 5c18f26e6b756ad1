"""The text format (SPEC §1-3): box codec, formatter and parser, tags, language, prompts."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medrega.grammar import (
    GRID,
    IMAGE,
    base_prompt,
    box_bodies,
    count_images,
    detect_lang,
    expand_image,
    forbidden_tokens,
    ref_names,
    strip_regions,
    tags_balanced,
    user_text,
    with_image,
    without_image,
    decode_box,
    encode_box,
    format_box,
    format_region,
    format_regions,
    parse_regions,
)


# --- codec ------------------------------------------------------------------------------

def test_grid_is_999():
    assert GRID == 999


def test_encode_full_image_is_0_to_999():
    assert encode_box([0, 0, 512, 512], 512, 512) == [0, 0, 999, 999]


def test_encode_hand_computed():
    # 100/1000*999 = 99.9 -> 100; 50/500*999 = 99.9 -> 100;
    # 300/1000*999 = 299.7 -> 300; 400/500*999 = 799.2 -> 799
    assert encode_box([100, 50, 300, 400], 1000, 500) == [100, 100, 300, 799]


def test_encode_clamps_outside_image():
    # x2 = 600/512*999 = 1170.7 -> clamped to 999; x1 = -5 -> clamped to 0; 10/512*999 = 19.5 -> 20
    assert encode_box([-5, 0, 600, 10], 512, 512) == [0, 0, 999, 20]


def test_encode_rejects_empty_image():
    with pytest.raises(ValueError):
        encode_box([0, 0, 1, 1], 0, 10)


def test_decode_hand_computed():
    # 100/999*1000 = 100.1001..., 100/999*500 = 50.05005..., 999 -> full size
    assert decode_box([100, 100, 999, 999], 1000, 500) == pytest.approx([100.1001001, 50.05005005, 1000, 500])


@settings(max_examples=300)
@given(
    w=st.integers(1, 6000),
    h=st.integers(1, 6000),
    fx=st.lists(st.floats(0, 1), min_size=2, max_size=2),
    fy=st.lists(st.floats(0, 1), min_size=2, max_size=2),
)
def test_encode_decode_round_trip_within_one_cell(w, h, fx, fy):
    box = [min(fx) * w, min(fy) * h, max(fx) * w, max(fy) * h]
    grid = encode_box(box, w, h)
    assert all(0 <= v <= GRID for v in grid)
    back = decode_box(grid, w, h)
    cell_x, cell_y = w / GRID, h / GRID
    for got, want, cell in zip(back, box, (cell_x, cell_y, cell_x, cell_y)):
        assert abs(got - want) <= cell + 1e-9


# --- formatting ---------------------------------------------------------------------------

def test_format_box_separators():
    assert format_box([[1, 2, 3, 4], [5, 6, 7, 8]]) == "<box>[[1, 2, 3, 4], [5, 6, 7, 8]]</box>"


def test_format_regions_matches_spec_example():
    text = format_regions([("right lung", [[196, 106, 525, 690]]), ("left lung", [[584, 90, 949, 739]])])
    assert text == (
        "<ref>right lung</ref><box>[[196, 106, 525, 690]]</box>, "
        "<ref>left lung</ref><box>[[584, 90, 949, 739]]</box>"
    )
    assert format_region("胰腺癌", [[661, 528, 743, 599]]) == "<ref>胰腺癌</ref><box>[[661, 528, 743, 599]]</box>"


# --- parsing ------------------------------------------------------------------------------

def test_parse_spec_grounded_report_english():
    r = parse_regions(
        "<ref>right lung</ref><box>[[196, 106, 525, 690]]</box>, "
        "<ref>left lung</ref><box>[[584, 90, 949, 739]]</box>: The lungs are clear."
    )
    assert r.ok
    assert r.regions == [("right lung", [196, 106, 525, 690]), ("left lung", [584, 90, 949, 739])]
    assert r.text == "The lungs are clear."


def test_parse_spec_grounded_report_chinese():
    r = parse_regions("<ref>胰腺癌</ref><box>[[661, 528, 743, 599]]</box>：胰尾部见低密度影")
    assert r.ok
    assert r.regions == [("胰腺癌", [661, 528, 743, 599])]
    assert r.text == "胰尾部见低密度影"


def test_parse_without_description_has_no_text():
    assert parse_regions("<ref>liver</ref><box>[[1, 2, 3, 4]]</box>").text is None


def test_parse_several_boxes_one_object():
    r = parse_regions("<ref>left lung</ref><box>[[1, 2, 30, 40], [50, 60, 70, 80]]</box>")
    assert r.ok
    assert r.regions == [("left lung", [1, 2, 30, 40]), ("left lung", [50, 60, 70, 80])]


def test_parse_box_without_ref_is_unnamed_and_ref_binds_once():
    r = parse_regions("<box>[[1, 2, 3, 4]]</box> and <ref>liver</ref><box>[[5,6,7,8]]</box>, <box>[[9, 9, 10, 10]]</box>")
    assert r.ok
    assert r.regions == [(None, [1, 2, 3, 4]), ("liver", [5, 6, 7, 8]), (None, [9, 9, 10, 10])]


def test_parse_single_bracket_box_is_accepted():
    r = parse_regions("<ref>heart</ref><box>[10, 20, 30, 40]</box>")
    assert r.ok and r.regions == [("heart", [10, 20, 30, 40])]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "left kidney",
        "<ref>liver</ref>",
        "<box>[[0, 0, 0, 0]]</box>",  # zero area: the released evaluator's fake miss box
        "<box>[[10, 10, 5, 20]]</box>",  # x1 >= x2
        "<box>[[10, 20, 30, 20]]</box>",  # y1 >= y2
        "<box>[[10, 20, 30, 1000]]</box>",  # out of the 0-999 grid
        "<box>[[-1, 20, 30, 40]]</box>",
        "<box>[[10, 20, 30]]</box>",  # three numbers
        "<box>[[10.5, 20, 30, 40]]</box>",  # not integers
        "<box>[[10, 20, 30, 40]</box>",  # unbalanced brackets
        "<box>hello</box>",
        "<box>[[10, 20, 30, 40]]",  # unclosed
        "<box>[[1, 2, 3, " + "9" * 5000 + "]]</box>",  # beyond int() digit limit
    ],
)
def test_parse_failures_are_not_ok(text):
    r = parse_regions(text)
    assert not r.ok
    assert r.regions == []


def test_invalid_box_is_dropped_and_marks_malformed():
    r = parse_regions("<ref>liver</ref><box>[[10, 10, 50, 50], [60, 60, 40, 80]]</box>")
    assert not r.ok
    assert r.regions == [("liver", [10, 10, 50, 50])]
    assert r.n_invalid == 1


def test_unclosed_box_after_valid_one_marks_malformed():
    r = parse_regions("<ref>a</ref><box>[[1, 2, 3, 4]]</box>, <ref>b</ref><box>[[5, 6")
    assert not r.ok
    assert r.regions == [("a", [1, 2, 3, 4])]
    assert r.n_invalid == 1


def test_parse_non_string_input():
    assert not parse_regions(None).ok
    assert not parse_regions(123).ok


def test_spec_examples_read_back():
    q = "<image>\nWhat is <ref>this</ref><box>[[421, 351, 505, 470]]</box> in this CT scan?"
    assert parse_regions(q).boxes == [[421, 351, 505, 470]] and ref_names(q) == ["this"]
    assert parse_regions("What can be visualized in the <box>[[214, 437, 392, 619]]</box> of this scan?").boxes == [
        [214, 437, 392, 619]]
    assert parse_regions("no box here").boxes == [] and ref_names("no box here") == []
    ask = "Could you specify the corner points for a bounding box surrounding <ref>heart myocardium</ref> <ref>right ventricle</ref>?"
    assert ref_names(ask) == ["heart myocardium", "right ventricle"]


def test_tags_balanced_and_box_bodies():
    assert tags_balanced("<ref>a</ref><box>[[1, 2, 3, 4]]</box>") and tags_balanced("plain")
    assert not tags_balanced("<ref>a<box>[[1, 2, 3, 4]]</box></ref>")   # nested
    assert not tags_balanced("<ref>a</ref><box>[[1, 2, 3, 4]]")         # unclosed
    assert not tags_balanced("</box>")
    assert box_bodies("<box>[[1, 2, 3, 4]]</box> and <box>[[5, 6, 7, 8], [9, 9, 10, 10]]</box>") == [
        "[[1, 2, 3, 4]]", "[[5, 6, 7, 8], [9, 9, 10, 10]]"]
    assert strip_regions("<ref>liver</ref><box>[[1, 2, 3, 4]]</box>: normal size.") == "normal size."


def test_one_definition_of_chinese():
    assert detect_lang("左肾") == "zh" and detect_lang("left kidney") == "en" and detect_lang("") == "en"
    assert detect_lang("CT 图像") == "zh"
    assert detect_lang("\u3400") == "zh"  # extension A counts (the metrics once used a narrower range)


def test_image_placeholder_round_trip():
    record_turn = with_image("Where is the <ref>liver</ref>?")
    assert record_turn.startswith(IMAGE + "\n") and count_images(record_turn) == 1
    assert without_image(record_turn) == "Where is the <ref>liver</ref>?"
    assert user_text(record_turn, "BASE") == IMAGE + "\nBASE Where is the <ref>liver</ref>?"
    assert expand_image(user_text(record_turn, None), 3) == (
        "<img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>\nWhere is the <ref>liver</ref>?")


def test_every_task_has_a_base_prompt_in_both_languages():
    for task in ("caption", "r2t", "t2r", "grounded", "vqa", "report", "cls"):
        assert base_prompt(task, "en") and base_prompt(task, "zh")
        assert detect_lang(base_prompt(task, "zh")) == "zh"
    assert base_prompt("nope", "en") is None


def test_user_text_may_not_carry_framing_tokens():
    assert forbidden_tokens("What is <box>[[1, 2, 3, 4]]</box>? <ref>liver</ref>") == []
    assert forbidden_tokens("hi <IMG_CONTEXT>") == ["<IMG_CONTEXT>"]
    assert "<|im_end|>" in forbidden_tokens("x<|im_end|>\n<|im_start|>system")


# --- properties ---------------------------------------------------------------------------

@st.composite
def grid_boxes(draw):
    x1 = draw(st.integers(0, GRID - 1))
    y1 = draw(st.integers(0, GRID - 1))
    x2 = draw(st.integers(x1 + 1, GRID))
    y2 = draw(st.integers(y1 + 1, GRID))
    return [x1, y1, x2, y2]


names = st.text(
    alphabet=st.sampled_from(list("abcdefghijklmnopqrstuvwxyz -左右肾肺心室肝脏")), min_size=1, max_size=20
).map(str.strip).filter(bool)


@settings(max_examples=300)
@given(st.lists(st.tuples(names, st.lists(grid_boxes(), min_size=1, max_size=3)), min_size=1, max_size=4))
def test_format_then_parse_round_trip(regions):
    r = parse_regions(format_regions(regions))
    assert r.ok
    assert r.n_invalid == 0
    assert r.regions == [(name, box) for name, boxes in regions for box in boxes]


@settings(max_examples=300)
# Descriptions are prose: tag characters are excluded (a stray "<box>" there is malformed).
@given(
    st.lists(grid_boxes(), min_size=1, max_size=3),
    st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=40).map(str.strip).filter(bool),
)
def test_grounded_report_round_trip(boxes, description):
    r = parse_regions(format_region("x", boxes) + ": " + description)
    assert r.ok and r.text == description.strip()


@settings(max_examples=500)
@given(st.text())
def test_parser_never_raises_on_any_text(text):
    r = parse_regions(text)
    assert isinstance(r.ok, bool)
    for name, box in r.regions:
        assert len(box) == 4 and all(0 <= v <= GRID for v in box)
        assert box[0] < box[2] and box[1] < box[3]


fragments = st.sampled_from(
    ["<ref>", "</ref>", "<box>", "</box>", "[", "]", "[[", "]]", ",", ", ", " ", "0", "12", "999", "1000", "-3",
     "4.5", "liver", "左肾", ":", "：", "\n"]
)


@settings(max_examples=500)
@given(st.lists(fragments, max_size=40).map("".join))
def test_parser_never_raises_on_tag_soup(text):
    r = parse_regions(text)
    if r.ok:
        assert r.regions and r.n_invalid == 0
    assert all(len(b) == 4 for b in r.boxes)
