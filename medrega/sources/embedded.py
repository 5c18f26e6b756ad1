"""Real scans that installed packages ship, added to the embedded SA-Med2D-layout dataset.

`add_package_scans(root)` writes, next to the synthetic generator's output (same root, same
layout, merged index), the central axial slice of:

- two head CTs shipped by pydicom (693_J2KI.dcm, J2K_pixelrep_mismatch.dcm; JPEG 2000),
  read through medrega.sources.dicom (de-identified, HU by RescaleSlope/Intercept, brain window);
- two brain MR volumes shipped by nibabel (anatomical.nii, LAS-stored T1; example4d.nii.gz,
  first EPI volume), reoriented to RAS+, percentile-scaled.

None of these ships a label map, so the "brain" masks are DERIVED here by thresholding (CT:
0-100 HU inside the skull; MR: Otsu's threshold), keeping the largest connected component with
holes filled. They are coarse reference masks, not expert annotation: a record built from them
says "brain" about a region a human did not draw. Everything is deterministic: same packages,
same key -> byte-identical files.

Not added, and why: pydicom's liver SEG (liver_1frame.dcm) ships without the CT slices it
segments, so it has no image to pair with (medrega.sources.dicom_seg reads it; the tests pair it
with a constructed series); its ultrasound files carry burned-in text (an institution name is
printed in examples_rgb_color.dcm) and no labels; CT_small/MR_small/examples_overlay have no
labels and no structure a threshold can name honestly.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from medrega.config import DataConfig
from medrega.sources.deid import pseudonym
from medrega.sources.dicom import load_series
from medrega.sources.layout import write_slices
from medrega.sources.nifti import load_ras, ras_to_stack
from medrega.sources.slices import Slice2D, volume_slices

log = logging.getLogger(__name__)

PYDICOM_HEAD_CTS = ("693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm")
NIBABEL_BRAIN_MRS = (("anatomical.nii", 0), ("example4d.nii.gz", 0))
CT_DATASET, MR_DATASET = "PydicomHeadCT", "NibabelBrainMR"
BRAIN = 1


def _largest_filled(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    biggest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return ndimage.binary_fill_holes(labels == biggest)


def derive_ct_brain(hu: np.ndarray) -> np.ndarray:
    """Brain on one axial head-CT slice: 0-100 HU (parenchyma and CSF), eroded so thin scalp
    bridges through skull gaps break, largest component, grown back and hole-filled."""
    soft = (hu >= 0) & (hu <= 100)
    core = ndimage.binary_erosion(soft, iterations=3)
    return _largest_filled(ndimage.binary_dilation(_largest_filled(core), iterations=3) & soft)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximise between-class variance), written out to stay dependency-free."""
    v = values[np.isfinite(values)].ravel()
    hist, edges = np.histogram(v, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    return float(centres[int(np.argmax(w0 * w1 * (mu0 - mu1) ** 2))])


def derive_mr_brain(stack: np.ndarray) -> np.ndarray:
    """Brain (with whatever scalp signal survives) in an MR volume: Otsu, largest 3D component,
    holes filled slice by slice."""
    fg = _largest_filled(stack > otsu_threshold(stack))
    return np.stack([ndimage.binary_fill_holes(s) for s in fg])


def _package_dir(module) -> Path:
    return Path(os.path.dirname(module.__file__))


def package_scan_slices(key=None, min_pixels: int = 10) -> list[Slice2D]:
    """The central slices of the package scans with their derived brain masks (nothing written)."""
    import nibabel
    from pydicom.data import get_testdata_file

    out: list[Slice2D] = []
    for name in PYDICOM_HEAD_CTS:
        path = get_testdata_file(name, download=False)
        if path is None:
            log.warning("pydicom test file %s not installed; skipped", name)
            continue
        series = load_series([Path(path)], key=key)
        hu = series.display(series.values)
        labels = np.stack([derive_ct_brain(s) for s in hu]).astype(np.int64)
        out += volume_slices(hu, labels, {BRAIN: "brain"}, modality="ct", dataset=CT_DATASET,
                             case=series.patient, file=name, policy="central", window="brain",
                             min_pixels=min_pixels)
    data_dir = _package_dir(nibabel) / "tests" / "data"
    for name, volume in NIBABEL_BRAIN_MRS:
        path = data_dir / name
        if not path.is_file():
            log.warning("nibabel test file %s not installed; skipped", name)
            continue
        data, _ = load_ras(path, volume)
        stack = ras_to_stack(data)
        labels = derive_mr_brain(stack).astype(np.int64)
        out += volume_slices(stack, labels, {BRAIN: "brain"}, modality="mr", dataset=MR_DATASET,
                             case=pseudonym(f"nibabel:{name}:{volume}", key), file=name,
                             policy="central", min_pixels=min_pixels)
    return out


def add_package_scans(root: Path, key=None, min_pixels: int = 10) -> dict:
    """Write the package scans into the SA-Med2D root `root` (merging with what is there).

    Returns {"images": n, "masks": n, "files": [...]}.
    """
    slices = package_scan_slices(key=key, min_pixels=min_pixels)
    summary = write_slices(Path(root), slices)
    log.info("added %d package-scan images to the embedded dataset", summary["images"])
    return summary


def build_default(root: Path, d: DataConfig) -> dict:
    """The embedded default raw data in one call: the synthetic SA-Med2D-layout scans, then
    (when `data.package_scans` is true, the default) the real package scans merged in, then the
    bilingual reports file over every image.

    The CLI's `generate` and the flow's raw-data task both call this, so the two can never
    produce different datasets from the same params. Returns the generator's summary plus
    `package_scans` (add_package_scans' summary, or None when switched off) and `reports`.
    """
    from medrega.sources.reports import write_reports
    from medrega.sources.synthetic import generate

    summary = generate(Path(root), d.patients_per_modality, d.slices_per_patient, d.image_size, d.seed)
    summary["package_scans"] = add_package_scans(Path(root)) if d.package_scans else None
    # Reports last: they describe every image in the root, the package scans included.
    summary["reports"] = write_reports(Path(root), seed=d.seed)
    return summary
