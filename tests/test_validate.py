"""tasks.validate: a clean SA-Med2D-layout dataset passes; each kind of bad input fails the stage
with a message and a report that name the file and the rule."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from medrega.config import ValidateConfig
from tasks.validate import ValidationFailed, validate

W, H = 40, 32
DATASET = "SynthAbdomen"
CLASSES = {"liver": 1, "spleen": 2, "unicorn_gland": 7}  # id 7 is not in medrega.vocab


def _params(**overrides) -> ValidateConfig:
    return ValidateConfig(**{"max_failure_share": 0.0, "max_image_pixels": 40_000_000, "min_mask_pixels": 4,
                             **overrides})


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _mask(w: int, h: int, box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    return m


def make_dataset(root: Path, n: int = 4) -> dict[str, list[str]]:
    """`n` CT slices, each with a liver and a spleen mask, in the SA-Med2D-20M layout."""
    rng = np.random.default_rng(0)
    index: dict[str, list[str]] = {}
    for i in range(n):
        stem = f"ct_00--{DATASET}--patient{i:03d}--x_{i:04d}"
        rel_image = f"images/{stem}.png"
        _png(root / rel_image, rng.integers(0, 255, (H, W)))
        masks = []
        for label, box in (("liver", (2, 3, 15, 20)), ("spleen", (20, 5, 38, 30))):
            rel_mask = f"masks/{stem}--{CLASSES[label]:04d}_000.png"
            _png(root / rel_mask, _mask(W, H, box))
            masks.append(rel_mask)
        index[rel_image] = masks
    (root / "SAMed2D_v1.json").write_text(json.dumps(index, indent=1))
    (root / "SAMed2D_v1_class_mapping_id.json").write_text(json.dumps({DATASET: CLASSES}))
    return index


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path / "data" / "samed2d"
    return root, make_dataset(root)


def _fail(root: Path, out: Path, params: ValidateConfig | None = None) -> tuple[ValidationFailed, dict]:
    with pytest.raises(ValidationFailed) as info:
        validate(root, out, params or _params())
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False
    assert info.value.report_path == out / "report.json"
    return info.value, report


def _rules(report: dict, file: str) -> set[str]:
    return {f["rule"] for f in report["failures"] if f["file"] == file}


def test_clean_dataset_passes(dataset, tmp_path):
    root, index = dataset
    out = tmp_path / "out"
    report = validate(root, out, _params())
    assert report["passed"] is True
    assert report["failures"] == []
    assert report["n_images"] == 4 and report["n_masks"] == 8
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["passed"] is True and on_disk["n_images"] == 4
    rules = {e["rule"] for e in report["expectations"]}
    for rule in ("image decodes", "image size within limit", "modality known", "image file unique",
                 "label in vocabulary", "mask not empty", "mask same size as image", "box within image bounds"):
        assert rule in rules
    assert all(e["success"] and e["element_count"] for e in report["expectations"]), report["expectations"]
    assert (out / "data_docs" / "index.html").is_file()
    assert not list(out.glob(".report.json.*"))  # the atomic write left no temp file


def test_relative_paths_still_build_data_docs(dataset, tmp_path, monkeypatch):
    # dvc.yaml runs the stage with paths relative to the workspace
    monkeypatch.chdir(tmp_path)
    report = validate(Path("data/samed2d"), Path("out"), _params())
    assert report["passed"] is True
    assert (tmp_path / "out" / "data_docs" / "index.html").is_file(), report.get("data_docs_note")


def test_corrupt_png_fails_naming_file_and_rule(dataset, tmp_path):
    root, index = dataset
    bad = next(iter(index))
    data = (root / bad).read_bytes()
    (root / bad).write_bytes(data[: len(data) // 2])  # truncated: header fine, pixels cut off
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # even if some other module relaxed PIL globally
    try:
        exc, report = _fail(root, tmp_path / "out")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    assert f"{root / bad}: rule 'image decodes' failed" in str(exc)
    assert _rules(report, bad) == {"image decodes"}
    assert {f["file"] for f in report["failures"]} == {bad}
    assert report["n_failing_images"] == 1 and report["failure_share"] == pytest.approx(0.25)


def test_garbage_bytes_fail_to_decode(dataset, tmp_path):
    root, index = dataset
    bad = list(index)[1]
    (root / bad).write_bytes(b"not a png at all")
    exc, report = _fail(root, tmp_path / "out")
    assert "image decodes" in _rules(report, bad)
    assert "cannot identify image file" in str(exc)


def test_empty_mask_fails(dataset, tmp_path):
    root, index = dataset
    image, masks = next(iter(index.items()))
    _png(root / masks[0], np.zeros((H, W), np.uint8))
    exc, report = _fail(root, tmp_path / "out")
    assert _rules(report, masks[0]) == {"mask not empty"}
    assert f"{root / masks[0]}: rule 'mask not empty' failed" in str(exc)
    (failure,) = report["failures"]
    assert failure["image"] == image and "0 foreground pixels" in failure["detail"]


def test_tiny_mask_below_min_pixels_fails(dataset, tmp_path):
    root, index = dataset
    _, masks = next(iter(index.items()))
    _png(root / masks[1], _mask(W, H, (5, 5, 6, 7)))  # 2 pixels < min_mask_pixels 4
    _, report = _fail(root, tmp_path / "out")
    assert _rules(report, masks[1]) == {"mask not empty"}


def test_mask_larger_than_image_fails_size_and_box(dataset, tmp_path):
    root, index = dataset
    _, masks = list(index.items())[2]
    _png(root / masks[0], _mask(W + 30, H + 20, (45, 40, 60, 50)))  # structure beyond the image
    exc, report = _fail(root, tmp_path / "out")
    assert _rules(report, masks[0]) == {"mask same size as image", "box within image bounds"}
    assert "rule 'mask same size as image' failed (mask 70x52, image 40x32)" in str(exc)
    assert "box [45, 40, 60, 50] outside image 40x32" in str(exc)


def test_unknown_label_fails(dataset, tmp_path):
    root, index = dataset
    image, masks = list(index.items())[3]
    new = masks[0].replace("--0001_000", "--0007_000")  # class id 7 -> "unicorn_gland"
    (root / masks[0]).rename(root / new)
    index[image] = [new, masks[1]]
    (root / "SAMed2D_v1.json").write_text(json.dumps(index))
    exc, report = _fail(root, tmp_path / "out")
    assert _rules(report, new) == {"label in vocabulary"}
    assert "'unicorn_gland' is not in medrega.vocab" in str(exc)


def test_class_id_missing_from_mapping_fails(dataset, tmp_path):
    root, index = dataset
    image, masks = list(index.items())[0]
    new = masks[0].replace("--0001_000", "--0042_000")
    (root / masks[0]).rename(root / new)
    index[image] = [new, masks[1]]
    (root / "SAMed2D_v1.json").write_text(json.dumps(index))
    _, report = _fail(root, tmp_path / "out")
    assert _rules(report, new) == {"label in vocabulary"}
    assert "class id 0042 is not in" in report["failures"][0]["detail"]


@pytest.mark.parametrize("limit", [500, 1000])  # 40x32 = 1280 px: > 2x limit is PIL's error, > limit its warning
def test_decompression_bomb_fails_size_rule(dataset, tmp_path, limit):
    root, index = dataset
    before = Image.MAX_IMAGE_PIXELS
    exc, report = _fail(root, tmp_path / "out", _params(max_image_pixels=limit))
    assert Image.MAX_IMAGE_PIXELS == before  # the global limit is restored
    for image in index:
        assert _rules(report, image) == {"image size within limit"}  # refused, never decoded
    assert f"{root / next(iter(index))}: rule 'image size within limit' failed" in str(exc)
    assert f"40x32 = 1280 pixels, limit {limit}" in str(exc)  # read from the header, before any decode
    assert report["failure_share"] == 1.0


def test_unparseable_name_and_unknown_modality(dataset, tmp_path):
    root, index = dataset
    items = list(index.items())
    renamed = {}
    for (old, masks), new in zip(items[:2], ["images/slice7.png", f"images/pet_00--{DATASET}--p9--x_0001.png"]):
        (root / old).rename(root / new)
        renamed[new] = masks
    new_index = {**renamed, **dict(items[2:])}
    (root / "SAMed2D_v1.json").write_text(json.dumps(new_index))
    _, report = _fail(root, tmp_path / "out")
    assert "file name parses" in _rules(report, "images/slice7.png")
    assert _rules(report, f"images/pet_00--{DATASET}--p9--x_0001.png") == {"modality known"}


def test_missing_files_and_index(dataset, tmp_path):
    root, index = dataset
    image, masks = next(iter(index.items()))
    (root / masks[1]).unlink()
    _, report = _fail(root, tmp_path / "out")
    assert _rules(report, masks[1]) == {"mask file exists"}
    (root / "SAMed2D_v1.json").unlink()
    exc, report = _fail(root, tmp_path / "out2")
    assert report["failures"][0]["rule"] == "index readable" and "SAMed2D_v1.json" in str(exc)


def test_failure_share_tolerance_and_report_rewritten(dataset, tmp_path):
    root, index = dataset
    bad = next(iter(index))
    (root / bad).write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "out"
    report = validate(root, out, _params(max_failure_share=0.25))  # 1 of 4 images is allowed
    assert report["passed"] is True
    assert [(f["file"], f["rule"]) for f in report["failures"]] == [(bad, "image decodes")]
    _, report = _fail(root, out, _params(max_failure_share=0.2))
    assert report["failure_share"] == pytest.approx(0.25)


def test_empty_dataset_fails(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "SAMed2D_v1.json").write_text("{}")
    _, report = _fail(root, tmp_path / "out")  # no class mapping either
    assert [(f["file"], f["rule"]) for f in report["failures"]] == [
        ("SAMed2D_v1_class_mapping_id.json", "index readable")]
    (root / "SAMed2D_v1_class_mapping_id.json").write_text(json.dumps({DATASET: CLASSES}))
    _, report = _fail(root, tmp_path / "out")
    assert report["n_images"] == 0 and report["failures"][0]["detail"] == "no images listed"


def test_speckled_mask_yields_no_box(dataset, tmp_path):
    root, index = dataset
    _, masks = next(iter(index.items()))
    speck = np.zeros((H, W), np.uint8)
    speck[::4, ::4] = 255  # many isolated pixels: enough in total, no component of 4
    _png(root / masks[0], speck)
    _, report = _fail(root, tmp_path / "out")
    assert _rules(report, masks[0]) == {"mask yields a box"}


def test_mask_named_for_another_image_fails(dataset, tmp_path):
    root, index = dataset
    (img_a, masks_a), (img_b, masks_b) = list(index.items())[:2]
    index[img_a] = [masks_a[0], masks_b[1]]  # a mask whose stem is another image's
    (root / "SAMed2D_v1.json").write_text(json.dumps(index))
    exc, report = _fail(root, tmp_path / "out")
    assert {(f["file"], f["image"], f["rule"]) for f in report["failures"]} == {
        (masks_b[1], img_a, "mask name parses"),
        # ...and it is now listed twice (under its own image too): it would be built twice
        (masks_b[1], img_a, "mask listed once"), (masks_b[1], img_b, "mask listed once")}


# -- the same thing listed twice (issue 18): each an error naming the file and the rule ----------

def _index_text(pairs: list[tuple[str, list[str]]]) -> str:
    """The index as JSON text from (key, masks) pairs, so a key can be written twice."""
    return "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "\n}\n"


def test_image_key_given_twice_in_the_index_fails(dataset, tmp_path):
    root, index = dataset
    pairs = list(index.items())
    image = pairs[1][0]
    (root / "SAMed2D_v1.json").write_text(_index_text(pairs + [(image, pairs[1][1])]))  # json.loads keeps one
    exc, report = _fail(root, tmp_path / "out")
    assert {(f["file"], f["rule"]) for f in report["failures"]} >= {(image, "image file unique")}
    assert f"{root / image}: rule 'image file unique' failed (listed more than once in SAMed2D_v1.json)" in str(exc)


def test_mask_listed_twice_fails(dataset, tmp_path):
    root, index = dataset
    image, masks = list(index.items())[2]
    index[image] = [masks[0], masks[1], masks[0]]
    (root / "SAMed2D_v1.json").write_text(json.dumps(index))
    exc, report = _fail(root, tmp_path / "out")
    assert {(f["file"], f["rule"]) for f in report["failures"]} == {(masks[0], "mask listed once")}
    assert f"{root / masks[0]}: rule 'mask listed once' failed" in str(exc)


def test_same_image_bytes_under_two_names_fails(dataset, tmp_path):
    root, index = dataset
    image, masks = next(iter(index.items()))
    stem = f"ct_00--{DATASET}--patient900--x_0000"
    copy = f"images/{stem}.png"
    (root / copy).write_bytes((root / image).read_bytes())
    copied_masks = []
    for m in masks:  # its own masks, so only the image rule can fire
        new = f"masks/{stem}--{m.rsplit('--', 1)[1]}"
        (root / new).write_bytes((root / m).read_bytes())
        copied_masks.append(new)
    index[copy] = copied_masks
    (root / "SAMed2D_v1.json").write_text(json.dumps(index))
    exc, report = _fail(root, tmp_path / "out")
    assert {(f["file"], f["rule"]) for f in report["failures"]} == {
        (image, "image listed under one name"), (copy, "image listed under one name")}
    assert "the same bytes are listed under another name" in str(exc)


def test_class_mapping_key_given_twice_fails(dataset, tmp_path):
    root, _ = dataset
    # "liver" twice: json.loads would keep id 2 and drop id 1 without a word
    (root / "SAMed2D_v1_class_mapping_id.json").write_text(
        '{"SynthAbdomen": {\n  "liver": 1,\n  "spleen": 2,\n  "liver": 2\n}}\n')
    exc, report = _fail(root, tmp_path / "out")
    assert [(f["file"], f["rule"]) for f in report["failures"]] == [("SAMed2D_v1_class_mapping_id.json",
                                                                       "JSON keys unique")]
    assert "line 4: key 'liver' is given twice" in report["failures"][0]["detail"]
    assert "SAMed2D_v1_class_mapping_id.json: rule 'JSON keys unique' failed" in str(exc)
