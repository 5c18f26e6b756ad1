"""The synthetic SA-Med2D generator: deterministic, correct layout, learnable content."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medrega.sources import synthetic
from medrega.sources.samed2d import parse_image_name, parse_mask_name
from medrega.vocab import BY_KEY, MODALITIES, canonical

SMALL = dict(patients_per_modality=2, slices_per_patient=2, image_size=64, seed=0)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "samed2d"
    summary = synthetic.generate(root, **SMALL)
    return root, summary


def test_byte_identical_rerun(data, tmp_path):
    root, summary = data
    again = tmp_path / "again"
    assert synthetic.generate(again, **SMALL) == summary
    assert _tree(again) == _tree(root)


def test_seed_changes_output(data, tmp_path):
    root, _ = data
    other = tmp_path / "other"
    synthetic.generate(other, **{**SMALL, "seed": 1})
    assert _tree(other) != _tree(root)


def test_layout_and_summary(data):
    root, summary = data
    mapping = json.loads((root / "SAMed2D_v1.json").read_text(encoding="utf-8"))
    classes = json.loads((root / "SAMed2D_v1_class_mapping_id.json").read_text(encoding="utf-8"))
    images = sorted(p.name for p in (root / "images").iterdir())
    masks = sorted(p.name for p in (root / "masks").iterdir())
    assert sorted(k.split("/", 1)[1] for k in mapping) == images
    assert sorted(m.split("/", 1)[1] for ms in mapping.values() for m in ms) == masks
    assert summary["total_images"] == len(images) == 8 * 2 * 2
    assert summary["total_masks"] == len(masks)
    assert set(summary["images"]) == set(MODALITIES)
    for rel, rel_masks in mapping.items():
        info = parse_image_name(rel)
        stem = rel.rsplit("/", 1)[1][:-4]
        inverse = {v: k for k, v in classes[info["dataset"]].items()}
        assert 1 <= len(rel_masks) <= 4
        labels = []
        for m in rel_masks:
            cls, inst = parse_mask_name(m, stem)
            key = canonical(inverse[cls])
            assert key is not None and info["modality"] in BY_KEY[key].modalities
            labels.append(key)
        assert len(labels) == len(set(labels))
        if info["modality"] != "dermoscopy":  # the vocabulary has one dermoscopy structure
            assert len(labels) >= 2, rel


def test_image_modes_and_binary_masks(data):
    root, _ = data
    for p in sorted((root / "images").iterdir()):
        mod = parse_image_name(p.name)["modality"]
        with Image.open(p) as im:
            assert im.size == (64, 64)
            assert im.mode == ("RGB" if mod in ("pathology", "dermoscopy", "fundus") else "L")
    for p in sorted((root / "masks").iterdir()):
        with Image.open(p) as im:
            assert im.mode == "L"
            values = set(np.unique(np.asarray(im)).tolist())
        assert values <= {0, 255} and 255 in values


def test_some_structures_have_several_components(data):
    root, _ = data
    counts = []
    for p in sorted((root / "masks").iterdir()):
        _, n = ndimage.label(np.asarray(Image.open(p)) > 0, structure=np.ones((3, 3)))
        counts.append(n)
    assert max(counts) >= 2 and counts.count(1) > len(counts) // 2


def test_structures_distinct_from_background(data):
    """Inside a structure the mean intensity differs from its surroundings: learnable."""
    root, _ = data
    mapping = json.loads((root / "SAMed2D_v1.json").read_text(encoding="utf-8"))
    for rel, rel_masks in mapping.items():
        img = np.asarray(Image.open(root / rel).convert("L"), float)
        for m in rel_masks:
            mask = np.asarray(Image.open(root / m)) > 0
            ring = ndimage.binary_dilation(mask, iterations=3) & ~mask
            assert abs(img[mask].mean() - img[ring].mean()) > 5, m


def test_radiological_left_right(tmp_path):
    """Patient's right is on the image's left in CT/MR/X-ray (never mirrored): in every image the
    liver lies left of the spleen and each right lung or kidney left of the left one, and the right
    lung, which no patient position brings across the midline, on the image's left half."""
    root = tmp_path / "d"
    synthetic.generate(root, patients_per_modality=6, slices_per_patient=2, image_size=64, seed=3)
    mapping = json.loads((root / "SAMed2D_v1.json").read_text(encoding="utf-8"))
    classes = json.loads((root / "SAMed2D_v1_class_mapping_id.json").read_text(encoding="utf-8"))
    pairs = [("liver", "spleen"), ("right_lung", "left_lung"), ("right_kidney", "left_kidney")]
    seen = set()
    for rel, rel_masks in mapping.items():
        info = parse_image_name(rel)
        if info["modality"] not in ("ct", "mr", "xray"):
            continue
        inverse = {v: k for k, v in classes[info["dataset"]].items()}
        cx = {}
        for m in rel_masks:
            key = inverse[parse_mask_name(m, rel.rsplit("/", 1)[1][:-4])[0]]
            cx[key] = ndimage.center_of_mass(np.asarray(Image.open(root / m)) > 0)[1] / 64
        for right, left in pairs:
            if right in cx and left in cx:
                assert cx[right] < cx[left], (rel, right, cx)
                seen.add(right)
        if "right_lung" in cx:
            assert cx["right_lung"] < 0.5, (rel, cx)
    assert {"liver", "right_lung"} <= seen


def test_regenerate_replaces_old_tree(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "stale.txt").write_text("old")
    synthetic.generate(root, patients_per_modality=1, slices_per_patient=1, image_size=48, seed=0)
    assert not (root / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp dirs left behind


def test_failure_leaves_previous_tree(tmp_path, monkeypatch):
    root = tmp_path / "d"
    root.mkdir()
    (root / "keep.txt").write_text("old")
    calls = {"n": 0}
    real = synthetic._save_png

    def flaky(path, array):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        real(path, array)

    monkeypatch.setattr(synthetic, "_save_png", flaky)
    with pytest.raises(OSError):
        synthetic.generate(root, patients_per_modality=1, slices_per_patient=1, image_size=48, seed=0)
    assert (root / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
