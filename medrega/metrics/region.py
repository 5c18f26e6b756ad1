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
from typing import Callable

import numpy as np
from scipy.optimize import linear_sum_assignment

from medrega.vocab import names_match
from medrega.grammar import parse_regions
from medrega.errors import BadInput

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


def aggregate(samples: list[dict]) -> dict:
    """Macro averages of `score_item` samples, with parse failures and Acc@0.25/0.5/0.75."""
    n = len(samples)
    out = {"n": n, "parse_failures": sum(s["parse_failure"] for s in samples)}
    for key in SAMPLE_KEYS:
        name = "mean_iou" if key == "iou" else key
        out[name] = sum(s[key] for s in samples) / n if n else 0.0
    for t in ACC_THRESHOLDS:
        out[f"acc@{t}"] = sum(s["best_iou"] >= t for s in samples) / n if n else 0.0
    return out


def score_item(item: dict, name_match: Callable[[str, str], bool] = names_match,
               threshold: float = 0.5, idx: int = 0) -> dict:
    """Algorithm 1 on one answer line (T2R, or the boxes of a grounded report)."""
    if not (item.get("width") and item.get("height")):
        raise BadInput(f"item {idx}: width and height are required")
    truth = parse_regions(item.get("ground_truth"))
    if not truth.ok:
        raise BadInput(f"item {idx}: ground truth has no well-formed box: {item.get('ground_truth')!r}")
    answer = parse_regions(item.get("prediction"))
    # Not ok: counted as a failure; the readable boxes (if any) are still scored, and
    # unreadable ones count as predictions. No readable box at all means N valid = 0.
    s = score_sample(answer.regions, truth.regions, name_match, threshold, answer.n_invalid)
    s["parse_failure"] = not answer.ok
    s["groups"] = {k: item.get(k) for k in ("lang", "modality", "setting")}
    return s


def read_answers(path, format: str = "native") -> list[dict]:
    """Load answer JSON lines as native items.

    native: keys question, prediction, ground_truth, width, height, task, lang, modality,
    setting. medrega: the released evaluator's lines {"answer", "gt", "hw": [H, W]} (note
    the height-first order); any other keys on the line are kept.
    """
    if format not in ("native", "medrega"):
        raise BadInput(f"unknown answer format {format!r}")
    items = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if format == "medrega":
            try:
                h, w = row.pop("hw")
                row["prediction"] = row.pop("answer")
                row["ground_truth"] = row.pop("gt")
            except (KeyError, TypeError, ValueError) as e:
                raise BadInput(f"{path}:{lineno}: not a MedRegA answer line ({e})") from e
            row["height"], row["width"] = h, w
        else:
            missing = {"prediction", "ground_truth"} - row.keys()
            if missing:
                raise BadInput(f"{path}:{lineno}: missing keys {sorted(missing)}")
        items.append(row)
    return items
