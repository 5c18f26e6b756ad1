"""SA-Med2D reader: name parsing, streaming samples, and one box per connected component."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from medrega.sources import synthetic
from medrega.sources.samed2d import iter_samples, mask_boxes, parse_image_name
from medrega.vocab import BY_KEY, MODALITIES


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("sam") / "d"
    synthetic.generate(r, patients_per_modality=2, slices_per_patient=2, image_size=64, seed=0)
    return r


def _save_mask(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray((arr > 0).astype(np.uint8) * 255).save(path)
    return path


def test_iter_samples_matches_mapping(root):
    mapping = json.loads((root / "SAMed2D_v1.json").read_text(encoding="utf-8"))
    samples = list(iter_samples(root))
    assert [s.rel_image for s in samples] == sorted(mapping)
    for s in samples:
        assert s.image == root.resolve() / s.rel_image and s.image.is_file()
        assert (s.width, s.height) == (64, 64)
        assert s.modality in MODALITIES
        assert s.rel_image.split("/")[1].startswith(f"{s.modality}_00--{s.dataset}--{s.patient}--")
        assert [r.mask.name for r in s.regions] == sorted(m.split("/")[1] for m in mapping[s.rel_image])
        for r in s.regions:
            assert r.label in BY_KEY and s.modality in BY_KEY[r.label].modalities
            assert r.mask.is_file()


def test_iter_samples_does_not_decode_pixels(root, monkeypatch):
    def boom(self, *a, **k):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    assert len(list(iter_samples(root))) == 32


def test_parse_real_names():
    info = parse_image_name("images/mr_00--ACDC--patient019_frame01--x_0000.png")
    assert info["modality"] == "mr" and info["dataset"] == "ACDC"
    assert info["case"] == "patient019_frame01" and info["patient"] == "patient019"
    info = parse_image_name("ct_00--AbdomenCT1K--Case_00011--x_0040.png")
    assert (info["modality"], info["dataset"], info["patient"], info["slice"]) == ("ct", "AbdomenCT1K", "Case_00011", "0040")


@pytest.mark.parametrize("bad", [
    "images/ct_00-AbdomenCT1K--Case_00011--x_0040.png",  # single dash
    "images/ct_00--AbdomenCT1K--Case_00011.png",  # no slice part
    "images/ct_00--AbdomenCT1K--Case_00011--x_40.png",  # slice not 4 digits
    "images/ct--AbdomenCT1K--Case_00011--x_0040.png",  # no sub-modality index
])
def test_bad_image_names(bad):
    with pytest.raises(ValueError, match="rule") as e:
        parse_image_name(bad)
    assert bad in str(e.value)


def test_unknown_modality():
    with pytest.raises(ValueError, match="modality prefix 'petscan'") as e:
        parse_image_name("petscan_00--X--p1--z_0001.png")
    assert "petscan_00--X--p1--z_0001.png" in str(e.value)


def _mini_root(tmp_path, image_name, mask_names, classes):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("L", (40, 30)).save(tmp_path / "images" / image_name)
    arr = np.zeros((30, 40), np.uint8)
    arr[5:10, 5:12] = 255
    for m in mask_names:
        _save_mask(tmp_path / "masks" / m, arr)
    (tmp_path / "SAMed2D_v1.json").write_text(json.dumps(
        {f"images/{image_name}": [f"masks/{m}" for m in mask_names]}))
    (tmp_path / "SAMed2D_v1_class_mapping_id.json").write_text(json.dumps(classes))
    return tmp_path


def test_mini_root_reads_size_and_label(tmp_path):
    stem = "ct_00--Demo--case7--z_0003"
    root = _mini_root(tmp_path, stem + ".png", [stem + "--0001_001.png"], {"Demo": {"liver": 0, "right kidney": 1}})
    (s,) = list(iter_samples(root))
    assert (s.width, s.height, s.patient, s.dataset) == (40, 30, "case7", "Demo")
    assert [r.label for r in s.regions] == ["right_kidney"]


def test_unknown_label_names_file(tmp_path):
    stem = "ct_00--Demo--case7--z_0003"
    root = _mini_root(tmp_path, stem + ".png", [stem + "--0000_001.png"], {"Demo": {"banana": 0}})
    with pytest.raises(ValueError, match="not in the vocabulary") as e:
        list(iter_samples(root))
    assert stem + "--0000_001.png" in str(e.value) and "banana" in str(e.value)


def test_unknown_class_id_and_dataset(tmp_path):
    stem = "ct_00--Demo--case7--z_0003"
    root = _mini_root(tmp_path, stem + ".png", [stem + "--0005_001.png"], {"Demo": {"liver": 0}})
    with pytest.raises(ValueError, match="class id 0005"):
        list(iter_samples(root))
    (root / "SAMed2D_v1_class_mapping_id.json").write_text(json.dumps({"Other": {"liver": 5}}))
    with pytest.raises(ValueError, match="'Demo' has no entry"):
        list(iter_samples(root))


def test_mask_of_other_image_rejected(tmp_path):
    stem = "ct_00--Demo--case7--z_0003"
    wrong = "ct_00--Demo--case7--z_0004--0000_001.png"
    root = _mini_root(tmp_path, stem + ".png", [wrong], {"Demo": {"liver": 0}})
    with pytest.raises(ValueError, match="rule") as e:
        list(iter_samples(root))
    assert wrong in str(e.value)


def test_mask_boxes_one_per_component(tmp_path):
    arr = np.zeros((50, 60), np.uint8)
    arr[10:20, 5:15] = 1  # blob A: x 5..14, y 10..19
    arr[30:41, 40:52] = 1  # blob B: x 40..51, y 30..40
    arr[2, 55] = 1  # a 1-pixel speck
    path = _save_mask(tmp_path / "m.png", arr)
    assert mask_boxes(path, min_pixels=4) == [(5, 10, 15, 20), (40, 30, 52, 41)]
    assert len(mask_boxes(path, min_pixels=1)) == 3
    assert mask_boxes(path, min_pixels=200) == []


def test_mask_boxes_diagonal_touch_is_one_component(tmp_path):
    arr = np.zeros((20, 20), np.uint8)
    arr[2:6, 2:6] = 1
    arr[6:10, 6:10] = 1  # touches the first blob only at a corner
    assert mask_boxes(_save_mask(tmp_path / "m.png", arr)) == [(2, 2, 10, 10)]


def test_mask_boxes_empty(tmp_path):
    assert mask_boxes(_save_mask(tmp_path / "m.png", np.zeros((8, 8), np.uint8))) == []
