"""NIfTI reader on nibabel's shipped brain volume: canonical orientation, slice policies,
windowing, and bad inputs (unknown label, empty label map, grid mismatch)."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medrega.config import ValidateConfig
from medrega.sources.layout import write_slices
from medrega.sources.nifti import read_nifti
from medrega.sources.samed2d import iter_samples
from medrega.sources.slices import ScanError, scale_percentile, window_ct
from tasks.validate import validate

ANAT = Path(os.path.dirname(nib.__file__)) / "tests" / "data" / "anatomical.nii"  # stored LAS
VALIDATE = ValidateConfig(max_failure_share=0.0, max_image_pixels=40_000_000, min_mask_pixels=4)


def label_map(tmp: Path, fill: dict[int, tuple] | None = None, flip_to_ras: bool = False) -> Path:
    """A label map on anatomical.nii's grid: value 1 in a block on the patient's LEFT half (world
    x < centre) of slices 8-16, value 2 ('tumour') in a small block inside it."""
    img = nib.load(str(ANAT))
    lab = np.zeros(img.shape, np.int16)
    for v, sl in (fill if fill is not None else {1: (slice(2, 14), slice(10, 30), slice(8, 17)),
                                                 2: (slice(4, 8), slice(15, 20), slice(10, 14))}).items():
        lab[sl] = v
    out = nib.Nifti1Image(lab, img.affine)
    if flip_to_ras:  # same anatomy, stored RAS instead of LAS
        out = nib.as_closest_canonical(out)
    p = tmp / ("labels_ras.nii.gz" if flip_to_ras else "labels.nii.gz")
    nib.save(out, str(p))
    return p


def test_central_slice_with_labels(tmp_path):
    assert nib.aff2axcodes(nib.load(str(ANAT)).affine) == ("L", "A", "S")
    slices = read_nifti(ANAT, label_map(tmp_path), {1: "brain", 2: "brain tumour"}, modality="mr",
                        dataset="NibabelAnat", patient="subject-01", key="k")
    (s,) = slices
    assert s.index == 25 // 2 and s.image.dtype == np.uint8 and s.image.shape == (41, 33)
    assert [k for k, _ in s.masks] == ["brain", "brain_tumor"]
    assert "subject" not in s.case and s.case.startswith("p")


def test_orientation_left_right_consistent(tmp_path):
    """anatomical.nii is stored LAS: voxel index i grows towards the patient's LEFT, so i = 2..13
    lies on the patient's RIGHT, which radiological display puts on the image's LEFT (columns
    2..13 of 33). The same anatomy stored RAS must give identical pixels and masks."""
    block = {1: (slice(2, 14), slice(10, 30), slice(8, 17))}
    (las,) = read_nifti(ANAT, label_map(tmp_path, block), {1: "brain"}, modality="mr", dataset="N",
                        patient="a", key="k")
    cols = np.nonzero(las.masks[0][1].any(axis=0))[0]
    assert (cols.min(), cols.max()) == (2, 13)
    anat_ras = tmp_path / "anat_ras.nii.gz"
    nib.save(nib.as_closest_canonical(nib.load(str(ANAT))), str(anat_ras))
    (ras,) = read_nifti(anat_ras, label_map(tmp_path, block, flip_to_ras=True), {1: "brain"},
                        modality="mr", dataset="N", patient="a", key="k")
    assert nib.aff2axcodes(nib.load(str(anat_ras)).affine) == ("R", "A", "S")
    np.testing.assert_array_equal(las.image, ras.image)
    np.testing.assert_array_equal(las.masks[0][1], ras.masks[0][1])


def test_slice_policies(tmp_path):
    labels = label_map(tmp_path)
    kw = dict(modality="mr", dataset="N", patient="a", key="k")
    assert [s.index for s in read_nifti(ANAT, labels, {1: "brain", 2: "glioma"}, policy="labelled", **kw)] == list(range(8, 17))
    assert [s.index for s in read_nifti(ANAT, labels, {1: "brain", 2: "glioma"}, policy="every_k", k=4, **kw)] == [8, 12, 16]


def test_windowing_rules():
    assert list(window_ct(np.array([-1000, 0, 20, 40, 80, 1000]), "brain")) == [0, 0, 64, 128, 255, 255]
    assert list(window_ct(np.array([-160, 240]), "abdomen")) == [0, 255]
    ramp = np.arange(1000.0)
    out = scale_percentile(ramp)
    assert out[5] == 0 and out[-5] == 255 and out[500] == 128


def test_written_nifti_slices_pass_validation(tmp_path):
    slices = read_nifti(ANAT, label_map(tmp_path), {1: "brain", 2: "brain tumor"}, modality="mr",
                        dataset="NibabelAnat", policy="labelled", key="k")
    root = tmp_path / "root"
    write_slices(root, slices)
    samples = list(iter_samples(root))
    assert len(samples) == 9 and {r.label for s in samples for r in s.regions} == {"brain", "brain_tumor"}
    assert len({s.patient for s in samples}) == 1  # all slices of a volume share one split key
    assert validate(root, tmp_path / "val", VALIDATE)["passed"]


def test_unknown_label_names_file_and_rule(tmp_path):
    labels = label_map(tmp_path)
    with pytest.raises(ScanError, match=r"labels\.nii\.gz: rule 'label maps to the vocabulary'.*unicorn"):
        read_nifti(ANAT, labels, {1: "brain", 2: "unicorn"}, modality="mr", dataset="N")
    with pytest.raises(ScanError, match=r"labels\.nii\.gz: rule 'label value in label table'.*\[2\]"):
        read_nifti(ANAT, labels, {1: "brain"}, modality="mr", dataset="N")


def test_empty_label_map_and_grid_mismatch(tmp_path):
    empty = label_map(tmp_path, fill={})
    with pytest.raises(ScanError, match=r"labels\.nii\.gz: rule 'label map not empty'"):
        read_nifti(ANAT, empty, {1: "brain"}, modality="mr", dataset="N")
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4)), str(small))
    with pytest.raises(ScanError, match=r"small\.nii\.gz: rule 'label map matches image grid'"):
        read_nifti(ANAT, small, {1: "brain"}, modality="mr", dataset="N")
    # a central slice that holds no label is reported, never written as an empty mask
    off = label_map(tmp_path, fill={1: (slice(2, 14), slice(10, 30), slice(0, 3))})
    with pytest.raises(ScanError, match="rule 'selected slices hold labels'"):
        read_nifti(ANAT, off, {1: "brain"}, modality="mr", dataset="N", policy="central")
