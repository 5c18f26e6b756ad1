"""Region-Aligned Evaluation, SPEC §6 (the paper's Algorithm 1) for Text-to-Region answers.

Per sample: Hungarian matching of predicted to ground-truth boxes maximising total IoU,
then object (name), region (IoU >= threshold) and alignment (both) hits over the K matched
pairs; precision = hits / N predictions, recall = hits / M ground truths. Figures are
macro-averaged over samples. Unparseable answers are misses and are counted separately:
they are never turned into a [0, 0, 0, 0] box as the released evaluator did.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.optimize import linear_sum_assignment

from medrega.vocab import names_match
from medrega import io
from medrega.errors import BadInput
from medrega.grammar import parse_answer_regions, parse_regions

PRECISION_RECALL_NOTE = (
    "The paper's text swaps the words precision and recall; this report uses the standard "
    "meaning: precision = hits / predicted boxes, recall = hits / ground-truth boxes."
)
ACC_THRESHOLDS = (0.25, 0.5, 0.75)
# Among assignments of (numerically) equal total IoU, prefer pairs whose names match. The
# weight is far below any IoU difference that matters (total IoU given up < K * 1e-9), so
# this only settles ties, typically between boxes that overlap nothing (IoU 0).
_NAME_TIE_BREAK = 1e-9

SAMPLE_KEYS = tuple(
    f"{kind}_{m}" for kind in ("object", "region", "align") for m in ("precision", "recall", "f1")
) + ("iou",)


def iou(a, b) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes in any one coordinate system."""
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, ix) * max(0.0, iy)
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return float(inter / union) if union > 0 else 0.0


def _prf(hits: int, n: int, m: int) -> tuple[float, float, float]:
    p = hits / n if n else 0.0
    r = hits / m if m else 0.0
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return p, r, f


def _same_name(name_match, pred_name, gt_name) -> bool:
    # A box written without a <ref> names nothing, so it cannot detect an object.
    return pred_name is not None and gt_name is not None and bool(name_match(pred_name, gt_name))


def score_sample(
    pred,
    gt,
    name_match: Callable[[str, str], bool] = names_match,
    threshold: float = 0.5,
    extra_predictions: int = 0,
) -> dict:
    """Algorithm 1 on one sample. `pred`/`gt` are lists of (name, box).

    `extra_predictions` counts predicted boxes that could not be read (malformed); they can
    match nothing but still count in N, so emitting garbage never raises precision.
    With no ground truth (M = 0) every figure is 0: T2R samples always have a target.
    """
    n, m = len(pred) + extra_predictions, len(gt)
    out = {"n_pred": n, "n_gt": m, "matches": [], "best_iou": 0.0}
    hits = {"object": 0, "region": 0, "align": 0}
    total_iou = 0.0
    if pred and gt:
        # Sort predictions so the result cannot depend on the order the model wrote them in
        # (the assignment of exact ties would otherwise follow input order).
        pred = sorted(pred, key=lambda r: (list(r[1]), r[0] or ""))
        ious = np.array([[iou(p[1], g[1]) for g in gt] for p in pred], dtype=float)
        same = np.array([[_same_name(name_match, p[0], g[0]) for g in gt] for p in pred], dtype=bool)
        rows, cols = linear_sum_assignment(ious + _NAME_TIE_BREAK * same, maximize=True)
        for i, j in zip(rows, cols):
            v = float(ious[i, j])
            obj, reg = bool(same[i, j]), v >= threshold  # inclusive, SPEC §6 decision
            hits["object"] += obj
            hits["region"] += reg
            hits["align"] += obj and reg
            total_iou += v
            out["matches"].append({"pred": int(i), "gt": int(j), "iou": v, "name": obj,
                                   "pred_name": pred[i][0], "gt_name": gt[j][0]})
        out["best_iou"] = max(mt["iou"] for mt in out["matches"])
    for kind, h in hits.items():
        p, r, f = _prf(h, n, m)
        out[f"{kind}_precision"], out[f"{kind}_recall"], out[f"{kind}_f1"] = p, r, f
        out[f"{kind}_hits"] = h
    out["iou"] = total_iou / m if m else 0.0
    return out


def where(item: dict, idx: int) -> str:
    """Where an item came from, for error messages: `file:line` when read from a file
    (`read_answers` records it), else its 1-based position among the answers."""
    return item.get("_where") or f"answers item {idx + 1}"


def _acc_scope(samples: list[dict]) -> tuple[str | None, list[dict]]:
    """Which samples Acc@0.25/0.5/0.75 is taken over: SS (the paper's single-object
    single-region Acc) when there are SS samples, else the one setting all samples share
    (or every sample when none says its setting); mixed settings without SS: none."""
    settings = {s.get("groups", {}).get("setting") for s in samples}
    if "SS" in settings:
        return "SS", [s for s in samples if s.get("groups", {}).get("setting") == "SS"]
    if len(settings) <= 1:
        only = next(iter(settings), None)
        return (only or "all samples (no setting given)"), samples
    return None, []


def aggregate(samples: list[dict]) -> dict:
    """Macro averages of `score_item` samples, with parse failures, answers read from
    untagged boxes, and Acc@0.25/0.5/0.75 over one setting (`acc_scope`, SS first)."""
    n = len(samples)
    out = {"n": n, "parse_failures": sum(s["parse_failure"] for s in samples),
           "untagged_answers": sum(bool(s.get("untagged")) for s in samples)}
    for key in SAMPLE_KEYS:
        name = "mean_iou" if key == "iou" else key
        out[name] = sum(s[key] for s in samples) / n if n else 0.0
    scope, acc_samples = _acc_scope(samples)
    for t in ACC_THRESHOLDS:
        m = len(acc_samples)
        out[f"acc@{t}"] = (sum(s["best_iou"] >= t for s in acc_samples) / m if m else 0.0) if scope else None
    out["acc_scope"] = scope or "none: mixed settings without SS (see by_setting)"
    out["acc_n"] = len(acc_samples)
    return out


def score_item(item: dict, name_match: Callable[[str, str], bool] = names_match,
               threshold: float = 0.5, idx: int = 0) -> dict:
    """Algorithm 1 on one answer line (T2R, or the boxes of a grounded report)."""
    if not (item.get("width") and item.get("height")):
        raise BadInput(f"{where(item, idx)}: width and height are required (released format: \"hw\": [H, W])")
    truth = parse_regions(item.get("ground_truth"))
    if not truth.ok:
        raise BadInput(f"{where(item, idx)}: ground truth has no well-formed <ref>/<box> box: "
                         f"{item.get('ground_truth')!r}")
    # Tagged boxes, or, in an answer without any <box> tag, bare `name[[..]]` boxes (answers
    # decoded with special tokens skipped, SPEC §6): counted apart as `untagged_answers`.
    answer = parse_answer_regions(item.get("prediction"))
    # Not ok: counted as a failure; the readable boxes (if any) are still scored, and
    # unreadable ones count as predictions. No readable box at all means N valid = 0.
    s = score_sample(answer.regions, truth.regions, name_match, threshold, answer.n_invalid)
    s["parse_failure"] = not answer.ok
    s["untagged"] = answer.untagged and bool(answer.regions)
    s["groups"] = {k: item.get(k) for k in ("lang", "modality", "setting")}
    return s


_RELEASED_BOX_KEYS = ("answer", "gt")          # the authors' Text-to-Region records (+ "hw")
_RELEASED_TEXT_KEYS = ("pred_answer", "gt_answer")  # their R2T, report, VQA and cls records


def json_records(path) -> list[tuple[int, Any]]:
    """`(line, value)` for each record of a JSON-lines file or of a file holding one JSON array
    (the authors' format), told apart by the first character. Errors name the file, the 1-based
    line and the rule; an empty file is an error."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    start = len(text) - len(text.lstrip())
    if start == len(text):
        raise BadInput(f"{path}: empty answers file (no record to score)")
    def decode(at: int) -> tuple[Any, int]:
        try:
            return io.raw_decode_json(text, at, path)  # a key given twice names its line
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None

    records: list[tuple[int, Any]] = []
    if text[start] == "[":  # one JSON array
        value, end = decode(start)
        if text[end:].strip():
            line = text.count("\n", 0, len(text) - len(text[end:].lstrip())) + 1
            raise BadInput(f"{path}:{line}: text after the closing ] of the JSON array")
        # Walk the array again to know the line each record starts on.
        pos = start + 1
        for _ in value:
            while text[pos] in " \t\r\n,":
                pos += 1
            line = text.count("\n", 0, pos) + 1
            record, pos = decode(pos)
            records.append((line, record))
        if not records:
            raise BadInput(f"{path}: empty JSON array (no record to score)")
        return records
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((lineno, io.loads_json(line, path, lineno)))
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    return records


def _released_row(row: dict, here: str) -> dict:
    """One of the authors' records as a native item (their other keys are kept)."""
    if all(k in row for k in _RELEASED_BOX_KEYS):
        hw = row.pop("hw", None)
        if not (isinstance(hw, (list, tuple)) and len(hw) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in hw)):
            raise BadInput(f"{here}: \"hw\" must be [H, W], two positive numbers (height first), not {hw!r}")
        row["prediction"], row["ground_truth"] = row.pop("answer"), row.pop("gt")
        row["height"], row["width"] = hw
    elif all(k in row for k in _RELEASED_TEXT_KEYS):
        row["prediction"], row["ground_truth"] = row.pop("pred_answer"), row.pop("gt_answer")
    else:
        raise BadInput(f"{here}: not a MedRegA answer record: needs \"answer\", \"gt\", \"hw\" (Text-to-Region) "
                         f"or \"pred_answer\", \"gt_answer\" (other tasks); has {sorted(row)}")
    return row


def read_answers(path, format: str = "native") -> list[dict]:
    """Load answers as native items, each with `_where` ("file:line") for error messages.

    The file is JSON lines or one JSON array (the authors write arrays). native: keys
    question, prediction, ground_truth, width, height, task, lang, modality, setting.
    medrega: the authors' records, {"answer", "gt", "hw": [H, W]} for Text-to-Region (note
    the height-first order) or {"pred_answer", "gt_answer"} for the other tasks; any other
    keys on the record are kept.
    """
    if format not in ("native", "medrega"):
        raise BadInput(f"unknown answer format {format!r} (native or medrega)")
    items = []
    for lineno, row in json_records(path):
        here = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise BadInput(f"{here}: a record must be a JSON object, not {type(row).__name__}")
        if format == "medrega":
            row = _released_row(row, here)
        else:
            missing = {"prediction", "ground_truth"} - row.keys()
            if missing:
                hint = " (the authors' format? use --format medrega)" if "answer" in row or "pred_answer" in row else ""
                raise BadInput(f"{here}: missing keys {sorted(missing)}{hint}")
        row["_where"] = here
        items.append(row)
    return items
