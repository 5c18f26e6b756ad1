"""Raw SA-Med2D-layout data -> two frames the validate stage's expectations run over.

One row per image listed in `SAMed2D_v1.json` (duplicates kept: the index is read as pairs, so a
key given twice is a row twice) and one per mask listed under it. Every image and mask is read
once: its header size, whether it decodes under the pixel limit, its content hash, and for a mask
its connected-component boxes, computed exactly as the record builders compute them
(`samed2d.mask_boxes`), so validation checks the boxes training will see. File names, mask names
and labels are parsed by the reader's own rules.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import re
from pathlib import Path
from typing import Any

import pandas as pd

from medrega import io, vocab
from medrega.config import ValidateConfig
from medrega.images import TOO_LARGE, ImageRefused, header, open_image
from medrega.sources.samed2d import CLASS_MAPPING_FILE, MAPPING_FILE, class_lookup, mask_boxes, parse_image_name, \
    parse_mask_name

# The reader's image-name rule with any modality prefix, so that an unknown modality is reported
# as "modality known" rather than as an unparseable name.
_LENIENT_NAME = re.compile(
    r"^(?P<modality>[a-z]+)_(?P<sub>[A-Za-z0-9]+)--(?P<dataset>[^/]+?)--(?P<case>[^/]+?)"
    r"--(?P<axis>[a-z])_(?P<slice>\d{4})\.png$")

IMAGE_COLUMNS = ["file", "canonical", "sha1", "modality", "dataset", "patient", "exists", "decodes", "width",
                 "height", "pixels", "n_masks", "error", "name_error"]
MASK_COLUMNS = ["file", "canonical", "image", "label", "label_key", "label_known", "label_error", "mask_name_ok",
                "mask_name_error", "exists", "decodes", "image_width", "image_height", "mask_width", "mask_height",
                "mask_pixels", "n_boxes", "x1", "y1", "x2", "y2", "size_matches", "box_inside", "error"]


class IndexUnreadable(ValueError):
    """The index or the class mapping cannot be used; `rule` is the rule it broke, when a more
    precise one than "index readable" applies (a key given twice)."""

    def __init__(self, file: str, detail: str, rule: str | None = None):
        super().__init__(f"{file}: {detail}")
        self.file, self.detail, self.rule = file, detail, rule


class _Pairs(list):
    """A JSON object as the list of its (key, value) pairs: repeated keys survive."""


def read_index(data_root: Path) -> list[tuple[str, list]]:
    """The image -> masks index as pairs, in file order, duplicates kept."""
    path = data_root / MAPPING_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_Pairs)
    except (OSError, ValueError) as exc:
        raise IndexUnreadable(MAPPING_FILE, f"{type(exc).__name__}: {exc}") from None
    if not isinstance(index, _Pairs):
        raise IndexUnreadable(MAPPING_FILE, "expected an object mapping images to lists of masks")
    return [(str(k), list(v) if isinstance(v, list) else []) for k, v in index]


def read_class_map(data_root: Path) -> dict[str, dict[int, str]]:
    """`{dataset: {id: label}}`, read exactly as the SA-Med2D reader reads it."""
    path = data_root / CLASS_MAPPING_FILE
    try:
        return class_lookup(io.loads_json(path.read_text(encoding="utf-8"), path), path)
    except io.DuplicateKey as dup:  # a dataset or a label given twice: json.loads would keep the last
        raise IndexUnreadable(CLASS_MAPPING_FILE, f"line {dup.line}: key {dup.key!r} is given twice in one object",
                              dup.rule) from None
    except (OSError, ValueError) as exc:
        raise IndexUnreadable(CLASS_MAPPING_FILE, f"{type(exc).__name__}: {exc}") from None


def _image_name(rel_image: str) -> tuple[dict[str, str] | None, str]:
    """(modality/dataset/patient, name error), by the reader's `parse_image_name`."""
    try:
        return parse_image_name(rel_image), ""
    except ValueError as exc:
        m = _LENIENT_NAME.match(rel_image.rsplit("/", 1)[-1])
        if m:  # structure fine, modality unknown: the "modality known" rule reports it
            return {"modality": m["modality"], "dataset": m["dataset"], "patient": m["case"]}, ""
        return None, str(exc)


def _mask_label(rel_mask: str, rel_image: str, dataset: str | None,
                class_map: dict[str, dict[int, str]]) -> tuple[str | None, str, str]:
    """(raw label, mask-name error, label error) of a mask, by the reader's rules."""
    stem = rel_image.rsplit("/", 1)[-1].removesuffix(".png")
    try:
        cid, _ = parse_mask_name(rel_mask, stem)
    except ValueError as exc:
        return None, str(exc), ""
    if dataset is None:
        return None, "", "image name does not parse, so its dataset (and the label table) is unknown"
    table = class_map.get(dataset)
    if table is None:
        return None, "", f"dataset {dataset!r} has no entry in {CLASS_MAPPING_FILE}"
    if cid not in table:
        return None, "", f"class id {cid:04d} is not in {CLASS_MAPPING_FILE} for dataset {dataset!r}"
    return table[cid], "", ""


def _read(path: Path, max_pixels: int) -> tuple[dict[str, Any], Any]:
    """(facts about one file, the decoded image or None)."""
    row: dict[str, Any] = {"exists": path.is_file(), "decodes": None, "width": None, "height": None, "error": "",
                           "sha1": None}
    if not row["exists"]:
        row["error"] = "file not found"
        return row, None
    data = path.read_bytes()
    row["sha1"] = hashlib.sha1(data).hexdigest()
    try:
        image = open_image(data, max_pixels)
    except ImageRefused as refused:
        row["error"] = refused.detail
        if refused.reason == TOO_LARGE:  # refused, not decoded: the size rule reports it
            _, row["width"], row["height"] = header(data)
        else:
            row["decodes"] = False
        return row, None
    row.update(decodes=True, width=image.width, height=image.height)
    return row, image


def _image_row(data_root: Path, rel_image: str, n_masks: int, max_pixels: int) -> dict[str, Any]:
    parsed, name_error = _image_name(rel_image)
    facts, image = _read(data_root / rel_image, max_pixels)
    if image is not None:
        image.close()
    return {"file": rel_image, "canonical": posixpath.normpath(rel_image), "n_masks": n_masks,
            "modality": parsed and parsed["modality"], "dataset": parsed and parsed["dataset"],
            "patient": parsed and parsed["patient"], "name_error": name_error,
            "pixels": facts["width"] * facts["height"] if facts["width"] is not None else None, **facts}


def _mask_row(data_root: Path, rel_mask: str, image: dict[str, Any], class_map, cfg: ValidateConfig) -> dict[str, Any]:
    label, name_error, label_error = _mask_label(rel_mask, image["file"], image["dataset"], class_map)
    key = vocab.canonical(label) if label is not None else None
    facts, mask = _read(data_root / rel_mask, cfg.max_image_pixels)
    row: dict[str, Any] = {
        "file": rel_mask, "canonical": posixpath.normpath(rel_mask), "image": image["file"], "label": label,
        # the vocabulary key; the raw label when unknown; null when the name gives none (then
        # "mask name parses" reports it and the label rule skips the row)
        "label_key": key or (label if label is not None else (None if name_error else "<unlabelled>")),
        "label_known": key is not None, "label_error": label_error, "mask_name_ok": not name_error,
        "mask_name_error": name_error, "exists": facts["exists"], "decodes": facts["decodes"], "error": facts["error"],
        "image_width": image["width"], "image_height": image["height"],
        "mask_width": facts["width"], "mask_height": facts["height"],
        "mask_pixels": None, "n_boxes": None, "x1": None, "y1": None, "x2": None, "y2": None}
    if mask is not None:
        gray = mask if mask.mode in ("L", "1") else mask.convert("L")
        row["mask_pixels"] = sum(gray.histogram()[1:])
        boxes = mask_boxes(mask, cfg.min_mask_pixels)
        mask.close()
        # too few pixels is "mask not empty"'s finding; "yields a box" asks of the others
        row["n_boxes"] = len(boxes) if row["mask_pixels"] >= cfg.min_mask_pixels else None
        if boxes:  # the extent of the component boxes the builders will write
            row.update(x1=min(b[0] for b in boxes), y1=min(b[1] for b in boxes),
                       x2=max(b[2] for b in boxes), y2=max(b[3] for b in boxes))
    sized = row["mask_width"] is not None and image["width"] is not None
    row["size_matches"] = ((row["mask_width"], row["mask_height"]) == (image["width"], image["height"])
                           if sized else None)
    row["box_inside"] = (None if row["x1"] is None or image["width"] is None else
                         bool(row["x1"] >= 0 and row["y1"] >= 0 and row["x2"] <= image["width"]
                              and row["y2"] <= image["height"]))
    return row


def build_frames(data_root: Path, cfg: ValidateConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per listed image and per listed mask; file paths relative to `data_root`.
    Raises IndexUnreadable when the index or the class mapping cannot be read."""
    data_root = Path(data_root)
    index, class_map = read_index(data_root), read_class_map(data_root)
    images, masks = [], []
    for rel_image, mask_list in index:
        image = _image_row(data_root, rel_image, len(mask_list), cfg.max_image_pixels)
        images.append(image)
        masks += [_mask_row(data_root, str(rel_mask), image, class_map, cfg) for rel_mask in mask_list]
    img_df = pd.DataFrame(images, columns=IMAGE_COLUMNS)
    mask_df = pd.DataFrame(masks, columns=MASK_COLUMNS)
    for col in ("width", "height", "pixels", "n_masks"):
        img_df[col] = pd.to_numeric(img_df[col], errors="coerce").astype("float64")
    for col in ("image_width", "image_height", "mask_width", "mask_height", "mask_pixels", "n_boxes",
                "x1", "y1", "x2", "y2"):
        mask_df[col] = pd.to_numeric(mask_df[col], errors="coerce").astype("float64")
    return img_df, mask_df
