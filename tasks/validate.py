"""Validate raw SA-Med2D-style data before anything is built from it (SPEC §4, §8).

`validate(data_root, out_dir, params)` inspects every image and mask listed in
`SAMed2D_v1.json`, puts what it found into two pandas frames (one row per image, one per
mask), runs Great Expectations 1.x suites over them in one ephemeral context, and writes:

- `out_dir/report.json`: per-expectation results and a flat list of failures, each naming
  `{file, image, rule, detail}`; `passed` says whether the stage passed. Written atomically.
- `out_dir/data_docs/`: GX data docs (index.html) for both suites.

The stage fails (`ValidationFailed`, raised after the report is written) when the share of
images with at least one failed rule (their own or one of their masks') exceeds
`params["validate"]["max_failure_share"]`, or when there is nothing to validate.

Rule names (the `rule` of a failure):
  images: "index readable", "file name parses", "modality known", "image file exists",
          "image decodes", "image size within limit", "image dimensions within bounds",
          "image file unique", "image has masks", "source reader accepts image"
  masks:  "mask name parses", "mask file exists", "mask decodes", "label in vocabulary",
          "mask not empty", "mask yields a box", "mask same size as image", "box within image bounds"
File names, mask names and labels follow medrega.sources.samed2d (parse_image_name,
parse_mask_name, vocab.canonical); "mask yields a box" uses its mask_boxes.

Boxes here are the tight box of all non-zero mask pixels, [x1, y1, x2, y2] with x2/y2
exclusive (max + 1), so "within bounds" means 0 <= x1, 0 <= y1, x2 <= W, y2 <= H of the image.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageFile

from medrega import vocab
from medrega.io import write_json
from medrega.sources.samed2d import CLASS_MAPPING_FILE as CLASS_MAP_FILE
from medrega.sources.samed2d import MAPPING_FILE as INDEX_FILE
from medrega.sources.samed2d import class_lookup, iter_samples, mask_boxes, parse_image_name, parse_mask_name
DEFAULT_MAX_IMAGE_SIDE = 65535  # PNG allows more, no scan we take is near this

# Rule names, as written into failures.
R_INDEX = "index readable"
R_NAME = "file name parses"
R_MODALITY = "modality known"
R_IMG_EXISTS = "image file exists"
R_DECODES = "image decodes"
R_SIZE_LIMIT = "image size within limit"
R_DIMS = "image dimensions within bounds"
R_UNIQUE = "image file unique"
R_HAS_MASKS = "image has masks"
R_READER = "source reader accepts image"
R_MASK_NAME = "mask name parses"
R_MASK_EXISTS = "mask file exists"
R_MASK_DECODES = "mask decodes"
R_LABEL = "label in vocabulary"
R_NONEMPTY = "mask not empty"
R_HAS_BOX = "mask yields a box"
R_SAME_SIZE = "mask same size as image"
R_BOX = "box within image bounds"

# The reader's image-name rule with any modality prefix, so that an unknown modality is reported
# as "modality known" rather than as an unparseable name.
_LENIENT_NAME = re.compile(
    r"^(?P<modality>[a-z]+)_(?P<sub>[A-Za-z0-9]+)--(?P<dataset>[^/]+?)--(?P<case>[^/]+?)"
    r"--(?P<axis>[a-z])_(?P<slice>\d{4})\.png$")


class ValidationFailed(RuntimeError):
    """Raw data failed validation. The message lists each failing file and rule; the full
    report (per-expectation results, every failure) is at `report_path`."""

    def __init__(self, message: str, report_path: Path, failures: list[dict[str, Any]]):
        super().__init__(message)
        self.report_path = Path(report_path)
        self.failures = failures


# --------------------------------------------------------------------------------------------
# Inspection: files -> frames
# --------------------------------------------------------------------------------------------

def _parse_image_name(rel_image: str) -> tuple[dict[str, str] | None, str]:
    """(modality/dataset/patient, name error). Uses the reader's `parse_image_name`."""
    try:
        return parse_image_name(rel_image), ""
    except ValueError as exc:
        m = _LENIENT_NAME.match(rel_image.rsplit("/", 1)[-1])
        if m:  # structure fine, modality unknown: the "modality known" rule reports it
            return {"modality": m["modality"], "dataset": m["dataset"], "patient": m["case"]}, ""
        return None, str(exc)


def _load_class_map(data_root: Path) -> dict[str, dict[int, str]]:
    """`{dataset: {id: label}}`, read exactly as the SA-Med2D reader reads it."""
    path = data_root / CLASS_MAP_FILE
    return class_lookup(json.loads(path.read_text(encoding="utf-8")), path)


def _mask_label(rel_mask: str, rel_image: str, dataset: str | None,
                class_map: dict[str, dict[int, str]]) -> tuple[str | None, str, str]:
    """(raw label, mask-name error, label error) of a mask, by the reader's rules."""
    stem = rel_image.rsplit("/", 1)[-1][: -len(".png")] if rel_image.endswith(".png") else rel_image
    try:
        cid, _ = parse_mask_name(rel_mask, stem)
    except ValueError as exc:
        return None, str(exc), ""
    if dataset is None:
        return None, "", "image name does not parse, so its dataset (and the label table) is unknown"
    table = class_map.get(dataset)
    if table is None:
        return None, "", f"dataset {dataset!r} has no entry in {CLASS_MAP_FILE}"
    if cid not in table:
        return None, "", f"class id {cid:04d} is not in {CLASS_MAP_FILE} for dataset {dataset!r}"
    return table[cid], "", ""


def _label_key(label: str | None) -> str | None:
    if label is None:
        return None
    return vocab.canonical(label)


def _open_checked(path: Path, max_pixels: int) -> tuple[Image.Image | None, str, str]:
    """Open and fully decode one PNG under the decompression-bomb limit.

    Returns (image or None, failed rule or "", detail). The size limit is checked on the header
    before any pixel is decoded; PIL's own bomb check (error and warning) counts as the same rule.
    """
    old, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must not "decode" with grey padding
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            im.load()
        return im, "", ""
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, R_SIZE_LIMIT, f"decompression bomb refused: {exc}"
    except Exception as exc:  # noqa: BLE001 - any decoder error means "does not decode"
        return None, "decode", f"{type(exc).__name__}: {exc}"
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old, old_truncated


def _header_size(path: Path) -> tuple[int, int] | None:
    """Width and height from the header only (no pixel decode, no bomb check)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _inspect_image(path: Path, max_pixels: int) -> dict[str, Any]:
    row: dict[str, Any] = {"exists": path.is_file(), "decodes": None, "width": None, "height": None,
                           "pixels": None, "error": ""}
    if not row["exists"]:
        row["error"] = "file not found"
        return row
    im, rule, detail = _open_checked(path, max_pixels)
    if im is not None:
        row.update(decodes=True, width=im.width, height=im.height, pixels=im.width * im.height)
        im.close()
        return row
    row["error"] = detail
    if rule == R_SIZE_LIMIT:  # refused, not decoded: the size rule reports it
        size = _header_size(path)
        if size:
            row.update(width=size[0], height=size[1], pixels=size[0] * size[1])
    else:
        row["decodes"] = False
    return row


def _inspect_mask(path: Path, max_pixels: int, min_pixels: int) -> dict[str, Any]:
    row: dict[str, Any] = {"exists": path.is_file(), "decodes": None, "mask_width": None, "mask_height": None,
                           "mask_pixels": None, "n_boxes": None, "x1": None, "y1": None, "x2": None, "y2": None, "error": ""}
    if not row["exists"]:
        row["error"] = "file not found"
        return row
    im, rule, detail = _open_checked(path, max_pixels)
    if im is None:
        row.update(decodes=False, error=detail)
        return row
    arr = np.asarray(im)
    im.close()
    fg = arr.any(axis=-1) if arr.ndim == 3 else arr != 0
    row.update(decodes=True, mask_width=int(fg.shape[1]), mask_height=int(fg.shape[0]), mask_pixels=int(fg.sum()))
    if row["mask_pixels"]:
        ys, xs = np.nonzero(fg)
        row.update(x1=int(xs.min()), y1=int(ys.min()), x2=int(xs.max()) + 1, y2=int(ys.max()) + 1)
    if row["mask_pixels"] >= min_pixels:  # enough pixels: do they form a component the reader boxes?
        row["n_boxes"] = len(mask_boxes(path, min_pixels))
    return row


def build_frames(data_root: Path, cfg: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, list[dict[str, Any]]]:
    """One row per listed image and per listed mask, plus failures found before GX runs
    (an unreadable index). File paths in the frames are relative to `data_root`."""
    data_root = Path(data_root)
    max_pixels = int(cfg["max_image_pixels"])
    min_pixels = int(cfg["min_mask_pixels"])
    index_path = data_root / INDEX_FILE
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if not isinstance(index, dict):
            raise ValueError("expected an object mapping images to lists of masks")
    except Exception as exc:  # noqa: BLE001
        return _empty_images(), _empty_masks(), [
            {"file": INDEX_FILE, "image": None, "rule": R_INDEX, "detail": f"{type(exc).__name__}: {exc}"}]
    try:
        class_map = _load_class_map(data_root)
    except Exception as exc:  # noqa: BLE001
        return _empty_images(), _empty_masks(), [
            {"file": CLASS_MAP_FILE, "image": None, "rule": R_INDEX, "detail": f"{type(exc).__name__}: {exc}"}]

    images: list[dict[str, Any]] = []
    masks: list[dict[str, Any]] = []
    for rel_image, mask_list in index.items():
        rel_image = str(rel_image)
        mask_list = mask_list if isinstance(mask_list, list) else []
        parsed, name_error = _parse_image_name(rel_image)
        irow = {"row": len(images), "file": rel_image,
                "modality": parsed["modality"] if parsed else None,
                "dataset": parsed["dataset"] if parsed else None,
                "patient": parsed["patient"] if parsed else None,
                "n_masks": len(mask_list), "name_error": name_error}
        irow.update(_inspect_image(data_root / rel_image, max_pixels))
        images.append(irow)
        for rel_mask in mask_list:
            rel_mask = str(rel_mask)
            label, mask_name_error, label_error = _mask_label(rel_mask, rel_image, irow["dataset"], class_map)
            key = _label_key(label)
            # label_key: the vocabulary key; the raw label when unknown; null when the name gives none
            # (then "mask name parses" reports it and the label rule skips the row).
            mrow = {"row": len(masks), "file": rel_mask, "image": rel_image, "label": label,
                    "label_key": key if key else (label if label is not None else
                                                  (None if mask_name_error else "<unlabelled>")),
                    "label_known": key is not None, "label_error": label_error,
                    "mask_name_ok": not mask_name_error, "mask_name_error": mask_name_error,
                    "image_width": irow["width"], "image_height": irow["height"]}
            mrow.update(_inspect_mask(data_root / rel_mask, max_pixels, min_pixels))
            both = mrow["mask_width"] is not None and irow["width"] is not None
            mrow["size_matches"] = ((mrow["mask_width"], mrow["mask_height"]) == (irow["width"], irow["height"])
                                    if both else None)
            mrow["box_inside"] = (None if mrow["x1"] is None or irow["width"] is None else
                                  bool(mrow["x1"] >= 0 and mrow["y1"] >= 0 and mrow["x2"] <= irow["width"]
                                       and mrow["y2"] <= irow["height"]))
            masks.append(mrow)
    img_df = pd.DataFrame(images, columns=_IMAGE_COLUMNS) if images else _empty_images()
    mask_df = pd.DataFrame(masks, columns=_MASK_COLUMNS) if masks else _empty_masks()
    for col in ("width", "height", "pixels", "n_masks"):
        img_df[col] = pd.to_numeric(img_df[col], errors="coerce").astype("float64")
    for col in ("image_width", "image_height", "mask_width", "mask_height", "mask_pixels", "n_boxes",
                "x1", "y1", "x2", "y2"):
        mask_df[col] = pd.to_numeric(mask_df[col], errors="coerce").astype("float64")
    return img_df, mask_df, []


_IMAGE_COLUMNS = ["row", "file", "modality", "dataset", "patient", "exists", "decodes", "width", "height",
                  "pixels", "n_masks", "error", "name_error"]
_MASK_COLUMNS = ["row", "file", "image", "label", "label_key", "label_known", "label_error", "mask_name_ok",
                 "mask_name_error", "exists", "decodes", "image_width", "image_height", "mask_width", "mask_height",
                 "mask_pixels", "n_boxes", "x1", "y1", "x2", "y2",
                 "size_matches", "box_inside", "error"]


def _empty_images() -> pd.DataFrame:
    return pd.DataFrame(columns=_IMAGE_COLUMNS)


def _empty_masks() -> pd.DataFrame:
    return pd.DataFrame(columns=_MASK_COLUMNS)


# --------------------------------------------------------------------------------------------
# Expectations
# --------------------------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "?"
    return str(int(v)) if isinstance(v, (float, np.floating)) and float(v).is_integer() else str(v)


def _suites(cfg: dict[str, Any], max_side: int) -> dict[str, list[tuple[str, Any, Any]]]:
    """(rule, expectation, detail(row) -> str) per frame."""
    import great_expectations as gx

    E = gx.expectations
    max_pixels = int(cfg["max_image_pixels"])
    min_mask = int(cfg["min_mask_pixels"])
    modalities = sorted(vocab.MODALITIES)
    return {
        "images": [
            (R_NAME, E.ExpectColumnValuesToNotBeNull(column="modality"), lambda r: r["name_error"]),
            (R_MODALITY, E.ExpectColumnValuesToBeInSet(column="modality", value_set=modalities),
             lambda r: f"modality {r['modality']!r} not in {modalities}"),
            (R_IMG_EXISTS, E.ExpectColumnValuesToBeInSet(column="exists", value_set=[True]), lambda r: r["error"]),
            (R_DECODES, E.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True]), lambda r: r["error"]),
            (R_SIZE_LIMIT, E.ExpectColumnValuesToBeBetween(column="pixels", min_value=1, max_value=max_pixels),
             lambda r: f"{_fmt(r['width'])}x{_fmt(r['height'])} = {_fmt(r['pixels'])} pixels, limit {max_pixels}"
                       + (f" ({r['error']})" if r["error"] else "")),
            (R_DIMS, E.ExpectColumnValuesToBeBetween(column="width", min_value=1, max_value=max_side),
             lambda r: f"width {_fmt(r['width'])} outside 1..{max_side}"),
            (R_DIMS, E.ExpectColumnValuesToBeBetween(column="height", min_value=1, max_value=max_side),
             lambda r: f"height {_fmt(r['height'])} outside 1..{max_side}"),
            (R_UNIQUE, E.ExpectColumnValuesToBeUnique(column="file"), lambda r: "listed more than once"),
            (R_HAS_MASKS, E.ExpectColumnValuesToBeBetween(column="n_masks", min_value=1),
             lambda r: f"no masks listed in {INDEX_FILE}"),
        ],
        "masks": [
            (R_MASK_NAME, E.ExpectColumnValuesToBeInSet(column="mask_name_ok", value_set=[True]),
             lambda r: r["mask_name_error"]),
            (R_MASK_EXISTS, E.ExpectColumnValuesToBeInSet(column="exists", value_set=[True]), lambda r: r["error"]),
            (R_MASK_DECODES, E.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True]), lambda r: r["error"]),
            (R_LABEL, E.ExpectColumnValuesToBeInSet(column="label_key", value_set=sorted(vocab.BY_KEY)),
             lambda r: r["label_error"] or f"label {r['label']!r} is not in medrega.vocab"),
            (R_NONEMPTY, E.ExpectColumnValuesToBeBetween(column="mask_pixels", min_value=min_mask),
             lambda r: f"{_fmt(r['mask_pixels'])} foreground pixels, need at least {min_mask}"),
            (R_HAS_BOX, E.ExpectColumnValuesToBeBetween(column="n_boxes", min_value=1),
             lambda r: f"{_fmt(r['mask_pixels'])} foreground pixels but no connected component of at least "
                       f"{min_mask} (mask_boxes gives no box)"),
            (R_SAME_SIZE, E.ExpectColumnValuesToBeInSet(column="size_matches", value_set=[True]),
             lambda r: f"mask {_fmt(r['mask_width'])}x{_fmt(r['mask_height'])}, "
                       f"image {_fmt(r['image_width'])}x{_fmt(r['image_height'])}"),
            (R_BOX, E.ExpectColumnValuesToBeInSet(column="box_inside", value_set=[True]),
             lambda r: _box_detail(r)),
            (R_BOX, E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="image_width", column_B="x2", or_equal=True,
                                                              ignore_row_if="either_value_is_missing"),
             lambda r: _box_detail(r)),
            (R_BOX, E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="image_height", column_B="y2", or_equal=True,
                                                              ignore_row_if="either_value_is_missing"),
             lambda r: _box_detail(r)),
        ],
    }


def _box_detail(r: dict[str, Any]) -> str:
    box = ", ".join(_fmt(r[k]) for k in ("x1", "y1", "x2", "y2"))
    return f"box [{box}] outside image {_fmt(r['image_width'])}x{_fmt(r['image_height'])}"


def _run_gx(frames: dict[str, pd.DataFrame], cfg: dict[str, Any], max_side: int,
            docs_dir: Path | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """Run both suites in one ephemeral context. Returns (expectation results, failures, docs index)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site("medrega_validate", {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    source = context.data_sources.add_pandas("samed2d")
    result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": ["row", "file"]}
    results: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for name, entries in _suites(cfg, max_side).items():
        frame = frames[name]
        batch_def = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = gx.ExpectationSuite(name=f"samed2d_{name}")
        for i, (rule, expectation, _) in enumerate(entries):
            expectation.meta = {"rule": rule, "entry": i}
            suite.add_expectation(expectation)
        suite = context.suites.add(suite)
        vdef = context.validation_definitions.add(gx.ValidationDefinition(name=f"validate_{name}", data=batch_def,
                                                                          suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(name=f"checkpoint_{name}", validation_definitions=[vdef],
                                                           result_format=result_format))
        run = checkpoint.run(batch_parameters={"dataframe": frame})
        (vresult,) = run.run_results.values()
        for er in vresult.results:
            cfg_e = er.expectation_config
            rule, _, detail = entries[int(cfg_e.meta["entry"])]
            res = er.result or {}
            exc = er.exception_info or {}
            exc_msg = exc.get("exception_message") if isinstance(exc, dict) else None
            results.append({
                "suite": f"samed2d_{name}", "rule": rule, "expectation": cfg_e.type,
                "kwargs": _kw(cfg_e.kwargs), "success": bool(er.success),
                "element_count": res.get("element_count"), "unexpected_count": res.get("unexpected_count"),
                "unexpected_percent": res.get("unexpected_percent"), "exception": exc_msg,
            })
            if exc_msg:  # an expectation that could not run is a failure of the whole frame
                failures.append({"file": name, "image": None, "rule": rule,
                                 "detail": f"expectation {cfg_e.type} raised: {exc_msg}"})
                continue
            for hit in res.get("unexpected_index_list") or []:
                row = frame.iloc[int(hit["row"])].to_dict()
                failures.append({
                    "file": row["file"], "image": row.get("image", row["file"]), "rule": rule,
                    "detail": str(detail(row)) if detail else "",
                })
    docs_index = None
    if docs_dir is not None:
        context.build_data_docs(site_names=["medrega_validate"])
        index = Path(docs_dir) / "index.html"
        docs_index = str(index) if index.is_file() else None
    return results, failures, docs_index


def _kw(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dict(kwargs).items() if k != "batch_id"}


# --------------------------------------------------------------------------------------------
# Source-reader cross-check
# --------------------------------------------------------------------------------------------

def _reader_failures(data_root: Path) -> list[dict[str, Any]]:
    """Run the pipeline's own reader (medrega.sources.samed2d.iter_samples) over data that passed
    every expectation: an error it still raises is one the builders would hit."""
    try:
        for _ in iter_samples(data_root):
            pass
    except (ValueError, OSError) as exc:
        msg = str(exc)
        hit = re.search(r"((?:images|masks)/[^\s:'\"]+?\.png)", msg)
        file = hit.group(1) if hit else INDEX_FILE
        image = file if file.startswith("images/") else None
        return [{"file": file, "image": image, "rule": R_READER, "detail": msg}]
    return []


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    return str(v)


def _write_summary_html(path: Path, report: dict[str, Any]) -> None:
    """A small page next to the GX docs (also the only page when GX docs could not be built)."""
    rows = "".join(
        f"<tr><td>{html.escape(str(f['file']))}</td><td>{html.escape(f['rule'])}</td>"
        f"<td>{html.escape(str(f['detail']))}</td></tr>" for f in report["failures"])
    exp_rows = "".join(
        f"<tr><td>{html.escape(e['suite'])}</td><td>{html.escape(e['rule'])}</td><td>{html.escape(e['expectation'])}</td>"
        f"<td>{'pass' if e['success'] else 'FAIL'}</td><td>{e['unexpected_count']}</td></tr>"
        for e in report["expectations"])
    page = (f"<!doctype html><meta charset='utf-8'><title>MedRegA data validation</title>"
            f"<h1>Data validation: {'passed' if report['passed'] else 'FAILED'}</h1>"
            f"<p>{report['n_images']} images, {report['n_masks']} masks; {report['n_failing_images']} failing images "
            f"(share {report['failure_share']:.4f}, allowed {report['max_failure_share']}).</p>"
            f"<h2>Expectations</h2><table border=1><tr><th>suite</th><th>rule</th><th>expectation</th>"
            f"<th>result</th><th>unexpected</th></tr>{exp_rows}</table>"
            f"<h2>Failures</h2><table border=1><tr><th>file</th><th>rule</th><th>detail</th></tr>{rows}</table>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")


def _failure_message(report_path: Path, data_root: Path, report: dict[str, Any], limit: int = 50) -> str:
    lines = [f"data validation failed: {report['n_failing_images']} of {report['n_images']} images fail "
             f"(share {report['failure_share']:.4f} > allowed {report['max_failure_share']}); "
             f"report: {report_path}"]
    for f in report["failures"][:limit]:
        where = Path(data_root) / f["file"] if f["file"] not in ("images", "masks") else f["file"]
        lines.append(f"  {where}: rule '{f['rule']}' failed ({f['detail']})")
    if len(report["failures"]) > limit:
        lines.append(f"  ... and {len(report['failures']) - limit} more in {report_path}")
    return "\n".join(lines)


def validate(data_root: Path, out_dir: Path, params: dict) -> dict:
    """Validate the SA-Med2D-layout data under `data_root`; write `out_dir/report.json` and
    `out_dir/data_docs/`. Returns the report; raises `ValidationFailed` (after writing the
    report, with `passed: false`) when the failing-image share exceeds the allowed share."""
    t0 = time.perf_counter()
    data_root, out_dir = Path(data_root), Path(out_dir)
    cfg = dict(params["validate"])
    max_share = float(cfg["max_failure_share"])
    max_side = int(cfg.get("max_image_side", DEFAULT_MAX_IMAGE_SIDE))
    out_dir.mkdir(parents=True, exist_ok=True)

    images, masks, failures = build_frames(data_root, cfg)
    t_inspect = time.perf_counter() - t0
    docs_dir = out_dir.resolve() / "data_docs"  # GX wants an absolute base directory
    shutil.rmtree(docs_dir, ignore_errors=True)  # pages of earlier runs would linger in the index
    docs_note = "GX data docs built by the ephemeral context"
    expectations: list[dict[str, Any]] = []
    if not failures:
        try:
            expectations, gx_failures, docs_index = _run_gx({"images": images, "masks": masks}, cfg, max_side,
                                                            docs_dir)
        except Exception as exc:  # noqa: BLE001 - docs are best-effort; rerun the checks without them
            docs_note = f"GX data docs could not be built ({type(exc).__name__}: {exc}); see summary.html"
            expectations, gx_failures, docs_index = _run_gx({"images": images, "masks": masks}, cfg, max_side, None)
        failures += gx_failures
        failures += _reader_failures(data_root) if not gx_failures else []
    else:
        docs_index = None
        docs_note = "not built: the index could not be read"

    n_images = int(len(images))
    failing_images = {f["image"] or f["file"] for f in failures}
    if n_images == 0:
        share = 1.0
        if not failures:
            failures.append({"file": INDEX_FILE, "image": None, "rule": R_INDEX, "detail": "no images listed"})
    else:
        share = len(failing_images & set(images["file"])) / n_images
        if failing_images - set(images["file"]):  # failures not tied to one image fail the stage
            share = max(share, 1.0)
    passed = share <= max_share and not (n_images == 0)
    failures.sort(key=lambda f: (str(f["image"] or f["file"]), str(f["file"]), f["rule"]))

    report = {
        "passed": passed,
        "data_root": str(data_root),
        "n_images": n_images,
        "n_masks": int(len(masks)),
        "n_failing_images": len(failing_images),
        "failure_share": share,
        "max_failure_share": max_share,
        "limits": {"max_image_pixels": int(cfg["max_image_pixels"]), "min_mask_pixels": int(cfg["min_mask_pixels"]),
                   "max_image_side": max_side},
        "box_convention": "tight box of non-zero mask pixels, [x1, y1, x2, y2], x2/y2 exclusive, image pixels",
        "expectations": expectations,
        "failures": failures,
        "data_docs": docs_index,
        "data_docs_note": docs_note,
        "timings_s": {"inspect": round(t_inspect, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    report_path = out_dir / "report.json"
    write_json(report_path, report, default=_json_default)
    _write_summary_html(out_dir / "summary.html", report)
    if not passed:
        raise ValidationFailed(_failure_message(report_path, data_root, report), report_path, failures)
    return report
