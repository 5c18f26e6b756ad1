"""Stage: validate raw SA-Med2D-layout data before anything is built from it (SPEC §4, §8).

Every image and mask listed in `SAMed2D_v1.json` is inspected (medrega.inspection) into two
frames, Great Expectations suites run over them (medrega.gx), and the SA-Med2D reader is run
over data that passed. Written:

- `out_dir/report.json`: `passed`, counts, per-expectation results and every failure as
  `{file, image, rule, detail}`. Deterministic (no timings), since materialize depends on it.
- `out_dir/data_docs/`: GX data docs (index.html) for both suites.

The stage fails (`ValidationFailed`, after the report is written) when the share of images with
a failed rule (their own or one of their masks') exceeds `validate.max_failure_share`, when a
failure is tied to no single image (the index, a whole frame), or when nothing is listed.

Boxes are the connected-component boxes the record builders write ([x1, y1, x2, y2], x2/y2 =
max + 1, components under `min_mask_pixels` dropped); "box within image bounds" checks their
extent against the image.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from medrega import gx, io, vocab
from medrega.config import ValidateConfig
from medrega.errors import BadInput
from medrega.inspection import IndexUnreadable, build_frames
from medrega.sources.samed2d import MAPPING_FILE, iter_samples

R_INDEX = "index readable"
R_NAME = "file name parses"
R_MODALITY = "modality known"
R_IMG_EXISTS = "image file exists"
R_DECODES = "image decodes"
R_SIZE_LIMIT = "image size within limit"
R_DIMS = "image dimensions within bounds"
R_UNIQUE = "image file unique"
R_SAME_CONTENT = "image listed under one name"
R_HAS_MASKS = "image has masks"
R_READER = "source reader accepts image"
R_MASK_NAME = "mask name parses"
R_MASK_UNIQUE = "mask listed once"
R_MASK_EXISTS = "mask file exists"
R_MASK_DECODES = "mask decodes"
R_LABEL = "label in vocabulary"
R_NONEMPTY = "mask not empty"
R_HAS_BOX = "mask yields a box"
R_SAME_SIZE = "mask same size as image"
R_BOX = "box within image bounds"


class ValidationFailed(BadInput):
    """Raw data failed validation. The message lists each failing file and rule; the full
    report (per-expectation results, every failure) is at `report_path`."""

    def __init__(self, message: str, report_path: Path, failures: list[dict[str, Any]]):
        super().__init__(message)
        self.report_path = Path(report_path)
        self.failures = failures


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "?"
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _box_detail(r: dict[str, Any]) -> str:
    box = ", ".join(_fmt(r[k]) for k in ("x1", "y1", "x2", "y2"))
    return f"box [{box}] outside image {_fmt(r['image_width'])}x{_fmt(r['image_height'])}"


def image_rules(cfg: ValidateConfig) -> list[gx.Rule]:
    import great_expectations as ge

    E, limit, side = ge.expectations, cfg.max_image_pixels, cfg.max_image_side
    modalities = sorted(vocab.MODALITIES)
    return [
        gx.Rule(R_NAME, E.ExpectColumnValuesToNotBeNull(column="modality"), lambda r: r["name_error"]),
        gx.Rule(R_MODALITY, E.ExpectColumnValuesToBeInSet(column="modality", value_set=modalities),
                lambda r: f"modality {r['modality']!r} not in {modalities}"),
        gx.Rule(R_IMG_EXISTS, E.ExpectColumnValuesToBeInSet(column="exists", value_set=[True]), lambda r: r["error"]),
        gx.Rule(R_DECODES, E.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True]), lambda r: r["error"]),
        gx.Rule(R_SIZE_LIMIT, E.ExpectColumnValuesToBeBetween(column="pixels", min_value=1, max_value=limit),
                lambda r: f"{_fmt(r['width'])}x{_fmt(r['height'])} = {_fmt(r['pixels'])} pixels, limit {limit}"),
        gx.Rule(R_DIMS, E.ExpectColumnValuesToBeBetween(column="width", min_value=1, max_value=side),
                lambda r: f"width {_fmt(r['width'])} outside 1..{side}"),
        gx.Rule(R_DIMS, E.ExpectColumnValuesToBeBetween(column="height", min_value=1, max_value=side),
                lambda r: f"height {_fmt(r['height'])} outside 1..{side}"),
        gx.Rule(R_UNIQUE, E.ExpectColumnValuesToBeUnique(column="canonical"),
                lambda r: f"listed more than once in {MAPPING_FILE}"),
        gx.Rule(R_SAME_CONTENT, E.ExpectColumnValuesToBeUnique(column="sha1"),
                lambda r: "the same bytes are listed under another name"),
        gx.Rule(R_HAS_MASKS, E.ExpectColumnValuesToBeBetween(column="n_masks", min_value=1),
                lambda r: f"no masks listed in {MAPPING_FILE}"),
    ]


def mask_rules(cfg: ValidateConfig) -> list[gx.Rule]:
    import great_expectations as ge

    E, least = ge.expectations, cfg.min_mask_pixels
    return [
        gx.Rule(R_MASK_NAME, E.ExpectColumnValuesToBeInSet(column="mask_name_ok", value_set=[True]),
                lambda r: r["mask_name_error"]),
        gx.Rule(R_MASK_UNIQUE, E.ExpectColumnValuesToBeUnique(column="canonical"),
                lambda r: f"listed more than once in {MAPPING_FILE} (it would make its structure twice)"),
        gx.Rule(R_MASK_EXISTS, E.ExpectColumnValuesToBeInSet(column="exists", value_set=[True]), lambda r: r["error"]),
        gx.Rule(R_MASK_DECODES, E.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True]), lambda r: r["error"]),
        gx.Rule(R_LABEL, E.ExpectColumnValuesToBeInSet(column="label_key", value_set=sorted(vocab.BY_KEY)),
                lambda r: r["label_error"] or f"label {r['label']!r} is not in medrega.vocab"),
        gx.Rule(R_NONEMPTY, E.ExpectColumnValuesToBeBetween(column="mask_pixels", min_value=least),
                lambda r: f"{_fmt(r['mask_pixels'])} foreground pixels, need at least {least}"),
        gx.Rule(R_HAS_BOX, E.ExpectColumnValuesToBeBetween(column="n_boxes", min_value=1),
                lambda r: f"{_fmt(r['mask_pixels'])} foreground pixels but no connected component of at least "
                          f"{least} (mask_boxes gives no box)"),
        gx.Rule(R_SAME_SIZE, E.ExpectColumnValuesToBeInSet(column="size_matches", value_set=[True]),
                lambda r: f"mask {_fmt(r['mask_width'])}x{_fmt(r['mask_height'])}, "
                          f"image {_fmt(r['image_width'])}x{_fmt(r['image_height'])}"),
        gx.Rule(R_BOX, E.ExpectColumnValuesToBeInSet(column="box_inside", value_set=[True]), _box_detail),
        gx.Rule(R_BOX, E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="image_width", column_B="x2", or_equal=True,
                                                                 ignore_row_if="either_value_is_missing"), _box_detail),
        gx.Rule(R_BOX, E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="image_height", column_B="y2", or_equal=True,
                                                                 ignore_row_if="either_value_is_missing"), _box_detail),
    ]


def reader_failures(data_root: Path) -> list[dict[str, Any]]:
    """Run the pipeline's own reader (medrega.sources.samed2d.iter_samples) over data that passed
    every expectation: an error it still raises is one the builders would hit."""
    try:
        for _ in iter_samples(data_root):
            pass
    except (ValueError, OSError) as exc:
        msg = str(exc)
        hit = re.search(r"((?:images|masks)/[^\s:'\"]+?\.png)", msg)
        file = hit.group(1) if hit else MAPPING_FILE
        return [{"file": file, "image": file if file.startswith("images/") else None, "rule": R_READER, "detail": msg}]
    return []


def _check(data_root: Path, cfg: ValidateConfig, docs_dir: Path) -> tuple[int, int, list, list, str | None]:
    """(images, masks, expectation results, failures, docs index)."""
    try:
        images, masks = build_frames(data_root, cfg)
    except IndexUnreadable as err:
        return 0, 0, [], [{"file": err.file, "image": None, "rule": err.rule or R_INDEX, "detail": err.detail}], None
    suites = {"images": (gx.numbered(images), image_rules(cfg)), "masks": (gx.numbered(masks), mask_rules(cfg))}
    results, hits, docs = gx.run(suites, "samed2d", docs_dir)
    failures = [{"file": h.suite, "image": None, "rule": h.rule, "detail": h.detail} if h.row is None else
                {"file": h.row["file"], "image": h.row.get("image", h.row["file"]), "rule": h.rule, "detail": h.detail}
                for h in hits]
    if not failures:
        failures = reader_failures(data_root)
    if images.empty and not failures:
        failures = [{"file": MAPPING_FILE, "image": None, "rule": R_INDEX, "detail": "no images listed"}]
    return len(images), len(masks), results, failures, docs and str(Path(docs))


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


def validate(data_root: Path, out_dir: Path, cfg: ValidateConfig) -> dict:
    """Validate the data under `data_root`; write `out_dir/report.json` and `out_dir/data_docs/`.
    Returns the report; raises ValidationFailed (after writing the report) when it fails."""
    data_root, out_dir = Path(data_root), Path(out_dir)
    docs_dir = out_dir.resolve() / "data_docs"  # GX wants an absolute base directory
    shutil.rmtree(docs_dir, ignore_errors=True)  # pages of earlier runs would linger in the index
    n_images, n_masks, expectations, failures, docs = _check(data_root, cfg, docs_dir)
    listed = {f["image"] for f in failures if f["image"]}
    tied = all(f["image"] for f in failures)  # a failure of the index or a whole frame fails the stage
    share = (len(listed) / n_images if n_images and tied else 1.0) if failures else 0.0
    failures.sort(key=lambda f: (str(f["image"] or f["file"]), str(f["file"]), f["rule"]))
    report = {
        "passed": bool(n_images) and share <= cfg.max_failure_share,
        "data_root": str(data_root),
        "n_images": n_images,
        "n_masks": n_masks,
        "n_failing_images": len(listed),
        "failure_share": share,
        "max_failure_share": cfg.max_failure_share,
        "limits": {"max_image_pixels": cfg.max_image_pixels, "min_mask_pixels": cfg.min_mask_pixels,
                   "max_image_side": cfg.max_image_side},
        "box_convention": "connected-component boxes of the mask, [x1, y1, x2, y2], x2/y2 exclusive, image pixels",
        "expectations": expectations,
        "failures": failures,
        "data_docs": docs,
    }
    report_path = out_dir / "report.json"
    io.write_json(report_path, report, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    if not report["passed"]:
        raise ValidationFailed(_failure_message(report_path, data_root, report), report_path, failures)
    return report
