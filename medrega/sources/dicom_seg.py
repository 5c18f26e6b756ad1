"""DICOM SEG (Segmentation Storage) -> masks on the frames of its source series.

Segment names come from SegmentLabel, else the SegmentedPropertyTypeCodeSequence's
CodeMeaning, mapped to vocabulary keys (`labels` can rename site-specific labels first). Each
frame is placed on its source slice by the referenced SOP Instance UID (both sides carry the
same keyed-hash UID after de-identification) or, failing that, by ImagePositionPatient.
FRACTIONAL segmentations are binarised at 50 %.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from medrega.sources.dicom import SEG_SOP_CLASS, Series, read_dataset
from medrega.sources.slices import ScanError, Slice2D, label_key, volume_slices


@dataclass(frozen=True)
class SegFrame:
    segment: int  # SegmentNumber
    key: str  # vocabulary key
    source_uid: str | None  # remapped ReferencedSOPInstanceUID of the source image
    position: tuple[float, float, float] | None  # ImagePositionPatient of the frame
    mask: np.ndarray  # (rows, cols) bool


def _segment_names(ds: Dataset, path: Path, labels: dict[str, str] | None) -> dict[int, str]:
    names: dict[int, str] = {}
    for item in ds.get("SegmentSequence", []):
        raw = str(item.get("SegmentLabel", "") or "")
        if not raw and item.get("SegmentedPropertyTypeCodeSequence"):
            raw = str(item.SegmentedPropertyTypeCodeSequence[0].get("CodeMeaning", ""))
        raw = (labels or {}).get(raw, raw)
        names[int(item.SegmentNumber)] = label_key(raw, path, rule="segment label maps to the vocabulary")
    if not names:
        raise ScanError(path, "SEG lists its segments", "empty or missing SegmentSequence")
    return names


def _first(seq_owner, *path_kw):
    """Walk nested single-item sequences: _first(frame, "PlanePositionSequence", "ImagePositionPatient")."""
    node = seq_owner
    for kw in path_kw[:-1]:
        seq = node.get(kw)
        if not seq:
            return None
        node = seq[0]
    return node.get(path_kw[-1])


def read_seg(path: Path, labels: dict[str, str] | None = None, key=None) -> tuple[list[SegFrame], str]:
    """All frames of a SEG as masks with their segment's vocabulary key. Returns (frames, pseudonym)."""
    path = Path(path)
    ds, pid = read_dataset(path, key)
    if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS:
        raise ScanError(path, "file is a DICOM SEG", f"SOP class {ds.get('SOPClassUID', '?')}")
    names = _segment_names(ds, path, labels)
    pixels = np.asarray(ds.pixel_array)
    if pixels.ndim == 2:
        pixels = pixels[None]
    threshold = 0.5 * float(ds.get("MaximumFractionalValue", 1) or 1) if ds.get("SegmentationType") == "FRACTIONAL" else 0
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    if len(per_frame) < pixels.shape[0]:
        raise ScanError(path, "one functional group per frame",
                        f"{pixels.shape[0]} frames, {len(per_frame)} per-frame items")
    frames = []
    for i in range(pixels.shape[0]):
        fg = per_frame[i]
        seg_no = _first(fg, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
        if seg_no is None and shared is not None:
            seg_no = _first(shared, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
        if seg_no is None or int(seg_no) not in names:
            raise ScanError(path, "frame references a listed segment", f"frame {i}: segment {seg_no}")
        uid = _first(fg, "DerivationImageSequence", "SourceImageSequence", "ReferencedSOPInstanceUID")
        pos = _first(fg, "PlanePositionSequence", "ImagePositionPatient")
        frames.append(SegFrame(segment=int(seg_no), key=names[int(seg_no)],
                               source_uid=str(uid) if uid else None,
                               position=tuple(float(v) for v in pos) if pos else None,
                               mask=pixels[i] > threshold))
    return frames, pid


def seg_slices(seg_path: Path, series: Series, *, dataset: str, labels: dict[str, str] | None = None,
               policy: str = "central", k: int = 1, window=None, min_pixels: int = 10,
               key=None) -> list[Slice2D]:
    """Slices of `series` with the SEG's structures (policy as in medrega.sources.slices)."""
    frames, pid = read_seg(seg_path, labels, key)
    if pid != series.patient:
        raise ScanError(seg_path, "SEG belongs to the series' patient", "pseudonyms differ")
    keys = sorted({f.key for f in frames})
    value_of = {k_: v for v, k_ in enumerate(keys, start=1)}
    label_stack = np.zeros(series.values.shape, np.int64)
    for f in frames:
        i = series.index_of(f.source_uid, f.position)
        if i is None:
            raise ScanError(seg_path, "SEG frame maps to a series slice",
                            f"segment {f.segment}: no slice with its source UID or position")
        if f.mask.shape != label_stack.shape[1:]:
            raise ScanError(seg_path, "label map matches image grid", f"{f.mask.shape} vs {label_stack.shape[1:]}")
        # Later segments win where segments overlap; a slice holds one label per pixel.
        label_stack[i][f.mask] = value_of[f.key]
    return volume_slices(series.display(series.values), series.display(label_stack),
                         {v: k_ for k_, v in value_of.items()}, modality=series.modality,
                         dataset=dataset, case=series.patient, file=seg_path, policy=policy, k=k,
                         window=window, min_pixels=min_pixels)
