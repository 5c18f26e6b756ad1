"""Reader for the SA-Med2D-20M layout (the real release and our synthetic stand-in).

    root/images/<modality>_<sub>--<dataset>--<case>--<axis>_<slice:04d>.png
    root/masks/<image stem>--<class id:04d>_<instance:03d>.png
    root/SAMed2D_v1.json                   {"images/<img>.png": ["masks/<mask>.png", ...]}
    root/SAMed2D_v1_class_mapping_id.json  {"<dataset>": {"<label>": <class id>, ...}}

Everything the pipeline needs about provenance is in the file names, so a name that does not
parse is an error that names the file and the rule, never a silently dropped sample.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from scipy import ndimage

from medrega.sources import Region, Sample
from medrega.vocab import MODALITIES, canonical
from medrega.errors import BadInput
from medrega.io import loads_json

MAPPING_FILE = "SAMed2D_v1.json"
CLASS_MAPPING_FILE = "SAMed2D_v1_class_mapping_id.json"

IMAGE_RULE = "<modality>_<sub>--<dataset>--<case>--<axis>_<slice:4 digits>.png"
MASK_RULE = "<image stem>--<class id:4 digits>_<instance:3 digits>.png"
_IMAGE_RE = re.compile(
    r"^(?P<modality>[a-z]+)_(?P<sub>[A-Za-z0-9]+)--(?P<dataset>[^/]+?)--(?P<case>[^/]+?)"
    r"--(?P<axis>[a-z])_(?P<slice>\d{4})\.png$")
_MASK_RE = re.compile(r"^(?P<stem>.+)--(?P<cls>\d{4})_(?P<inst>\d{3})\.png$")
# Modality prefixes of the real release that differ from our keys (e.g. "x_ray" style names).
_MODALITY_ALIASES = {"x": "xray", "xray": "xray", "cxr": "xray", "ultrasound": "us",
                     "mri": "mr", "histopathology": "pathology", "derm": "dermoscopy"}
# Cine frames / phases of one patient must share a split: strip the frame suffix from the case.
_FRAME_SUFFIX = re.compile(r"_(frame|phase)\d+$")


def parse_image_name(name: str) -> dict[str, str]:
    """Split an image file name into modality key, dataset, case, patient, axis and slice."""
    base = name.rsplit("/", 1)[-1]
    m = _IMAGE_RE.match(base)
    if not m:
        raise BadInput(f"{name}: image name does not follow the SA-Med2D rule {IMAGE_RULE}")
    modality = _MODALITY_ALIASES.get(m["modality"], m["modality"])
    if modality not in MODALITIES:
        raise BadInput(f"{name}: modality prefix {m['modality']!r} is not one of "
                         f"{sorted(MODALITIES)} (rule {IMAGE_RULE})")
    return {"modality": modality, "dataset": m["dataset"], "case": m["case"],
            "patient": _FRAME_SUFFIX.sub("", m["case"]), "axis": m["axis"], "slice": m["slice"]}


def parse_mask_name(name: str, image_stem: str) -> tuple[int, int]:
    """(class id, instance) of a mask file name; it must start with its image's stem."""
    base = name.rsplit("/", 1)[-1]
    m = _MASK_RE.match(base)
    if not m or m["stem"] != image_stem:
        raise BadInput(f"{name}: mask name does not follow the SA-Med2D rule {MASK_RULE} "
                         f"for image stem {image_stem!r}")
    return int(m["cls"]), int(m["inst"])


def class_lookup(class_mapping: dict, path: Path) -> dict[str, dict[int, str]]:
    """dataset -> {class id: label}. The release maps label -> id; accept id -> label as well."""
    if not isinstance(class_mapping, dict):
        raise BadInput(f"{path}: expected an object mapping datasets to {{label: class id}}")
    out: dict[str, dict[int, str]] = {}
    for dataset, table in class_mapping.items():
        if not isinstance(table, dict):
            raise BadInput(f"{path}: entry {dataset!r} must map labels to class ids")
        inv: dict[int, str] = {}
        for k, v in table.items():
            if isinstance(v, int) and not isinstance(v, bool):
                inv[v] = str(k)
            elif isinstance(v, str) and str(k).isdigit():
                inv[int(k)] = v
            else:
                raise BadInput(f"{path}: {dataset}/{k!r}: expected label -> integer class id")
        out[dataset] = inv
    return out


def _load_json(path: Path):
    if not path.is_file():
        raise BadInput(f"{path}: missing (an SA-Med2D root holds {MAPPING_FILE} and {CLASS_MAPPING_FILE})")
    return loads_json(path.read_text(encoding="utf-8"), path)  # a key given twice is an error, not the last wins


def iter_samples(root: Path) -> Iterator[Sample]:
    """Yield one `Sample` per image, sorted by image path, with regions sorted by mask path.

    Pixels are not decoded here: width/height come from the PNG header (PIL opens lazily), so
    this streams over millions of images cheaply.
    """
    root = Path(root).resolve()
    mapping = _load_json(root / MAPPING_FILE)
    classes = class_lookup(_load_json(root / CLASS_MAPPING_FILE), root / CLASS_MAPPING_FILE)
    for rel_image in sorted(mapping):
        info = parse_image_name(rel_image)
        stem = rel_image.rsplit("/", 1)[-1][: -len(".png")]
        table = classes.get(info["dataset"])
        if table is None:
            raise BadInput(f"{rel_image}: dataset {info['dataset']!r} has no entry in {CLASS_MAPPING_FILE}")
        regions = []
        for rel_mask in sorted(mapping[rel_image]):
            cls, _ = parse_mask_name(rel_mask, stem)
            if cls not in table:
                raise BadInput(f"{rel_mask}: class id {cls:04d} is not in {CLASS_MAPPING_FILE} "
                                 f"for dataset {info['dataset']!r}")
            key = canonical(table[cls])
            if key is None:
                raise BadInput(f"{rel_mask}: label {table[cls]!r} (class id {cls:04d}, dataset "
                                 f"{info['dataset']!r}) is not in the vocabulary (medrega.vocab)")
            regions.append(Region(label=key, mask=root / rel_mask))
        image = root / rel_image
        with Image.open(image) as im:  # reads the header only
            width, height = im.size
        yield Sample(image=image, rel_image=rel_image, modality=info["modality"],
                     dataset=info["dataset"], patient=info["patient"], width=width, height=height,
                     regions=tuple(regions))


# 8-connectivity: pixels touching at a corner belong to the same structure.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def mask_boxes(mask: Path | Image.Image, min_pixels: int = 4) -> list[tuple[int, int, int, int]]:
    """Pixel boxes (x1, y1, x2, y2), x2/y2 = max + 1, one per connected component of the mask.

    Components smaller than `min_pixels` are annotation specks, not regions, and are dropped.
    Boxes come back sorted top-to-bottom, left-to-right so records are deterministic.

    This runs once per mask over millions of masks, so it does the least work past the PNG
    decode: no mode conversion for masks already 8-bit or 1-bit (convert("L") copies the whole
    image), and connected components only inside the mask's bounding box (PIL's getbbox is one
    C pass), which is usually a small part of the slice.
    """
    if isinstance(mask, Image.Image):
        bbox, arr = _foreground(mask)
    else:
        with Image.open(mask) as im:
            bbox, arr = _foreground(im)
    if bbox is None:
        return []
    x0, y0 = bbox[0], bbox[1]
    return component_boxes(arr, min_pixels, x0, y0, crop_box=bbox)


def _foreground(im: Image.Image):
    """(bbox of the non-zero pixels or None, boolean array inside it): the one definition of a
    mask's foreground, for the builders and for validation alike."""
    if im.mode not in ("L", "1"):  # palette, 16-bit, RGB: "non-zero" means non-zero grey
        im = im.convert("L")
    bbox = im.getbbox()  # nonzero pixels; None when the mask is empty
    return (None, None) if bbox is None else (bbox, np.asarray(im.crop(bbox)) > 0)


def component_boxes(arr: np.ndarray, min_pixels: int, x0: int = 0, y0: int = 0,
                    crop_box: tuple[int, int, int, int] | None = None) -> list[tuple[int, int, int, int]]:
    """One box per connected component of a boolean array (offset by x0, y0), sorted top to
    bottom; `crop_box` is the array's own tight box, returned as-is when it is one component."""
    labels, n = ndimage.label(arr, structure=_CONNECTIVITY)
    if n == 1 and crop_box is not None:  # the common case: one component, its box is the crop
        return [crop_box] if int(np.count_nonzero(arr)) >= min_pixels else []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    boxes = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or sizes[i] < min_pixels:
            continue
        ys, xs = sl
        boxes.append((x0 + int(xs.start), y0 + int(ys.start), x0 + int(xs.stop), y0 + int(ys.stop)))
    return sorted(boxes, key=lambda b: (b[1], b[0], b[3], b[2]))
