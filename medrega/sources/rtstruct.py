"""RT Structure Set (RT-STRUCT) contours -> masks on the slices of the referenced series.

Contours are CLOSED_PLANAR polygons in patient coordinates (mm). Each is projected onto the
slice it lies on (by ContourImageSequence's referenced instance, else by its z position) and
filled with our own even-odd scanline rule on pixel centres, so several contours of one ROI on
one slice combine by XOR: an inner contour cuts a hole, the RT convention.

ROIs that are not anatomy (RTROIInterpretedType EXTERNAL body outline, ISOCENTER, MARKER, ...)
and point/open contours are skipped; every other ROI name must map to the vocabulary.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from medrega.sources.dicom import RTSTRUCT_SOP_CLASS, Series, read_dataset
from medrega.sources.slices import ScanError, Slice2D, label_key, volume_slices

NON_ANATOMY_TYPES = {"EXTERNAL", "ISOCENTER", "MARKER", "REGISTRATION", "SUPPORT", "FIXATION",
                     "BOLUS", "CONTROL", "BRACHY_CHANNEL", "BRACHY_ACCESSORY", "BRACHY_SRC_APP",
                     "BRACHY_CHNL_SHLD", "DOSE_REGION", "CONTRAST_AGENT", "CAVITY"}


def fill_polygon(rows: int, cols: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Boolean (rows, cols) mask of the pixels whose centres lie inside the polygon (even-odd).

    Vertices are in pixel units (x = column, y = row, pixel centres at integers). For each row
    the crossings of the horizontal line through the pixel centres with the polygon's edges are
    sorted; pixels between crossing pairs are inside, as are pixel centres lying on an edge.
    """
    mask = np.zeros((rows, cols), bool)
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    if xs.size < 3:
        return mask
    x0, y0 = xs, ys
    x1, y1 = np.roll(xs, -1), np.roll(ys, -1)
    lo, hi = max(0, int(np.ceil(ys.min()))), min(rows - 1, int(np.floor(ys.max())))
    for r in range(lo, hi + 1):
        # Half-open rule on y so a vertex exactly on the scanline is counted once.
        crosses = (y0 <= r) != (y1 <= r)
        if not crosses.any():
            continue
        t = (r - y0[crosses]) / (y1[crosses] - y0[crosses])
        xc = np.sort(x0[crosses] + t * (x1[crosses] - x0[crosses]))
        for a, b in zip(xc[0::2], xc[1::2]):
            c0, c1 = max(0, int(np.ceil(a))), min(cols - 1, int(np.floor(b)))
            if c0 <= c1:
                mask[r, c0:c1 + 1] = True
    # Pixel centres on the outline count as inside (contours are drawn through the boundary
    # pixels); the half-open scanline rule alone drops a polygon's bottom edge.
    for xa, ya, xb, yb in zip(x0, y0, x1, y1):
        steps = int(np.ceil(2 * max(abs(xb - xa), abs(yb - ya)))) + 1
        t = np.linspace(0.0, 1.0, steps)
        px, py = xa + t * (xb - xa), ya + t * (yb - ya)
        on = np.isclose(px, np.rint(px), atol=1e-6) & np.isclose(py, np.rint(py), atol=1e-6)
        cx, cy = np.rint(px[on]).astype(int), np.rint(py[on]).astype(int)
        keep = (cx >= 0) & (cx < cols) & (cy >= 0) & (cy < rows)
        mask[cy[keep], cx[keep]] = True
    return mask


def _roi_names(ds, path: Path, labels: dict[str, str] | None) -> dict[int, str | None]:
    """ROI number -> vocabulary key, or None for a non-anatomical ROI that is skipped."""
    kinds = {int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "") or "").upper()
             for o in ds.get("RTROIObservationsSequence", [])}
    out: dict[int, str | None] = {}
    for roi in ds.get("StructureSetROISequence", []):
        number, name = int(roi.ROINumber), str(roi.get("ROIName", "") or "")
        if kinds.get(number) in NON_ANATOMY_TYPES:
            out[number] = None
            continue
        out[number] = label_key((labels or {}).get(name, name), path, rule="ROI name maps to the vocabulary")
    return out


def rtstruct_slices(rt_path: Path, series: Series, *, dataset: str, labels: dict[str, str] | None = None,
                    policy: str = "central", k: int = 1, window=None, min_pixels: int = 10,
                    key=None) -> list[Slice2D]:
    """Slices of `series` with the structure set's ROIs as masks."""
    rt_path = Path(rt_path)
    ds, pid = read_dataset(rt_path, key, pixels=False)
    if str(ds.get("SOPClassUID", "")) != RTSTRUCT_SOP_CLASS:
        raise ScanError(rt_path, "file is an RT-STRUCT", f"SOP class {ds.get('SOPClassUID', '?')}")
    if pid != series.patient:
        raise ScanError(rt_path, "RT-STRUCT belongs to the series' patient", "pseudonyms differ")
    names = _roi_names(ds, rt_path, labels)
    n, rows, cols = series.values.shape
    masks: dict[str, np.ndarray] = {}
    for roi in ds.get("ROIContourSequence", []):
        key_ = names.get(int(roi.ReferencedROINumber))
        if key_ is None:
            continue
        vol = masks.setdefault(key_, np.zeros((n, rows, cols), bool))
        for contour in roi.get("ContourSequence", []):
            if str(contour.get("ContourGeometricType", "")).upper() != "CLOSED_PLANAR":
                continue
            pts = np.asarray([float(v) for v in contour.ContourData], float).reshape(-1, 3)
            ref = contour.get("ContourImageSequence")
            uid = str(ref[0].ReferencedSOPInstanceUID) if ref else None
            i = series.index_of(uid, pts[0])
            if i is None:
                raise ScanError(rt_path, "contour lies on a series slice",
                                f"ROI {int(roi.ReferencedROINumber)} contour at z={pts[0][2]:.2f} mm")
            rel = pts - series.origins[i]
            xs = rel @ series.row_cos / series.spacing[1]  # column index
            ys = rel @ series.col_cos / series.spacing[0]  # row index
            vol[i] ^= fill_polygon(rows, cols, ys, xs)
    if not masks:
        raise ScanError(rt_path, "structure set has anatomical ROIs",
                        "every ROI is non-anatomical (EXTERNAL, ISOCENTER, ...) or has no closed contour")
    keys = sorted(masks)
    label_stack = np.zeros((n, rows, cols), np.int64)
    for v, key_ in enumerate(keys, start=1):  # later (alphabetical) ROIs win on overlaps
        label_stack[masks[key_]] = v
    return volume_slices(series.display(series.values), series.display(label_stack),
                         {v: k_ for v, k_ in enumerate(keys, start=1)}, modality=series.modality,
                         dataset=dataset, case=series.patient, file=rt_path, policy=policy, k=k,
                         window=window, min_pixels=min_pixels)
