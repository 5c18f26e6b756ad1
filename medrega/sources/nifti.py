"""NIfTI volume + label map -> 2D axial `Slice2D`s (nibabel).

Both volumes are reoriented to nibabel's closest canonical orientation (RAS+) first, so a
scan stored LAS and one stored RAS come out with the patient's right on the same side
(radiological display: patient's right on the image's left, anterior at the top). The label
map must share the image's voxel grid: labels are never resampled, a mismatch is an error.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medrega.sources.deid import pseudonym
from medrega.sources.slices import ScanError, Slice2D, label_key, radiological_axial, volume_slices


def load_ras(path: Path, volume: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(data [x, y, z] in RAS+ as float, affine). A 4D series gives its `volume`-th 3D volume."""
    try:
        img = nib.load(str(path))
        img = nib.as_closest_canonical(img)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - any nibabel/IO failure is "does not read"
        raise ScanError(path, "file reads as NIfTI", f"{type(exc).__name__}: {exc}") from exc
    if data.ndim == 4:
        if not 0 <= volume < data.shape[3]:
            raise ScanError(path, "volume index in range", f"volume {volume} of {data.shape[3]}")
        data = data[..., volume]
    if data.ndim != 3:
        raise ScanError(path, "volume is 3D", f"shape {data.shape}")
    # get_fdata semantics (scl_slope/inter applied by dataobj); float64 for exact windowing.
    return np.asarray(data, dtype=np.float64), img.affine


def ras_to_stack(data: np.ndarray) -> np.ndarray:
    """RAS+ [x, y, z] -> (z, rows, cols) axial stack in radiological display."""
    return np.stack([radiological_axial(data[:, :, z]) for z in range(data.shape[2])])


def read_nifti(image_path: Path, label_path: Path, labels: dict[int, str], *, modality: str,
               dataset: str, patient: str | None = None, policy: str = "central", k: int = 1,
               window=None, min_pixels: int = 10, volume: int = 0, key=None) -> list[Slice2D]:
    """Slices of one NIfTI scan with its label map.

    `labels` maps label values to source names; each must be a medrega.vocab name or synonym.
    `patient` is the source's patient id; only its keyed-hash pseudonym reaches file names
    (default: the image file's name, hashed, since file names of real exports can hold names).
    """
    image_path, label_path = Path(image_path), Path(label_path)
    names = {int(v): label_key(n, label_path) for v, n in labels.items()}
    data, affine = load_ras(image_path, volume)
    label_data, label_affine = load_ras(label_path)
    if data.shape != label_data.shape or not np.allclose(affine, label_affine, atol=1e-3):
        raise ScanError(label_path, "label map matches image grid",
                        f"image {data.shape} vs labels {label_data.shape} (or different affines)")
    if not np.array_equal(label_data, np.rint(label_data)):
        raise ScanError(label_path, "label map holds integers", "non-integer values found")
    case = pseudonym(patient if patient is not None else image_path.name, key)
    return volume_slices(ras_to_stack(data), ras_to_stack(label_data).astype(np.int64), names,
                         modality=modality, dataset=dataset, case=case, file=label_path,
                         policy=policy, k=k, window=window, min_pixels=min_pixels)
