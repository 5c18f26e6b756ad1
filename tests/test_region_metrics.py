"""Region-Aligned Evaluation (SPEC §6, Algorithm 1), every expected value computed by hand."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medrega.metrics.region import iou, read_answers, score_sample
from medrega.metrics.scoring import score_answers


def score_t2r(items, **options):
    """The Text-to-Region block of what the evaluate stage and `medrega score` compute."""
    return score_answers(items, "t2r", **options)["t2r"]
from medrega.vocab import names_match_lenient
from medrega.grammar import format_region, format_regions

# --- IoU ----------------------------------------------------------------------------------


def test_iou_hand_computed():
    # overlap 5x5 = 25; union 100 + 100 - 25 = 175
    assert iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [0, 0, 5, 10]) == 0.5  # contained half
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges
    assert iou([0, 0, 10, 10], [50, 50, 60, 60]) == 0.0
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0  # degenerate: no union, no crash


def test_iou_works_on_pixel_floats():
    assert iou([0.0, 0.0, 2.5, 2.0], [1.25, 0.0, 2.5, 2.0]) == pytest.approx(0.5)


# --- one sample -----------------------------------------------------------------------------


def test_two_predictions_three_ground_truths():
    # GT: A liver [0,0,100,100], B spleen [200,0,300,100], C left kidney [0,200,100,300]
    # P1 liver [0,0,100,50]: IoU with A = 5000/10000 = 0.5 (exactly the threshold)
    # P2 "right kidney" [200,0,300,100]: IoU with B = 1.0, name wrong
    # Matching: P1-A, P2-B (K = min(2, 3) = 2); C unmatched.
    # object hits 1: P = 1/2, R = 1/3, F1 = 2*(1/2)(1/3)/(5/6) = 0.4
    # region hits 2 (0.5 >= 0.5 and 1.0): P = 1, R = 2/3, F1 = 2*(2/3)/(5/3) = 0.8
    # align hits 1 (P1-A): same as object
    # IoU = (0.5 + 1.0) / 3 = 0.5; best matched IoU = 1.0
    gt = [("liver", [0, 0, 100, 100]), ("spleen", [200, 0, 300, 100]), ("left kidney", [0, 200, 100, 300])]
    pred = [("liver", [0, 0, 100, 50]), ("right kidney", [200, 0, 300, 100])]
    s = score_sample(pred, gt)
    assert s["object_precision"] == pytest.approx(0.5)
    assert s["object_recall"] == pytest.approx(1 / 3)
    assert s["object_f1"] == pytest.approx(0.4)
    assert s["region_precision"] == pytest.approx(1.0)
    assert s["region_recall"] == pytest.approx(2 / 3)
    assert s["region_f1"] == pytest.approx(0.8)
    assert (s["align_precision"], s["align_recall"], s["align_f1"]) == pytest.approx((0.5, 1 / 3, 0.4))
    assert s["iou"] == pytest.approx(0.5)
    assert s["best_iou"] == pytest.approx(1.0)


def test_hungarian_beats_greedy():
    # Boxes share y 0..10, so IoU is the 1-D interval IoU.
    # g1 [0,100], g2 [10,110]; p1 [3,103], p2 [0,80]
    # p1-g1 97/103 = .942  p1-g2 93/107 = .869  p2-g1 80/100 = .8  p2-g2 70/110 = .636
    # Greedy takes p1-g1 first (total .942 + .636 = 1.578, no names match);
    # the IoU-maximising assignment is p1-g2 + p2-g1 = 1.669, and both names match there.
    gt = [("liver", [0, 0, 100, 10]), ("spleen", [10, 0, 110, 10])]
    pred = [("spleen", [3, 0, 103, 10]), ("liver", [0, 0, 80, 10])]
    s = score_sample(pred, gt)
    assert s["object_f1"] == 1.0
    assert s["iou"] == pytest.approx((93 / 107 + 0.8) / 2)
    assert s["region_f1"] == 1.0  # .869 and .8 both >= .5


def test_threshold_is_inclusive_at_exactly_half():
    gt = [("liver", [0, 0, 10, 10])]
    pred = [("liver", [0, 0, 5, 10])]  # IoU exactly 0.5
    assert score_sample(pred, gt)["region_f1"] == 1.0
    assert score_sample(pred, gt)["align_f1"] == 1.0
    above = score_sample(pred, gt, threshold=0.5000001)
    assert above["region_f1"] == 0.0 and above["object_f1"] == 1.0


def test_no_prediction_scores_zero():
    s = score_sample([], [("liver", [0, 0, 10, 10])])
    assert all(s[k] == 0.0 for k in ("object_f1", "region_f1", "align_f1", "iou", "best_iou", "object_recall"))


def test_unreadable_predictions_count_in_n():
    # One perfect box plus one unreadable: N = 2, so precision = 1/2, recall = 1/1.
    s = score_sample([("liver", [0, 0, 10, 10])], [("liver", [0, 0, 10, 10])], extra_predictions=1)
    assert s["region_precision"] == 0.5 and s["region_recall"] == 1.0


def test_unnamed_box_never_detects_the_object():
    s = score_sample([(None, [0, 0, 10, 10])], [("liver", [0, 0, 10, 10])])
    assert s["object_f1"] == 0.0 and s["region_f1"] == 1.0 and s["align_f1"] == 0.0


def test_chinese_name_matches_english_truth():
    s = score_sample([("左肾", [0, 0, 10, 10])], [("left kidney", [0, 0, 10, 10])])
    assert s["align_f1"] == 1.0


def test_lenient_mode_is_opt_in():
    pred, gt = [("kidney", [0, 0, 10, 10])], [("left kidney", [0, 0, 10, 10])]
    assert score_sample(pred, gt)["object_f1"] == 0.0
    assert score_sample(pred, gt, name_match=names_match_lenient)["object_f1"] == 1.0


def test_name_tie_break_on_zero_iou():
    # Neither prediction overlaps anything: all assignments have total IoU 0; the names
    # decide the pairing, so both objects are detected but no region is.
    gt = [("liver", [0, 0, 10, 10]), ("spleen", [20, 0, 30, 10])]
    pred = [("spleen", [500, 500, 510, 510]), ("liver", [600, 600, 610, 610])]
    s = score_sample(pred, gt)
    assert s["object_f1"] == 1.0 and s["region_f1"] == 0.0 and s["iou"] == 0.0


# --- whole runs: the four settings ------------------------------------------------------


def _item(pred, gt, setting, lang="en", modality="ct"):
    return {"prediction": pred, "ground_truth": gt, "width": 512, "height": 512,
            "setting": setting, "lang": lang, "modality": modality}


def test_four_settings_and_breakdown():
    items = [
        # SS: perfect. All figures 1, IoU 1.
        _item("<ref>liver</ref><box>[[100, 100, 300, 300]]</box>",
              "<ref>liver</ref><box>[[100, 100, 300, 300]]</box>", "SS"),
        # SM: one object in two regions (M = 2); one box found exactly (N = 1).
        # hits 1 for all: P = 1, R = 1/2, F1 = 2/3; IoU = 1/2.
        _item("<ref>left lung</ref><box>[[0, 0, 100, 100]]</box>",
              "<ref>left lung</ref><box>[[0, 0, 100, 100], [200, 200, 300, 300]]</box>", "SM"),
        # MS: two objects; names right, spleen box disjoint. object hits 2, region/align 1.
        # object P = R = F1 = 1; region/align P = R = F1 = 1/2; IoU = (1 + 0) / 2 = 1/2.
        _item("<ref>liver</ref><box>[[0, 0, 100, 100]]</box>, <ref>spleen</ref><box>[[800, 800, 900, 900]]</box>",
              "<ref>liver</ref><box>[[0, 0, 100, 100]]</box>, <ref>spleen</ref><box>[[400, 400, 500, 500]]</box>", "MS",
              lang="zh"),
        # MM: GT liver x2 + spleen (M = 3); prediction: liver box 1 exact, spleen half (IoU .5),
        # an extra unnamed box far away (N = 3). Matching: liver-liver1 (1), spleen-spleen (.5),
        # unnamed-liver2 (0). object hits 2, region hits 2, align hits 2:
        # P = R = F1 = 2/3 for each; IoU = 1.5 / 3 = 0.5.
        _item("<ref>liver</ref><box>[[0, 0, 100, 100]]</box>, <ref>spleen</ref><box>[[400, 400, 450, 500]]</box>, "
              "<box>[[900, 900, 950, 950]]</box>",
              "<ref>liver</ref><box>[[0, 0, 100, 100], [200, 0, 300, 100]]</box>, "
              "<ref>spleen</ref><box>[[400, 400, 500, 500]]</box>", "MM", lang="zh", modality="mr"),
    ]
    r = score_t2r(items)
    assert r["n"] == 4 and r["parse_failures"] == 0
    by = r["by"]["by_setting"]
    assert by["SS"]["align_f1"] == 1.0 and by["SS"]["mean_iou"] == 1.0
    assert by["SM"]["object_precision"] == 1.0
    assert by["SM"]["object_recall"] == pytest.approx(0.5)
    assert by["SM"]["object_f1"] == pytest.approx(2 / 3)
    assert by["SM"]["mean_iou"] == pytest.approx(0.5)
    assert by["MS"]["object_f1"] == 1.0
    assert by["MS"]["region_f1"] == pytest.approx(0.5)
    assert by["MS"]["align_recall"] == pytest.approx(0.5)
    assert by["MM"]["object_f1"] == pytest.approx(2 / 3)
    assert by["MM"]["region_precision"] == pytest.approx(2 / 3)
    assert by["MM"]["align_recall"] == pytest.approx(2 / 3)
    assert by["MM"]["mean_iou"] == pytest.approx(0.5)
    # macro averages over the four samples
    assert r["object_f1"] == pytest.approx((1 + 2 / 3 + 1 + 2 / 3) / 4)
    assert r["region_f1"] == pytest.approx((1 + 2 / 3 + 0.5 + 2 / 3) / 4)
    assert r["mean_iou"] == pytest.approx((1 + 0.5 + 0.5 + 0.5) / 4)
    assert set(r["by"]["by_lang"]) == {"en", "zh"}
    assert r["by"]["by_lang"]["zh"]["n"] == 2
    assert r["by"]["by_lang"]["zh"]["object_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert r["by"]["by_modality"]["mr"]["n"] == 1
    assert "swaps" in r["precision_recall_note"]


def test_acc_at_thresholds():
    gt = "<ref>liver</ref><box>[[0, 0, 100, 100]]</box>"
    items = [
        _item("<ref>liver</ref><box>[[0, 0, 25, 100]]</box>", gt, "SS"),  # IoU 0.25
        _item("<ref>liver</ref><box>[[0, 0, 50, 100]]</box>", gt, "SS"),  # IoU 0.50
        _item("<ref>liver</ref><box>[[0, 0, 75, 100]]</box>", gt, "SS"),  # IoU 0.75
        _item("<ref>liver</ref><box>[[0, 0, 10, 100]]</box>", gt, "SS"),  # IoU 0.10
    ]
    r = score_t2r(items)
    assert r["acc@0.25"] == pytest.approx(3 / 4)
    assert r["acc@0.5"] == pytest.approx(2 / 4)
    assert r["acc@0.75"] == pytest.approx(1 / 4)
    assert r["mean_iou"] == pytest.approx((0.25 + 0.5 + 0.75 + 0.1) / 4)


@pytest.mark.parametrize("answer", ["", None, "The liver is in the upper right.", "<box>[[0, 0, 0, 0]]</box>",
                                    "<ref>liver</ref><box>[[10, 10, 5, 5]]</box>", "<ref>liver</ref><box>[[1, 2"])
def test_unparseable_answer_is_failure_and_zero(answer):
    r = score_t2r([_item(answer, "<ref>liver</ref><box>[[0, 0, 100, 100]]</box>", "SS")])
    assert r["n"] == 1 and r["parse_failures"] == 1
    for key in ("object_precision", "object_recall", "object_f1", "region_f1", "align_f1", "mean_iou",
                "acc@0.25", "acc@0.5", "acc@0.75"):
        assert r[key] == 0.0, key


def test_failure_averages_with_successes():
    gt = "<ref>liver</ref><box>[[0, 0, 100, 100]]</box>"
    r = score_t2r([_item(gt, gt, "SS"), _item("no idea", gt, "SS")])
    assert r["parse_failures"] == 1
    assert r["align_f1"] == pytest.approx(0.5) and r["mean_iou"] == pytest.approx(0.5)


def test_partly_malformed_answer_is_a_failure_but_keeps_its_good_box():
    # One good box, one with x1 > x2: N = 2 (the bad one still counts), M = 1.
    # region hits 1: P = 1/2, R = 1, F1 = 2/3.
    gt = "<ref>liver</ref><box>[[0, 0, 100, 100]]</box>"
    r = score_t2r([_item("<ref>liver</ref><box>[[0, 0, 100, 100], [90, 0, 10, 50]]</box>", gt, "SS")])
    assert r["parse_failures"] == 1
    assert r["region_precision"] == pytest.approx(0.5)
    assert r["region_f1"] == pytest.approx(2 / 3)


def test_broken_ground_truth_raises():
    with pytest.raises(ValueError):
        score_t2r([_item("<ref>liver</ref><box>[[0, 0, 100, 100]]</box>", "liver", "SS")])
    with pytest.raises(ValueError):
        score_t2r([{"prediction": "x", "ground_truth": "<box>[[0, 0, 1, 1]]</box>"}])


def test_nothing_to_score_is_an_error():
    from medrega.errors import BadInput

    with pytest.raises(BadInput, match="no t2r answers to score among 0 record"):
        score_answers([], "t2r")


# --- answer files -------------------------------------------------------------------------


def test_read_medrega_format(tmp_path):
    path = tmp_path / "answers.jsonl"
    rows = [
        {"answer": "<ref>liver</ref><box>[[0, 0, 100, 100]]</box>",
         "gt": "<ref>liver</ref><box>[[0, 0, 100, 100]]</box>", "hw": [480, 640]},
        {"answer": "I do not know", "gt": "<ref>spleen</ref><box>[[0, 0, 50, 50]]</box>", "hw": [300, 200]},
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    items = read_answers(path, format="medrega")
    assert items[0]["height"] == 480 and items[0]["width"] == 640  # hw is height first
    assert items[1]["prediction"] == "I do not know"
    r = score_t2r(items)
    assert r["n"] == 2 and r["parse_failures"] == 1 and r["align_f1"] == pytest.approx(0.5)


def test_read_native_format(tmp_path):
    path = tmp_path / "answers.jsonl"
    row = {"question": "Where is <ref>肝脏</ref>?", "prediction": "<ref>肝脏</ref><box>[[0, 0, 10, 10]]</box>",
           "ground_truth": "<ref>肝脏</ref><box>[[0, 0, 10, 10]]</box>", "width": 10, "height": 10,
           "task": "t2r", "lang": "zh", "modality": "ct", "setting": "SS"}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n\n", encoding="utf-8")
    items = read_answers(path)
    assert items == [{**row, "_where": f"{path}:1"}]
    assert score_t2r(items)["by"]["by_lang"]["zh"]["align_f1"] == 1.0


def test_read_rejects_bad_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"answer": "x"}) + "\n")
    with pytest.raises(ValueError):
        read_answers(path, format="medrega")
    with pytest.raises(ValueError):
        read_answers(path, format="native")
    with pytest.raises(ValueError):
        read_answers(path, format="other")


# --- properties ---------------------------------------------------------------------------


@st.composite
def grid_boxes(draw):
    x1 = draw(st.integers(0, 998))
    y1 = draw(st.integers(0, 998))
    return [x1, y1, draw(st.integers(x1 + 1, 999)), draw(st.integers(y1 + 1, 999))]


regions = st.lists(st.tuples(st.sampled_from(["liver", "spleen", "heart", "左肾", "left kidney"]), grid_boxes()),
                   min_size=1, max_size=5)
METRICS = ("object_precision", "object_recall", "object_f1", "region_precision", "region_recall", "region_f1",
           "align_precision", "align_recall", "align_f1", "iou", "best_iou")


@settings(max_examples=200)
@given(a=grid_boxes(), b=grid_boxes())
def test_iou_symmetric_and_bounded(a, b):
    assert iou(a, b) == pytest.approx(iou(b, a))
    assert 0.0 <= iou(a, b) <= 1.0
    assert iou(a, a) == 1.0


@settings(max_examples=200)
@given(pred=regions, gt=regions, data=st.data())
def test_matching_invariant_to_prediction_order(pred, gt, data):
    shuffled = data.draw(st.permutations(pred))
    a, b = score_sample(pred, gt), score_sample(shuffled, gt)
    for k in METRICS:
        assert a[k] == pytest.approx(b[k]), k


@settings(max_examples=200)
@given(pred=regions, gt=regions)
def test_scores_are_bounded(pred, gt):
    s = score_sample(pred, gt)
    for k in METRICS:
        assert 0.0 <= s[k] <= 1.0 + 1e-12, k


@settings(max_examples=200)
@given(gt=regions, data=st.data())
def test_perfect_prediction_scores_one(gt, data):
    pred = data.draw(st.permutations(gt))
    s = score_sample(pred, gt)
    for k in METRICS:
        assert s[k] == pytest.approx(1.0), k
    # and through text, on every setting label
    text = format_regions([(name, [box]) for name, box in gt])
    r = score_t2r([_item(text, text, "MM")])
    assert r["parse_failures"] == 0
    for k in ("object_f1", "region_f1", "align_f1", "mean_iou", "acc@0.75"):
        assert r[k] == pytest.approx(1.0), k


@settings(max_examples=200)
@given(gt=regions, answer=st.text(alphabet=st.characters(blacklist_characters="<>[")))
def test_unparseable_answer_property(gt, answer):
    r = score_t2r([_item(answer, format_regions([(n, [b]) for n, b in gt]), "SS")])
    assert r["parse_failures"] == 1
    assert r["align_f1"] == 0.0 and r["object_f1"] == 0.0 and r["mean_iou"] == 0.0


def test_format_region_answer_against_itself():
    text = format_region("liver", [[1, 2, 3, 4]])
    assert score_t2r([_item(text, text, "SS")])["align_f1"] == 1.0
