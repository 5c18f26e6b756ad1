"""Record builders and templates: well-formed InternVL records, boxes, settings, ids, splits."""
import re
from collections import Counter

import pytest

from medrega.records import builders
from medrega.grammar import BASE_PROMPTS
from medrega.records.templates import PLACEHOLDER, TEMPLATES
from medrega.sources import synthetic
from medrega.sources.samed2d import iter_samples, mask_boxes
from medrega.vocab import BY_KEY, canonical
from medrega.grammar import decode_box, parse_regions

R2T_EN = ("You are a helpful medical assistant. Your task is object recognition. You are required to "
          "recognize the object in the given region. The region is represented in the form of bounding "
          "box, [x1, y1, x2, y2], with integers ranging from 0 to 999. These values correspond to the top "
          "left x, top left y, bottom right x, and bottom right y.")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec") / "d"
    synthetic.generate(root, patients_per_modality=3, slices_per_patient=2, image_size=64, seed=1)
    samples = list(iter_samples(root))
    out = []
    for s in samples:
        regions = builders.region_boxes(s)
        out.append((s, regions, builders.build_records(s, regions, "train")))
    return out


def _all(built):
    return [r for _, _, recs in built for r in recs]


def test_templates_enough_and_well_formed():
    for task, by_lang in TEMPLATES.items():
        assert set(by_lang) == {"en", "zh"}
        for lang, templates in by_lang.items():
            assert len(templates) >= 20 and len(set(templates)) == len(templates), (task, lang)
            for t in templates:
                if PLACEHOLDER[task]:
                    assert t.count(PLACEHOLDER[task]) == 1, t
                assert "<image>" not in t
                if lang == "zh":
                    assert re.search(r"[\u4e00-\u9fff]", t), t
                t.format(region="R", objects="O", modality="M")  # no stray placeholders


def test_base_prompts():
    assert BASE_PROMPTS["r2t"]["en"] == R2T_EN
    assert BASE_PROMPTS["t2r"]["en"].startswith("You are a helpful medical assistant.")
    for task in ("r2t", "t2r"):
        assert "0到999" in BASE_PROMPTS[task]["zh"] and "0 to 999" in BASE_PROMPTS[task]["en"]
    assert "<ref>" in BASE_PROMPTS["t2r"]["en"] and "<ref>" in BASE_PROMPTS["t2r"]["zh"]


def test_record_shape(built):
    for s, _, recs in built:
        for r in recs:
            assert set(r) == {"id", "image", "width", "height", "conversations", "task", "lang",
                              "setting", "modality", "dataset", "split"}
            assert r["image"] == s.rel_image and (r["width"], r["height"]) == (s.width, s.height)
            human, gpt = r["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in r["conversations"]) == 1
            assert gpt["value"].strip()
            assert (r["setting"] is None) == (r["task"] != "t2r")


def test_ids_unique_and_stable(built):
    ids = [r["id"] for r in _all(built)]
    assert len(ids) == len(set(ids)) and all(isinstance(i, str) and i != "-1" for i in ids)
    s, regions, recs = built[0]
    again = builders.build_records(s, regions, "train")
    assert again == recs


def test_both_languages_every_task(built):
    seen = Counter((r["task"], r["lang"]) for r in _all(built))
    for task in builders.TASKS:
        for lang in builders.LANGS:
            assert seen[task, lang] > 0
    settings = Counter((r["lang"], r["setting"]) for r in _all(built) if r["task"] == "t2r")
    for lang in builders.LANGS:
        for setting in builders.SETTINGS:
            assert settings[lang, setting] > 0, (lang, setting)


def _pixel_boxes(sample, label):
    return [b for r in sample.regions if r.label == label for b in mask_boxes(r.mask)]


def _near(grid_box, pixel_boxes, w, h):
    """The decoded grid box lies within a pixel of one of the mask's component boxes."""
    d = decode_box(grid_box, w, h)
    return any(max(abs(a - b) for a, b in zip(d, p)) <= 1.0 for p in pixel_boxes)


def test_r2t_box_in_question_and_name_in_answer(built):
    n = 0
    for s, _, recs in built:
        for r in (r for r in recs if r["task"] == "r2t"):
            q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
            parsed = parse_regions(q)
            assert parsed.ok and len(parsed.boxes) == 1, q
            key = canonical(a)
            assert key is not None and BY_KEY[key].name(r["lang"]) == a
            (box,) = parsed.boxes
            assert all(0 <= v <= 999 for v in box) and box[0] < box[2] and box[1] < box[3]
            assert _near(box, _pixel_boxes(s, key), s.width, s.height), (q, a)
            n += 1
    assert n > 0


def test_t2r_answers_follow_setting(built):
    for s, _, recs in built:
        for r in (r for r in recs if r["task"] == "t2r"):
            q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
            asked = re.findall(r"<ref>(.*?)</ref>", q)
            parsed = parse_regions(a)
            assert parsed.ok, a
            per_name = Counter(name for name, _ in parsed.regions)
            assert list(per_name) == asked  # same objects, same order
            sizes = list(per_name.values())
            expected = {"SS": len(sizes) == 1 and sizes == [1],
                        "SM": len(sizes) == 1 and sizes[0] >= 2,
                        "MS": len(sizes) >= 2 and set(sizes) == {1},
                        "MM": len(sizes) >= 2 and max(sizes) >= 2}[r["setting"]]
            assert expected, (r["setting"], a)
            for name, box in parsed.regions:
                key = canonical(name)
                assert BY_KEY[key].name(r["lang"]) == name
                assert _near(box, _pixel_boxes(s, key), s.width, s.height), (name, box)
            # every component of an asked structure is in the answer
            for name, count in per_name.items():
                assert count == len(_pixel_boxes(s, canonical(name)))


def test_caption_lists_structures(built):
    for s, regions, recs in built:
        for r in (r for r in recs if r["task"] == "caption"):
            a = r["conversations"][1]["value"]
            for label, _ in regions:
                assert BY_KEY[label].name(r["lang"]) in a
            if r["lang"] == "zh":
                assert "图像" in a
            else:
                assert " image" in a


def test_template_choice_varies(built):
    questions = {r["conversations"][0]["value"].split("<box>")[0] for r in _all(built) if r["task"] == "r2t"}
    assert len(questions) > 5


def test_split_by_patient():
    assert builders.split_of("A", "p1", 0.3) == builders.split_of("A", "p1", 0.3)
    patients = [("DS", f"patient{i:04d}") for i in range(2000)]
    share = sum(builders.split_of(d, p, 0.2) == "test" for d, p in patients) / len(patients)
    assert 0.17 < share < 0.23
    assert {builders.split_of(d, p, 0.0) for d, p in patients} == {"train"}
    assert {builders.split_of(d, p, 1.0) for d, p in patients} == {"test"}
    # Growing the share only moves patients from train to test, never back.
    for d, p in patients[:200]:
        if builders.split_of(d, p, 0.2) == "test":
            assert builders.split_of(d, p, 0.5) == "test"


def test_unknown_setting_rejected(built):
    s, regions, _ = built[0]
    with pytest.raises(ValueError, match="XX"):
        builders.build_records(s, regions, "train", tasks=("t2r",), settings=("XX",))
