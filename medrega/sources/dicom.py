"""DICOM files and series (pydicom): read, de-identify at once, decode, sort, rescale.

Every dataset is de-identified (medrega.sources.deid) straight after it is parsed, before any
attribute is used, so no later step (names, logs, errors, JSON) can see identifying values.
Images with burned-in text (ultrasound and secondary captures routinely print the patient's
name or the institution into the pixels) are refused: header de-identification cannot clean
pixels, and we have no validated pixel scrubber.

A series is sorted along the slice normal by ImagePositionPatient (InstanceNumber where
positions are missing) and converted to modality values with RescaleSlope/Intercept (Hounsfield
units for CT). Geometry is kept per slice so RT-STRUCT contours can be rasterised on it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from medrega.sources.deid import deidentify
from medrega.sources.slices import ScanError

log = logging.getLogger(__name__)

# DICOM Modality (0008,0060) -> medrega.vocab.MODALITIES key.
MODALITY_MAP = {"CT": "ct", "MR": "mr", "US": "us", "CR": "xray", "DX": "xray", "DR": "xray",
                "RG": "xray", "MG": "xray", "OPT": "oct", "OP": "fundus", "SM": "pathology",
                "XC": "dermoscopy"}
# Modalities whose pixels commonly carry burned-in identifying text when the header is silent.
_BURNED_IN_BY_DEFAULT = {"US", "OT", "XC", "ES", "SC", "DOC"}
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


def read_dataset(path: Path, key=None, pixels: bool = True) -> tuple[Dataset, str]:
    """Parse, de-identify and (optionally) check that pixel data decodes. Returns (ds, pseudonym).

    A truncated or malformed file is a ScanError naming the file and the failed rule.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # noqa: BLE001 - InvalidDicomError, EOFError, struct errors...
        raise ScanError(path, "file reads as DICOM", f"{type(exc).__name__}: {exc}") from exc
    # pydicom stops quietly at end of file, so a truncated file often "parses": a missing pixel
    # element is the usual sign, checked before anything else so the error says so.
    if pixels and "PixelData" not in ds:
        raise ScanError(path, "file holds pixel data", "no (7FE0,0010) Pixel Data: truncated or not an image")
    try:
        ds, pid = deidentify(ds, key)
    except ValueError as exc:
        raise ScanError(path, "file de-identifies", str(exc)) from exc
    if pixels:
        try:
            ds.pixel_array  # noqa: B018 - decode now: a truncated file must fail here, not later
        except Exception as exc:  # noqa: BLE001
            raise ScanError(path, "pixel data decodes", f"{type(exc).__name__}: {exc}") from exc
    return ds, pid


def check_no_burned_in(ds: Dataset, path: Path) -> None:
    flag = str(ds.get("BurnedInAnnotation", "") or "").upper()
    modality = str(ds.get("Modality", "") or "")
    if flag == "YES" or (flag != "NO" and modality in _BURNED_IN_BY_DEFAULT):
        raise ScanError(path, "no burned-in annotation",
                        f"modality {modality or '?'} with BurnedInAnnotation={flag or 'absent'}: "
                        "pixels may show identifying text that header de-identification cannot remove")


def modality_key(ds: Dataset, path: Path) -> str:
    modality = str(ds.get("Modality", "") or "")
    if modality not in MODALITY_MAP:
        raise ScanError(path, "modality known", f"DICOM modality {modality!r} not in {sorted(MODALITY_MAP)}")
    return MODALITY_MAP[modality]


def modality_values(ds: Dataset) -> np.ndarray:
    """Stored pixel values -> modality values (HU for CT) by the linear rescale."""
    arr = np.asarray(ds.pixel_array, dtype=np.float64)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return arr * slope + intercept


@dataclass(frozen=True)
class Series:
    """One de-identified image series: (n, rows, cols) modality values in acquisition grid."""

    modality: str  # vocab key
    patient: str  # pseudonym
    values: np.ndarray  # (n, rows, cols) float64
    sop_uids: tuple[str, ...]  # remapped SOPInstanceUIDs, in stack order
    origins: np.ndarray  # (n, 3) ImagePositionPatient (mm, LPS)
    row_cos: np.ndarray  # direction of increasing column index
    col_cos: np.ndarray  # direction of increasing row index
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns) in mm
    files: tuple[str, ...]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cos, self.col_cos)

    def display(self, plane: np.ndarray) -> np.ndarray:
        """Acquisition grid -> radiological display for axial slices: columns run to the patient's
        left (LPS +x) and rows posteriorly (+y); a grid stored the other way round is flipped."""
        out = plane
        if abs(self.row_cos[0]) >= abs(self.row_cos[1]) and self.row_cos[0] < 0:
            out = out[..., ::-1]
        if abs(self.col_cos[1]) >= abs(self.col_cos[0]) and self.col_cos[1] < 0:
            out = out[..., ::-1, :]
        return np.ascontiguousarray(out)

    def index_of(self, sop_uid: str | None, position=None) -> int | None:
        """Slice holding a referenced instance, else the slice whose plane contains `position`
        (within half the slice gap)."""
        if sop_uid and sop_uid in self.sop_uids:
            return self.sop_uids.index(sop_uid)
        if position is None:
            return None
        d = (np.asarray(position, float) - self.origins) @ self.normal
        i = int(np.argmin(np.abs(d)))
        gaps = np.diff(self.origins @ self.normal)
        tol = 0.5 * float(np.min(np.abs(gaps))) if gaps.size else 0.5
        return i if abs(d[i]) <= max(tol, 1e-3) else None


def _geometry(ds: Dataset, path: Path):
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], float)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], float)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
    except (AttributeError, ValueError, TypeError) as exc:
        raise ScanError(path, "geometry present",
                        "ImageOrientationPatient, ImagePositionPatient and PixelSpacing are needed") from exc
    return iop[:3], iop[3:], ipp, spacing


def load_series(paths: Sequence[Path], key=None) -> Series:
    """Read, de-identify and stack one series (all files must share SeriesInstanceUID, grid
    and orientation)."""
    if not paths:
        raise ScanError("<series>", "series has files", "no files given")
    items = []
    for p in paths:
        ds, pid = read_dataset(Path(p), key)
        check_no_burned_in(ds, Path(p))
        items.append((Path(p), ds, pid))
    first_path, first, pid = items[0]
    modality = modality_key(first, first_path)
    row_cos, col_cos, _, spacing = _geometry(first, first_path)
    normal = np.cross(row_cos, col_cos)
    keyed = []
    for p, ds, p_pid in items:
        if ds.SeriesInstanceUID != first.SeriesInstanceUID or p_pid != pid:
            raise ScanError(p, "one series per call", "SeriesInstanceUID or patient differs from the first file")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise ScanError(p, "series shares one grid", f"{ds.Rows}x{ds.Columns} vs {first.Rows}x{first.Columns}")
        r, c, ipp, _ = _geometry(ds, p)
        if not (np.allclose(r, row_cos, atol=1e-3) and np.allclose(c, col_cos, atol=1e-3)):
            raise ScanError(p, "series shares one orientation", "ImageOrientationPatient differs")
        keyed.append((float(ipp @ normal), int(ds.get("InstanceNumber", 0) or 0), p, ds, ipp))
    keyed.sort(key=lambda t: (t[0], t[1]))  # along the normal; InstanceNumber breaks ties
    positions = [t[0] for t in keyed]
    if len(set(np.round(positions, 3))) != len(positions):
        raise ScanError(keyed[0][2], "slices at distinct positions", "two files share one ImagePositionPatient")
    values = np.stack([modality_values(t[3]) for t in keyed])
    log.info("series of %d slices read for patient %s", len(keyed), pid)  # pseudonym only
    return Series(modality=modality, patient=pid, values=values,
                  sop_uids=tuple(str(t[3].SOPInstanceUID) for t in keyed),
                  origins=np.stack([t[4] for t in keyed]), row_cos=row_cos, col_cos=col_cos,
                  spacing=spacing, files=tuple(str(t[2]) for t in keyed))
