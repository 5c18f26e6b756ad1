"""What every 3D reader shares: the 2D slice it emits, intensity windows, slice policies, labels.

Readers (nifti.py, dicom.py, dicom_seg.py, rtstruct.py) turn a volume plus its labels into
`Slice2D`s; `layout.write_slices` writes them in the SA-Med2D layout, so the SA-Med2D reader,
validation and every later stage serve 3D sources unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medrega.vocab import BY_KEY, canonical
from medrega.errors import BadInput


class ScanError(BadInput):
    """A scan or label source that cannot be used. The message names the file and the rule."""

    def __init__(self, file, rule: str, detail: str = ""):
        self.file, self.rule, self.detail = str(file), rule, detail
        super().__init__(f"{file}: rule '{rule}' failed" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class Slice2D:
    """One 2D image ready to write: uint8 pixels, displayed radiologically (patient's right on
    the image's left, anterior/up at the top), and a boolean mask per vocabulary key."""

    modality: str  # medrega.vocab.MODALITIES key
    dataset: str  # source set name: letters/digits only, it becomes part of file names
    case: str  # pseudonymous patient/volume id, never a name or PatientID
    axis: str  # "z" axial slice of a volume, "x" for 2D sources
    index: int  # slice number within the volume
    image: np.ndarray  # (H, W) or (H, W, 3) uint8
    masks: tuple[tuple[str, np.ndarray], ...]  # (vocabulary key, (H, W) bool), sorted by key


# Window level/width presets in Hounsfield units (common radiology defaults).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "mediastinum": (50.0, 350.0),
}


def window_ct(hu: np.ndarray, preset: str | tuple[float, float]) -> np.ndarray:
    """Hounsfield units -> uint8 through a level/width window (values outside clip)."""
    level, width = CT_WINDOWS[preset] if isinstance(preset, str) else preset
    lo = level - width / 2.0
    out = (np.asarray(hu, np.float64) - lo) / width * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def scale_percentile(values: np.ndarray, lo: float = 1.0, hi: float = 99.0,
                     reference: np.ndarray | None = None) -> np.ndarray:
    """MR (and other uncalibrated intensities) -> uint8 by the lo-hi percentile range.

    MR intensities have no physical unit, so a fixed window is meaningless; percentiles are
    taken over `reference` (the whole volume, so all slices of a scan share one scale).
    """
    ref = np.asarray(values if reference is None else reference, np.float64)
    ref = ref[np.isfinite(ref)]
    if ref.size == 0:
        return np.zeros(np.shape(values), np.uint8)
    p_lo, p_hi = np.percentile(ref, [lo, hi])
    span = p_hi - p_lo if p_hi > p_lo else 1.0
    out = (np.nan_to_num(np.asarray(values, np.float64), nan=p_lo) - p_lo) / span * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_uint8(modality: str, values: np.ndarray, window: str | tuple[float, float] | None,
             reference: np.ndarray | None = None) -> np.ndarray:
    """The per-modality rule: CT through a HU window (default abdomen), everything else by
    percentiles (MR 1-99), unless an explicit window is given."""
    if modality == "ct":
        return window_ct(values, window or "abdomen")
    if window is not None and not isinstance(window, str):
        return window_ct(values, window)
    return scale_percentile(values, reference=reference)


# Slice policies: which slices of a volume become images.
POLICIES = ("central", "every_k", "labelled")


def select_slices(n_slices: int, labelled: np.ndarray, policy: str, k: int = 1) -> list[int]:
    """Indices of the slices to emit along the slice axis.

    `labelled[i]` says whether slice i holds any labelled voxel. "central" is the paper's choice
    (SPEC §4) and ignores labels (an unlabelled central slice is then reported, not replaced);
    "every_k" takes every k-th slice starting at the first labelled one; "labelled" takes all
    slices with labels.
    """
    if policy == "central":
        return [n_slices // 2]
    if policy == "labelled":
        return [i for i in range(n_slices) if labelled[i]]
    if policy == "every_k":
        if k < 1:
            raise BadInput(f"slice policy every_k needs k >= 1, got {k}")
        hits = np.flatnonzero(labelled)
        start = int(hits[0]) if hits.size else 0
        return list(range(start, n_slices, k))
    raise BadInput(f"unknown slice policy {policy!r}; choose one of {POLICIES}")


def label_key(name: str, file, rule: str = "label maps to the vocabulary") -> str:
    """Vocabulary key of a source label, or a ScanError naming the file and the rule."""
    key = canonical(str(name))
    if key is None:
        raise ScanError(file, rule, f"label {name!r} is not a medrega.vocab name or synonym "
                                    f"(add it to medrega/vocab.py or map it in the reader's labels)")
    return key


def check_modality(key: str, modality: str, file) -> None:
    """A structure the vocabulary does not list for this modality would be rejected later by the
    builders' prompts; catch it at the source."""
    if modality not in BY_KEY[key].modalities:
        raise ScanError(file, "label allowed for modality",
                        f"{key!r} is not listed for modality {modality!r} in medrega.vocab")


# 8-connectivity, as medrega.sources.samed2d.mask_boxes uses.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def keep_mask(mask: np.ndarray, min_pixels: int) -> bool:
    """Whether a 2D mask is worth writing: its largest connected component has at least
    `min_pixels` pixels (otherwise validation's "mask yields a box" would reject it)."""
    if not mask.any():
        return False
    labels, n = ndimage.label(mask, structure=_CONNECTIVITY)
    return int(np.bincount(labels.ravel())[1:].max()) >= min_pixels


def radiological_axial(plane_ras: np.ndarray) -> np.ndarray:
    """An axial plane indexed [x, y] in RAS+ -> image rows/cols in radiological display.

    In RAS+ x grows towards the patient's right, which radiological display puts on the
    viewer's left, and y grows anteriorly, which goes at the top: image[r, c] = plane[X-1-c, Y-1-r].
    """
    return np.ascontiguousarray(plane_ras[::-1, ::-1].T)


def volume_slices(stack: np.ndarray, label_stack: np.ndarray, names: dict[int, str], *,
                  modality: str, dataset: str, case: str, file, policy: str = "central",
                  k: int = 1, window=None, min_pixels: int = 10) -> list[Slice2D]:
    """(n, H, W) intensities + (n, H, W) integer label map, both already in display orientation
    -> the `Slice2D`s the policy selects.

    `names` maps label values to vocabulary keys (0 is background). A label value with no name,
    an empty label map, or a selection without any labelled slice is a ScanError naming `file`.
    Structures too small on a slice to yield a box are left out of that slice; a selected slice
    left with no structure is skipped (validation rejects images without masks).
    """
    if stack.shape[:3] != label_stack.shape[:3]:
        raise ScanError(file, "label map matches image grid",
                        f"image {stack.shape[:3]} vs labels {label_stack.shape[:3]}")
    values = [int(v) for v in np.unique(label_stack) if v != 0]
    if not values:
        raise ScanError(file, "label map not empty", "no labelled voxel")
    unknown = [v for v in values if v not in names]
    if unknown:
        raise ScanError(file, "label value in label table", f"values {unknown} have no name")
    by_key: dict[str, list[int]] = {}  # several source labels may name one structure
    for v in values:
        check_modality(names[v], modality, file)
        by_key.setdefault(names[v], []).append(v)
    labelled = (label_stack != 0).reshape(label_stack.shape[0], -1).any(axis=1)
    chosen = select_slices(stack.shape[0], labelled, policy, k)
    # One intensity scale per volume, so slices of one scan are comparable.
    reference = stack if modality != "ct" else None
    out = []
    for i in chosen:
        masks = []
        for key in sorted(by_key):
            m = np.isin(label_stack[i], by_key[key])
            if keep_mask(m, min_pixels):
                masks.append((key, m))
        if not masks:
            continue
        image = to_uint8(modality, stack[i], window, reference=reference)
        out.append(Slice2D(modality=modality, dataset=dataset, case=case, axis="z", index=int(i),
                           image=image, masks=tuple(masks)))
    if not out:
        raise ScanError(file, "selected slices hold labels",
                        f"policy {policy!r} selected slices {chosen[:10]} but none holds a structure "
                        f"of at least {min_pixels} pixels")
    return out
