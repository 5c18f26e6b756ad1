"""add_package_scans: the real scans pydicom and nibabel ship join the synthetic SA-Med2D root,
pass validation, are read by the SA-Med2D reader, and are byte-identical on a re-run."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.conftest import tiny
from medrega.sources.embedded import CT_DATASET, MR_DATASET, add_package_scans
from medrega.sources.samed2d import CLASS_MAPPING_FILE, iter_samples
from medrega.sources.synthetic import generate
from tasks.validate import validate

REPO = Path(__file__).resolve().parent.parent


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_package_scans_merge_validate_and_are_deterministic(tmp_path):
    root = tmp_path / "samed2d"
    generate(root, patients_per_modality=1, slices_per_patient=1, image_size=64, seed=0)
    n_synthetic = len(list(iter_samples(root)))
    summary = add_package_scans(root)
    assert summary["images"] == 4 and summary["masks"] == 4
    samples = list(iter_samples(root))
    assert len(samples) == n_synthetic + 4
    real = [s for s in samples if s.dataset in (CT_DATASET, MR_DATASET)]
    assert {(s.modality, s.dataset) for s in real} == {("ct", CT_DATASET), ("mr", MR_DATASET)}
    assert all([r.label for r in s.regions] == ["brain"] for s in real)
    assert len({s.patient for s in real}) == 4  # each scan its own (pseudonymous) patient
    classes = json.loads((root / CLASS_MAPPING_FILE).read_text())
    assert classes[CT_DATASET] == {"brain": 0} and "SynthAbdomenCT" in classes  # merged, not replaced
    assert validate(root, tmp_path / "val", tiny().validate_)["passed"]
    first = digest(root)
    add_package_scans(root)  # re-run on top: nothing changes
    assert digest(root) == first
    other = tmp_path / "fresh"
    generate(other, patients_per_modality=1, slices_per_patient=1, image_size=64, seed=0)
    add_package_scans(other)
    assert digest(other) == first
