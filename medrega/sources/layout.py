"""Write `Slice2D`s into an SA-Med2D-layout root (the one medrega.sources.samed2d reads).

    root/images/{modality}_00--{dataset}--{case}--{axis}_{index:04d}.png
    root/masks/{image stem}--{class id:04d}_001.png
    root/SAMed2D_v1.json, root/SAMed2D_v1_class_mapping_id.json

The root may already hold data (e.g. the synthetic generator's): entries are merged, existing
class ids are kept and new labels of a dataset get the next free id, so re-running with the
same slices rewrites identical bytes. Callers build every slice in memory first (that is where
bad input fails), so a bad scan writes nothing; each file then appears whole (temporary name,
then rename) and the index is replaced last, so an interrupted write never indexes a partial file.
"""
from __future__ import annotations

import re
from io import BytesIO
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from medrega.io import loads_json, write_bytes, write_json
from medrega.sources.samed2d import CLASS_MAPPING_FILE, MAPPING_FILE
from medrega.sources.slices import ScanError, Slice2D
from medrega.vocab import MODALITIES

# Names go into file names split on "--"; keep them to characters the SA-Med2D rule accepts.
_DATASET_RE = re.compile(r"^[A-Za-z0-9]+$")
_CASE_RE = re.compile(r"^[A-Za-z0-9]+(_[A-Za-z0-9]+)*$")


def image_stem(s: Slice2D) -> str:
    return f"{s.modality}_00--{s.dataset}--{s.case}--{s.axis}_{s.index:04d}"


def _check(s: Slice2D) -> None:
    stem = image_stem(s)
    if s.modality not in MODALITIES:
        raise ScanError(stem, "modality known", f"{s.modality!r} not in {sorted(MODALITIES)}")
    if not _DATASET_RE.match(s.dataset) or not _CASE_RE.match(s.case) or not re.fullmatch(r"[a-z]", s.axis):
        raise ScanError(stem, "file name parses", "dataset must be letters/digits, case letters/digits/_")
    if not 0 <= s.index <= 9999:
        raise ScanError(stem, "file name parses", f"slice index {s.index} outside 0..9999")
    if s.image.dtype != np.uint8 or s.image.ndim not in (2, 3):
        raise ScanError(stem, "image is 8-bit 2D", f"got {s.image.dtype} {s.image.shape}")
    if not s.masks:
        raise ScanError(stem, "image has masks", "a slice without any labelled structure")
    for key, m in s.masks:
        if m.shape != s.image.shape[:2]:
            raise ScanError(stem, "mask same size as image", f"{key}: {m.shape} vs {s.image.shape[:2]}")
        if not m.any():
            raise ScanError(stem, "mask not empty", f"{key}: no foreground pixel")


def _save_png(path: Path, array: np.ndarray) -> None:
    # Fixed encoder options, no metadata chunks: identical input -> identical bytes (as synthetic.py).
    # Encoded in memory (one slice), then written whole with the umask's permissions by medrega.io.
    buffer = BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1, optimize=False)
    write_bytes(path, buffer.getvalue())


def _load(path: Path) -> dict:
    if not path.is_file():
        return {}
    return loads_json(path.read_text(encoding="utf-8"), path)


def write_slices(root: Path, slices: Iterable[Slice2D]) -> dict:
    """Merge `slices` into the SA-Med2D root; return {"images": n, "masks": n, "files": [...]}.

    Everything is checked before the first byte is written; two slices with the same file name
    in one call are an error (two series of one patient would otherwise overwrite each other).
    """
    root = Path(root)
    slices = list(slices)
    seen: set[str] = set()
    for s in slices:
        _check(s)
        stem = image_stem(s)
        if stem in seen:
            raise ScanError(stem, "image file unique", "two slices map to the same file name "
                                                       "(same dataset, case, axis and index)")
        seen.add(stem)
    mapping = _load(root / MAPPING_FILE)
    classes: dict[str, dict[str, int]] = _load(root / CLASS_MAPPING_FILE)
    for s in slices:  # class ids first, in slice order, so they are deterministic
        table = classes.setdefault(s.dataset, {})
        for key, _ in s.masks:
            if key not in table:
                table[key] = max(table.values(), default=-1) + 1
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    n_masks = 0
    for s in slices:
        stem = image_stem(s)
        _save_png(root / "images" / f"{stem}.png", s.image)
        masks = []
        for key, m in s.masks:
            rel = f"masks/{stem}--{classes[s.dataset][key]:04d}_001.png"
            _save_png(root / rel, m.astype(np.uint8) * 255)
            masks.append(rel)
        mapping[f"images/{stem}.png"] = sorted(masks)
        files += [f"images/{stem}.png", *masks]
        n_masks += len(masks)
    write_json(root / CLASS_MAPPING_FILE, classes, indent=1)  # the format synthetic.py writes
    write_json(root / MAPPING_FILE, mapping, indent=1)  # last: the index only ever lists whole files
    return {"images": len(slices), "masks": n_masks, "files": files}
