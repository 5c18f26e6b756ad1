"""The authors' released evaluation protocol (`--protocol release`), defects included.

This reproduces what the evaluators in xmed-lab/MedRegA `src/eval/` print for a given answers
file, key for key, so a figure can be compared with the paper's. It is written from what those
scripts do (facts: formulas, thresholds, parsing rules, key names), not from their code, and it
keeps every behaviour we consider wrong, because the point is to match their numbers; our own
protocol (`medrega.metrics.region` / `scoring`, the default) corrects them. Every difference,
its measured effect and why ours differs: docs/evaluation-protocols.md.

Scripts reproduced (one per task and setting; ours -> theirs):
- Text-to-Region `regt2r/evaluate_regt2r_{ss,sm,ms,mm}.py` + `evaluator_reg.py`. Their file names
  put the REGION count first: their `sm` (single region, multi object) is our MS and their `ms`
  (multi region, single object) is our SM (`SCRIPTS`).
- Region-to-Text `regr2t/evaluate_regr2t.py` + `evaluator.py`.
- Report generation `rg/evalute_rg.py` (English) and `rg/evaluate_rg_zh.py` (Chinese) + `evaluator_rg.py`.
- VQA `vqa/evaluate_vqa.py` + `evaluator.py`; classification `cls/evaluate_cls.py` + `evaluator.py`.
They ship no grounded-report or captioning evaluator.

Where their script would stop with an exception instead of printing figures, `ReleaseError`
says so and names the file, the record and the reason. Functions here are pure: every option
is an explicit argument.
"""
from __future__ import annotations

import ast
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

PROTOCOL = "release"
SOURCE = "xmed-lab/MedRegA src/eval"
SETTINGS = ("SS", "SM", "MS", "MM")

# Our setting -> the authors' script that scores it (their names are region-first).
SCRIPTS = {
    "SS": "regt2r/evaluate_regt2r_ss.py",  # single region, single object
    "SM": "regt2r/evaluate_regt2r_ms.py",  # their "multi region, single object" = our single object, multi region
    "MS": "regt2r/evaluate_regt2r_sm.py",  # their "single region, multi object" = our multi object, single region
    "MM": "regt2r/evaluate_regt2r_mm.py",
}
TASK_SCRIPTS = {
    "r2t": "regr2t/evaluate_regr2t.py",
    "report": {"en": "rg/evalute_rg.py", "zh": "rg/evaluate_rg_zh.py"},
    "vqa": "vqa/evaluate_vqa.py",
    "cls": "cls/evaluate_cls.py",
}
NOT_SHIPPED = {
    "grounded": "not computed: the authors ship no grounded-report evaluator",
    "caption": "not computed: the authors ship no captioning evaluator",
}
# The keys each script prints, in its order (their nested SM/MM groups flattened).
KEYS = {
    "SS": ("acc25", "acc50", "acc75", "iou"),
    "MS": ("precision", "recall", "f1", "iou"),
    "SM": ("box_acc", "box_iou", "object_acc", "object_iou", "object_box_acc", "object_box_alignment",
           "object_box_detection"),
    "MM": ("box_pre", "box_recall", "box_f1", "box_iou", "object_pre", "object_rec", "object_f1", "object_iou",
           "object_box_pre", "object_box_recall", "object_box_f1", "object_box_alignment", "object_box_detection"),
    "r2t": ("bleu1", "F1", "recall", "accuracy", "bertscore"),
    "report_en": ("bleu1", "bleu4", "meteor", "rouge1", "rougeL"),
    "report_zh": ("bleu1", "bleu4", "F1_bertscore", "meteor", "rouge1", "rougeL"),
    "vqa_en": ("bleu1", "F1", "recall", "closedQuestionsAccuracy", "openQuestionsRecall", "openQuestionsAccuracy",
               "bertScore"),
    "vqa_zh": ("bleu1", "F1", "recall", "closedQuestionsAccuracy", "openQuestionsRecall", "openQuestionsAccuracy",
               "BertScore"),
    "cls": ("F1-macro", "Accuracy"),
}
GRID = 999  # their BBOX_SCALE
BERTSCORE_NOT_COMPUTED = "not computed (needs model weights: give the bertscore plug-in a local model)"


class ReleaseError(ValueError):
    """Input on which the authors' script stops with an exception instead of printing figures."""


def _where(record: dict, idx: int) -> str:
    return record.get("_where") or f"record {idx + 1}"


def _mean(values: list[float]) -> float:
    # Python's left-to-right sum, as theirs (np.mean's pairwise sum differs in the last bits).
    return sum(values) / len(values)


# --- files ------------------------------------------------------------------------------------

_THEIR_KEYS = {"t2r": ("answer", "gt", "hw")}
_TEXT_KEYS = ("pred_answer", "gt_answer")


def as_release_record(row: dict, task: str) -> dict:
    """One answer as the authors' scripts read it: `{"answer", "gt", "hw": [H, W]}` for
    Text-to-Region, `{"pred_answer", "gt_answer"}` otherwise. Their records pass as they are;
    our native items (prediction, ground_truth, width, height) are converted."""
    if task == "t2r":
        if "answer" in row or "gt" in row or "hw" in row:
            return row
        out = {"answer": row.get("prediction"), "gt": row.get("ground_truth"), "hw": [row.get("height"), row.get("width")]}
    else:
        if "pred_answer" in row or "gt_answer" in row:
            return row
        out = {"pred_answer": row.get("prediction"), "gt_answer": row.get("ground_truth")}
    for k in ("_where", "lang", "setting"):
        if k in row:
            out[k] = row[k]
    return out


def read_release_files(paths: Sequence[str | Path], task: str) -> list[list[dict]]:
    """The records of each file (their JSON array, or JSON lines), each with `_where`."""
    from medrega.metrics.region import json_records

    out = []
    for path in paths:
        records = []
        for line, row in json_records(path):
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line}: a record must be a JSON object, not {type(row).__name__}")
            rec = as_release_record(row, task)
            rec["_where"] = f"{path}:{line}"
            records.append(rec)
        out.append(records)
    return out


def dataset_name(path: str | Path) -> str:
    """Their dataset name of an answers file: the first two `_`-separated parts of its name
    (`slake_zh_test_0731.json` -> `slake_zh`); VQA picks Chinese when it holds "zh", and
    classification picks the class list by it."""
    return "_".join(Path(path).name.split("_")[0:2])


def _field(record: dict, key: str, idx: int, what: str):
    if key not in record:
        raise ReleaseError(f"{_where(record, idx)}: no {key!r} ({what}); the authors' script stops (KeyError)")
    return record[key]


# --- Text-to-Region: their box reading -------------------------------------------------------

_COORDS = r"\[\d+,\s*\d+,\s*\d+,\s*\d+\]"
# A box list `[[a, b, c, d], [..]]` and, before it, the run of text without brackets that they
# take as its object's name (lower-cased, tags and all: "<ref>liver</ref><box>", ", spleen").
_ANSWER_GROUP = re.compile(rf"([^\[\]]*)(\[{_COORDS}(?:,\s*{_COORDS})*\])")
_TRUTH_GROUP = re.compile(r"<ref>(.*?)</ref><box>(.*?)</box>")  # no DOTALL: a name cannot span lines
_TORCH_LONG_MAX = 2 ** 63  # a coordinate torch cannot turn into a tensor


@dataclass
class ReleaseAnswer:
    """An answer as their scripts read it."""
    boxes: list[list[int]] = field(default_factory=list)   # grid integers, in reading order
    group_names: list[str] = field(default_factory=list)   # one raw name per box list (SM indexes by these)
    box_names: list[str] = field(default_factory=list)     # one per box (MM)
    zero_box: bool = False  # their fallback: [0, 0, 0, 0] appended after an error, with no name


def read_release_answer(answer: Any) -> ReleaseAnswer:
    """Their prediction reading: every `[[..]]` list of non-negative integer boxes, named by the raw
    text before it. An answer that is not text (null) gives the fallback box [0, 0, 0, 0]; so does
    a list their `ast.literal_eval` rejects (non-ASCII digits), after the lists read before it. Text
    without such a list gives no box at all (not a zero box)."""
    out = ReleaseAnswer()
    if not isinstance(answer, str):
        out.zero_box = True
        return out
    for m in _ANSWER_GROUP.finditer(answer):
        try:
            boxes = [list(b) for b in ast.literal_eval(m.group(2))]
        except (ValueError, SyntaxError):
            out.zero_box = True
            return out
        if any(v >= _TORCH_LONG_MAX for b in boxes for v in b):
            out.zero_box = True
            return out
        name = m.group(1).lower()
        out.boxes.extend(boxes)
        out.group_names.append(name)
        out.box_names.extend([name] * len(boxes))
    return out


def read_release_truth(gt: Any, where: str) -> tuple[list[list[float]], list[str], list[str]]:
    """Their ground-truth reading: `<ref>name</ref><box>[[..]]</box>` groups only. Returns the
    boxes (first four numbers of each), one lower-cased name per group and one per box."""
    if not isinstance(gt, str):
        raise ReleaseError(f"{where}: ground truth is {type(gt).__name__}, not text; the authors' script stops (TypeError)")
    boxes, group_names, box_names = [], [], []
    for m in _TRUTH_GROUP.finditer(gt):
        try:
            value = ast.literal_eval(m.group(2))
            got = []
            for b in value:
                b = list(b)
                if not b or len(b) % 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b):
                    raise ValueError(b)
                got.append(b[:4])
        except (ValueError, SyntaxError, TypeError) as err:
            raise ReleaseError(f"{where}: ground-truth box {m.group(2)!r} cannot be read; the authors' script "
                               f"stops ({type(err).__name__})") from None
        name = m.group(1).lower()
        boxes.extend(got)
        group_names.append(name)
        box_names.extend([name] * len(got))
    return boxes, group_names, box_names


def _hw(record: dict, idx: int) -> tuple[float, float]:
    hw = _field(record, "hw", idx, "[H, W]")
    try:
        h, w = hw[0], hw[1]
        float(h), float(w)
    except (TypeError, IndexError, KeyError, ValueError):
        raise ReleaseError(f"{_where(record, idx)}: \"hw\" {hw!r} is not [H, W]; the authors' script stops") from None
    return h, w


def scale_boxes(boxes: list[list[float]], width: float, height: float) -> np.ndarray:
    """Grid boxes -> pixels in float32, as their `process_box`: v / 999, then x * W and y * H."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) / np.float32(GRID)
    b[:, 0::2] *= np.float32(width)
    b[:, 1::2] *= np.float32(height)
    return b


def iou_matrix32(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of every predicted box with every ground-truth box, computed in float32 as theirs
    (torchvision's box area; (area_p + area_g) - intersection), returned as float64 values.
    A value that is exactly 0.5 in float32 fails their `> 0.5`; one that rounds above passes."""
    with np.errstate(all="ignore"):
        area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
        area_g = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
        lt = np.maximum(pred[:, None, :2], gt[None, :, :2])
        rb = np.minimum(pred[:, None, 2:], gt[None, :, 2:])
        wh = np.maximum(rb - lt, np.float32(0))
        inter = wh[:, :, 0] * wh[:, :, 1]
        union = area_p[:, None] + area_g[None, :] - inter
        return (inter / union).astype(np.float64)


def _match(ious: np.ndarray, where: str) -> list[tuple[int, int]]:
    """Their Hungarian matching: scipy's linear_sum_assignment on the cost 1 - IoU."""
    try:
        rows, cols = linear_sum_assignment(1.0 - ious)
    except ValueError as err:  # NaN IoU (a zero-area box against a zero-area box)
        raise ReleaseError(f"{where}: IoU matrix cannot be matched ({err}); the authors' script stops") from None
    return [(int(r), int(c)) for r, c in zip(rows, cols)]


def name_rule(pred: str, truth: str) -> bool:
    """Their object rule: the raw predicted name is empty, or either text contains the other."""
    return pred == "" or pred in truth or truth in pred


@dataclass
class _Sample:
    where: str
    answer: ReleaseAnswer
    pred: np.ndarray          # float32 pixels, the zero box last when their fallback applied
    gt: np.ndarray
    gt_group_names: list[str]
    gt_box_names: list[str]
    ious: np.ndarray          # float64 values of float32 IoUs, pred x gt


def _t2r_samples(records: list[dict]) -> list[_Sample]:
    out = []
    for idx, rec in enumerate(records):
        where = _where(rec, idx)
        h, w = _hw(rec, idx)
        answer = read_release_answer(_field(rec, "answer", idx, "the model's answer"))
        gt_boxes, gt_groups, gt_box_names = read_release_truth(_field(rec, "gt", idx, "the ground truth"), where)
        pred = scale_boxes(answer.boxes, w, h) if answer.boxes else np.zeros((0, 4), np.float32)
        if answer.zero_box:
            pred = np.vstack([pred, np.zeros((1, 4), np.float32)])
        gt = scale_boxes(gt_boxes, w, h) if gt_boxes else np.zeros((0, 4), np.float32)
        out.append(_Sample(where, answer, pred, gt, gt_groups, gt_box_names, iou_matrix32(pred, gt)))
    if not out:
        raise ReleaseError("no records: the authors' script divides by zero")
    return out


def _printed(v: float) -> float:
    """Their SS script prints '{:.4f}' strings; the figure as printed."""
    return float(f"{v:.4f}")


def t2r_ss(records: list[dict]) -> dict:
    """`evaluate_regt2r_ss.py` (our SS). Per sample the IoU of the FIRST predicted box with the
    FIRST ground-truth box, or, when there are more predictions than ground-truth boxes, the best
    of every prediction against the first ground truth (0 with no prediction); Acc@t counts
    IoU > t (strict, float32); names are ignored. Figures rounded to 4 decimals as printed."""
    samples = _t2r_samples(records)
    best = []
    for s in samples:
        n, m = len(s.pred), len(s.gt)
        if n and not m:
            raise ReleaseError(f"{s.where}: ground truth has no <ref>..</ref><box>..</box> box; "
                               "the authors' SS script stops (IndexError)")
        v = 0.0
        if n > m:
            for i in range(n):
                if s.ious[i, 0] > v:
                    v = float(s.ious[i, 0])
        elif n:
            v = float(s.ious[0, 0])
        best.append(v)
    k = len(samples)
    return {"acc25": _printed(sum(v > 0.25 for v in best) / k), "acc50": _printed(sum(v > 0.5 for v in best) / k),
            "acc75": _printed(sum(v > 0.75 for v in best) / k), "iou": _printed(sum(best) / len(best))}


def t2r_ms(records: list[dict]) -> dict:
    """`evaluate_regt2r_sm.py` (their single-region multi-object = our MS). Names are ignored:
    a matched pair is a hit when its IoU >= 0.75. `precision` = hits / ground-truth boxes and
    `recall` = hits / predicted boxes (their swap), macro over samples; `iou` = the sum of IoU
    over matched pairs / the number of matched pairs, over the whole file."""
    pre, rec, f1 = [], [], []
    iou_sum, pairs_n = 0.0, 0
    for s in _t2r_samples(records):
        pairs = _match(s.ious, s.where)
        hits = sum(bool(s.ious[r, c] >= 0.75) for r, c in pairs)
        m, n = len(s.gt), len(s.pred)
        p = hits / m if m else 0
        r = hits / n if n else 0
        pre.append(p)
        rec.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0)
        iou_sum += sum(float(s.ious[i, j]) for i, j in pairs)
        pairs_n += len(pairs)
    if not pairs_n:
        raise ReleaseError("no matched pair in the whole file (no answer has a box): the authors' MS script divides "
                           "by zero for its iou")
    return {"precision": _mean(pre), "recall": _mean(rec), "f1": _mean(f1), "iou": iou_sum / pairs_n}


def t2r_sm(records: list[dict]) -> dict:
    """`evaluate_regt2r_ms.py` (their multi-region single-object = our SM). Pairs at IoU >= 0.5
    are box hits. Its object check indexes the matched pair's BOX numbers into names kept per
    box LIST (one per object), so only pairs whose predicted box number is below the number of
    lists read and whose ground-truth box number is below the number of ground-truth objects are
    looked at: a perfect two-box answer (one list, two boxes) has object accuracy 0.5."""
    box_acc, object_acc, ob_acc, ob_align, ob_detect = [], [], [], [], []
    box_iou_sum, gt_total, ob_iou_sum, ob_total = 0.0, 0, 0.0, 0
    for s in _t2r_samples(records):
        pairs = _match(s.ious, s.where)
        hits = [(r, c) for r, c in pairs if bool(s.ious[r, c] >= 0.5)]
        names_p, names_g = s.answer.group_names, s.gt_group_names

        def looked_at(r: int, c: int) -> bool:
            return r < len(names_p) and c < len(names_g)

        aligned = sum(bool(looked_at(r, c) and name_rule(names_p[r], names_g[c])) for r, c in hits)
        m = len(s.gt)
        if not m:
            raise ReleaseError(f"{s.where}: ground truth has no <ref>..</ref><box>..</box> box; the authors' SM script "
                               "divides by zero")
        box_acc.append(len(hits) / m)
        box_iou_sum += sum(float(s.ious[r, c]) for r, c in pairs)
        gt_total += m
        ob_acc.append(aligned / m)
        ob_align.append(aligned / len(hits) if hits else 0)
        named = 0
        for r, c in pairs:
            if looked_at(r, c):
                named += name_rule(names_p[r], names_g[c])
                ob_iou_sum += float(s.ious[r, c])
        ob_total += named
        object_acc.append(named / m)
        ob_detect.append(aligned / named if named else 0)
    if not ob_total:
        raise ReleaseError("no pair passes their object check in the whole file: the authors' SM script divides by "
                           "zero for object_iou")
    return {"box_acc": _mean(box_acc), "box_iou": box_iou_sum / gt_total, "object_acc": _mean(object_acc),
            "object_iou": ob_iou_sum / ob_total, "object_box_acc": _mean(ob_acc),
            "object_box_alignment": _mean(ob_align), "object_box_detection": _mean(ob_detect)}


def t2r_mm(records: list[dict]) -> dict:
    """`evaluate_regt2r_mm.py` (our MM). Names per box; pairs at IoU >= 0.5 are box hits; `*_pre`
    = hits / ground-truth boxes and `*_recall`/`*_rec` = hits / predicted boxes (their swap);
    `box_iou` = IoU summed over matched pairs / ground-truth boxes over the whole file;
    `object_iou` = IoU over name-matched pairs / their number. A null answer (the unnamed
    fallback box) makes their script stop (KeyError)."""
    keys = KEYS["MM"]
    acc: dict[str, list[float]] = {k: [] for k in keys if k not in ("box_iou", "object_iou")}
    box_iou_sum, gt_total, ob_iou_sum, ob_total = 0.0, 0, 0.0, 0
    for s in _t2r_samples(records):
        pairs = _match(s.ious, s.where)
        names_p, names_g = s.answer.box_names, s.gt_box_names

        def same(r: int, c: int) -> bool:
            if r >= len(names_p):
                raise ReleaseError(f"{s.where}: the answer is not text (their fallback box has no name); the authors' "
                                   "MM script stops (KeyError)")
            return name_rule(names_p[r], names_g[c])

        hits = [(r, c) for r, c in pairs if s.ious[r, c] >= 0.5]
        aligned = sum(same(r, c) for r, c in hits)
        m, n = len(s.gt), len(s.pred)
        if not m:
            raise ReleaseError(f"{s.where}: ground truth has no <ref>..</ref><box>..</box> box; the authors' MM script "
                               "divides by zero")
        bp, br = len(hits) / m, (len(hits) / n if n else 0)
        acc["box_pre"].append(bp)
        acc["box_recall"].append(br)
        acc["box_f1"].append(2 * bp * br / (bp + br) if bp + br else 0)
        box_iou_sum += sum(float(s.ious[r, c]) for r, c in pairs)
        gt_total += m
        ag, ap = aligned / m, (aligned / n if n else 0)
        acc["object_box_pre"].append(ag)
        acc["object_box_recall"].append(ap)
        acc["object_box_f1"].append(2 * ap * ag / (ag + ap) if ag + ap else 0)
        acc["object_box_alignment"].append(aligned / len(hits) if hits else 0)
        named = 0
        for r, c in pairs:
            if same(r, c):
                named += 1
                ob_iou_sum += float(s.ious[r, c])
        ob_total += named
        op, orc = named / m, (named / n if n else 0)
        acc["object_pre"].append(op)
        acc["object_rec"].append(orc)
        acc["object_f1"].append(2 * op * orc / (op + orc) if op + orc else 0)
        acc["object_box_detection"].append(aligned / named if named else 0)
    out = {k: _mean(v) for k, v in acc.items()}
    out["box_iou"] = box_iou_sum / gt_total
    out["object_iou"] = ob_iou_sum / ob_total if ob_total else 0
    return {k: out[k] for k in keys}


T2R = {"SS": t2r_ss, "SM": t2r_sm, "MS": t2r_ms, "MM": t2r_mm}


# --- text helpers -------------------------------------------------------------------------------

def bleu1_f32(prediction: str, reference: str) -> float:
    """torchmetrics' BLEUScore(n_gram=1) of one pair as they call it: whitespace tokens, clipped
    unigram precision times the brevity penalty exp(1 - r/c) unless c > r, in float32; 0 when
    nothing matches."""
    p = prediction.split() if prediction else []
    r = reference.split() if reference else []
    clipped = sum((Counter(p) & Counter(r)).values())
    if clipped == 0:
        return 0.0
    f = np.float32
    with np.errstate(all="ignore"):
        geo = np.exp(f(1.0) * np.log(f(clipped) / f(len(p))))
        bp = f(1.0) if len(p) > len(r) else np.exp(f(1.0) - f(len(r)) / f(len(p)))
        return float(bp * geo)


def _token_prf(pred: set, truth: set) -> tuple[float, float, float]:
    common = len(pred & truth)
    p = common / len(pred) if pred else 0
    r = common / len(truth) if truth else 0
    return p, r, 2 * (p * r) / (p + r + 1e-8)


def _word_set(text: str) -> set[str]:
    return set(text.split()) - {""}


def _text(record: dict, key: str, idx: int) -> str:
    v = _field(record, key, idx, "answer text")
    if not isinstance(v, str):
        raise ReleaseError(f"{_where(record, idx)}: {key!r} is {type(v).__name__}, not text; the authors' script stops "
                           "(AttributeError)")
    return v


def _bertscore(bertscore: Any, preds: list[str], refs: list[str]):
    """Their BERTScore F1 (idf weights from the predictions, no rescaling) through our plug-in."""
    if bertscore is None:
        return BERTSCORE_NOT_COMPUTED
    scores = bertscore.score(preds, refs, idf_from=preds)
    return sum(s["f1"] for s in scores) / len(scores)


_BOX_TEXT = re.compile(r"\[\[.*?\]\]")


def r2t(records: list[dict], bertscore: Any = None) -> dict:
    """`regr2t/evaluate_regr2t.py`: lower-cased answers without `[[..]]`, sets of whitespace words;
    accuracy = word recall >= 0.75; BLEU-1 per pair (float32), macro; files merged."""
    bleu, f1s, recs, preds, refs, correct = [], [], [], [], [], 0
    for idx, rec in enumerate(records):
        gt = _text(rec, "gt_answer", idx).lower()
        res = _BOX_TEXT.sub("", _text(rec, "pred_answer", idx).lower())
        preds.append(res)
        refs.append(gt)
        p, r, f = _token_prf(_word_set(res), _word_set(gt))
        bleu.append(bleu1_f32(res, gt))
        f1s.append(f)
        recs.append(r)
        correct += r >= 0.75
    n = len(recs)
    return {"bleu1": sum(bleu) / n if n else 0, "F1": sum(f1s) / n if n else 0, "recall": sum(recs) / n if n else 0,
            "accuracy": correct / n if n else 0, "bertscore": _bertscore(bertscore, preds, refs) if n else 0}


# VQA clean-up of their `vqa/postprocess_utils.py`: split at , : . and drop parts holding "_",
# rejoin with ","; lower-case; expand a few words; "-" becomes a space. Periods and colons turn
# into commas that stay glued to words: "Yes." is the word "yes," and misses the truth "yes".
_VQA_WORDS = {"pa": "posterior anterior", "ivc": "inferior vena cava", "head": "brain", "both": "bilateral",
              "tumour": "tumor", "tumours": "tumors"}
_VQA_SPLIT = re.compile(r"[,:.]")


def clean_vqa(text: str) -> str:
    text = ",".join(p for p in _VQA_SPLIT.split(text) if "_" not in p).lower()
    parts = [p for p in _VQA_SPLIT.split(text) if "_" not in p]
    return ",".join(" ".join(_VQA_WORDS.get(w, w) for w in p.split(" ")) for p in parts).replace("-", " ")


def _jieba():
    try:
        import jieba
    except ImportError as err:  # a declared dependency; only a broken install lacks it
        raise ReleaseError("the authors' Chinese scores segment words with jieba, which is not installed") from err
    import logging

    jieba.setLogLevel(logging.WARNING)
    return jieba


def vqa(records: list[dict], lang: str, bertscore: Any = None) -> dict:
    """`vqa/evaluate_vqa.py`. English: both sides cleaned (`clean_vqa`), whitespace word sets; a
    question is closed when the cleaned truth is "yes"/"no", right when word recall >= 0.8.
    Chinese: raw text, jieba word sets; a question is closed when the PREDICTION is "yes"/"no"
    (English), right when recall >= 0.4 ("not" added to a truth of just "no"). Open questions:
    mean recall and accuracy (recall >= 0.75). A file without an open question stops their script."""
    zh = lang == "zh"
    cut = _jieba().cut if zh else None
    bleu, f1s, recs, closed, closed_ok, preds, refs = [], [], [], [], 0, [], []
    for idx, rec in enumerate(records):
        gt, res = _text(rec, "gt_answer", idx), _text(rec, "pred_answer", idx)
        if zh:
            pred_t, true_t = set(cut(res)) - {""}, set(cut(gt)) - {""}
            bleu.append(bleu1_f32(" ".join(cut(res)), " ".join(cut(gt))))
            preds.append(res)
            refs.append(gt)
        else:
            gt, res = clean_vqa(gt), clean_vqa(res)
            pred_t, true_t = _word_set(res), _word_set(gt)
            bleu.append(bleu1_f32(res, gt))
            preds.append(res)
            refs.append(gt)
        _, r, f = _token_prf(pred_t, true_t)
        f1s.append(f)
        recs.append(r)
        is_closed = (res in ("yes", "no")) if zh else (gt in ("yes", "no"))
        closed.append(is_closed)
        if is_closed:
            if zh and true_t == {"no"}:
                true_t = true_t | {"not"}
            rr = len(pred_t & true_t) / len(true_t) if true_t else 0
            closed_ok += rr >= (0.4 if zh else 0.8)
    open_recall = [recs[i] for i, c in enumerate(closed) if not c]
    if not open_recall:
        raise ReleaseError("no open question in the file: the authors' VQA script stops (NameError: "
                           "openQuestionsRecall is only defined once an open question is seen)")
    n = len(recs)
    out = {"bleu1": sum(bleu) / n, "F1": sum(f1s) / n, "recall": sum(recs) / n,
           "closedQuestionsAccuracy": closed_ok / sum(closed) if sum(closed) else 0,
           "openQuestionsRecall": sum(open_recall) / len(open_recall),
           "openQuestionsAccuracy": sum(r >= 0.75 for r in open_recall) / len(open_recall)}
    out["BertScore" if zh else "bertScore"] = _bertscore(bertscore, preds, refs)
    return out


# --- report generation ----------------------------------------------------------------------------

_RG_SPLIT = re.compile(r"[,:.\n]")


def clean_report_en(text: str) -> str:
    """Their English report clean-up: lower-case, split at , : . and newlines, drop empty parts and
    parts holding "_", rejoin with "." (commas and colons become periods), squeeze spaces."""
    parts = [p.strip() for p in _RG_SPLIT.split(text.lower())]
    return re.sub(r"\s+", " ", ".".join(p for p in parts if p and "_" not in p)).strip()


def clean_report_zh(text: str) -> str:
    """Their Chinese report clean-up (answers only): drop `[..]` spans and stray brackets, drop
    "-", drop `<digits>.` (list numbers, and the integer part of decimals: "3.5cm" -> "5cm"), join
    the non-empty lines with "，". The evaluator then removes every space."""
    text = re.sub(r"\[.*?\]", "", text).replace("[", " ").replace("]", "").replace("-", "")
    parts = [re.sub(r"\d+\.", "", p).strip() for p in text.lower().split("\n")]
    return "，".join(p for p in parts if p).replace("：，", "：").replace("。，", "，")


def hf_bleu(predictions: list[str], references: list[str], order: int) -> float:
    """Hugging Face `evaluate`'s "bleu" (corpus BLEU, 13a tokens, no smoothing) through sacrebleu,
    which computes the same with the same tokenizer. Theirs raises ZeroDivisionError when the
    predictions or the references hold no token; so does this."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = Tokenizer13a()
    if not sum(len(tok(p.rstrip()).split()) for p in predictions) or not sum(len(tok(r.rstrip()).split()) for r in references):
        raise ZeroDivisionError("BLEU of texts without a token")
    bleu = BLEU(max_ngram_order=order, tokenize="13a", smooth_method="none")
    return bleu.corpus_score(predictions, [references]).score / 100.0


def _word_tokenize():
    """nltk's word_tokenize as theirs calls it; it needs nltk's punkt sentence model, which we never
    download: without it, the same tokenizer on the whole text (sentences are not split first)."""
    import nltk
    from nltk.tokenize import word_tokenize

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return word_tokenize, "nltk word_tokenize"
    except LookupError:
        return (lambda t: word_tokenize(t, preserve_line=True)), \
            "nltk word_tokenize without punkt sentence splitting (punkt_tab not on disk)"


def _meteor(pairs: Iterable[tuple[list[str], list[str]]], wordnet: Any):
    from nltk.translate.meteor_score import meteor_score

    scores = [float(meteor_score([ref], hyp, wordnet=wordnet)) for ref, hyp in pairs]
    return sum(scores) / len(scores)


def report(records: list[dict], lang: str, wordnet: Any = None, bertscore: Any = None,
           rouge_seed: int = 0) -> dict:
    """`rg/evalute_rg.py` (en) or `rg/evaluate_rg_zh.py` (zh), one file.

    English: both sides cleaned (`clean_report_en`); BLEU-1/4 over the whole file; ROUGE-1/L by
    rouge-score's bootstrap aggregate (median of 1000 resampled means: theirs is unseeded, so
    random in the last digits; seeded here); METEOR per pair on word_tokenize tokens, mean.
    Chinese: answers cleaned (`clean_report_zh`), truths raw; BLEU-1/4 per pair on jieba words
    (0 when a side is empty); ROUGE on jieba words with rouge-score's default tokenizer, which
    keeps only [a-z0-9] so Chinese characters are not scored, and its rouge1 and rougeL are
    printed under each other's name; METEOR on jieba words; BERTScore F1 through the plug-in.
    """
    from rouge_score import rouge_scorer, scoring

    if not records:
        raise ReleaseError("no records: the authors' report script divides by zero")
    gts = [_text(r, "gt_answer", i) for i, r in enumerate(records)]
    ress = [_text(r, "pred_answer", i) for i, r in enumerate(records)]
    meteor_note = None
    if lang == "zh":
        cut = _jieba().cut
        ress = [clean_report_zh(r).replace(" ", "") for r in ress]
        seg_g, seg_r = [" ".join(cut(g)) for g in gts], [" ".join(cut(r)) for r in ress]
        b1, b4, r1, rl = [], [], [], []
        scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
        for g, r in zip(seg_g, seg_r):
            try:
                b1.append(hf_bleu([r], [g], 1))
                b4.append(hf_bleu([r], [g], 4))
            except ZeroDivisionError:
                b1.append(0)
                b4.append(0)
            s = scorer.score(g, r)
            r1.append(s["rouge1"].fmeasure)
            rl.append(s["rougeL"].fmeasure)
        meteor = (_meteor(((list(cut(g)), list(cut(r))) for g, r in zip(gts, ress)), wordnet)
                  if wordnet is not None else None)
        out = {"bleu1": _mean(b1), "bleu4": _mean(b4), "F1_bertscore": _bertscore(bertscore, ress, gts),
               "meteor": meteor, "rouge1": _mean(rl), "rougeL": _mean(r1)}  # their swap
    else:
        gts, ress = [clean_report_en(g) for g in gts], [clean_report_en(r) for r in ress]
        try:
            b1, b4 = hf_bleu(ress, gts, 1), hf_bleu(ress, gts, 4)
        except ZeroDivisionError:
            raise ReleaseError("every answer or every reference is empty after their clean-up: the authors' "
                               "English report script stops (ZeroDivisionError in BLEU)") from None
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"])
        agg = scoring.BootstrapAggregator()
        for g, r in zip(gts, ress):
            agg.add_scores(scorer.score(g, r))
        state = np.random.get_state()
        np.random.seed(rouge_seed)
        try:
            res = agg.aggregate()
        finally:
            np.random.set_state(state)
        meteor = None
        if wordnet is not None:
            tokenize, meteor_note = _word_tokenize()
            meteor = _meteor(((tokenize(g), tokenize(r)) for g, r in zip(gts, ress)), wordnet)
        out = {"bleu1": b1, "bleu4": b4, "meteor": meteor, "rouge1": float(res["rouge1"].mid.fmeasure),
               "rougeL": float(res["rougeL"].mid.fmeasure)}
    if out["meteor"] is None:
        from medrega.metrics.report import METEOR_UNAVAILABLE

        out["meteor"] = METEOR_UNAVAILABLE
    if meteor_note:
        out["meteor_tokenizer"] = meteor_note
    return out


# --- classification -------------------------------------------------------------------------------

# The class list of each public benchmark, as their classification script lists it (order
# matters: the first best-scoring class wins), keyed by their dataset name.
_NO_FINDING = "No Finding"
CLASS_LISTS: dict[str, tuple[str, ...]] = {
    "bhx_test": ("Epidural", "Subdural", "Chronic", "Intraventricular", "Intraparenchymal", "Subarachnoid", "None"),
    "brset_test": ("normal", "hypertensive retinopathy", "diabetic macular edema", "drusens", "increased cup disc ratio",
                   "nondiabetic retinal hemorrhage", "vascular occlusion", "age-related macular degeneration", "other",
                   "myopic fundus", "diabetic retinopathy", "retinal detachment", "scar", "nevus"),
    "chexpert_test": ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                      "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                      "Fracture", "Support Devices", _NO_FINDING),
    "cxr14_test": ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
                   "Hernia", "Infiltration", "Mass", "Nodule", "Pleural Thickening", "Pneumonia", "Pneumothorax",
                   "Pneumoperitoneum", "Pneumomediastinum", "Subcutaneous Emphysema", "Tortuous Aorta",
                   "Calcification of the Aorta", _NO_FINDING),
    "isic2016_test": ("benign", "melanoma"),
    "isic2017_test": ("melanoma", "seborrheic keratosis", "nevous"),
    "isic2018_test": ("Melanoma", "Melanocytic nevus", "Basal cell carcinoma", "Bowen's disease", "Benign keratosis",
                      "Dermatofibroma", "Vascular lesion"),
    "isic2019_test": ("Melanoma", "Melanocytic nevus", "Basal cell carcinoma", "Actinic keratosis", "Benign keratosis",
                      "Dermatofibroma", "Vascular lesion", "Squamous cell carcinoma"),
    "mura_test": ("normal", "abnormal"),
    "oct2017_test": ("normal", "drusen", "diabetic macular edema", "choroidal neovascularization"),
    **{f"organ{v}mnist_test": ("bladder", "left femur", "right femur", "heart", "left kidney", "right kidney", "liver",
                               "left lung", "right lung", "pancreas", "spleen") for v in ("a", "c", "s")},
    "padufes_test": ("Basal Cell Carcinoma", "Squamous Cell Carcinoma", "Actinic Keratosis", "Seborrheic Keratosis",
                     "Melanoma", "Nevus"),
    "pannuke_test": ("Breast", "Colon", "Bile duct", "Esophagus", "Uterus", "Lung", "Cervix", "Head or Neck", "Skin",
                     "Adrenal gland", "Kidney", "Stomach", "Prostate", "Testis", "Liver", "Thyroid", "Pancreatic",
                     "Ovarian", "Bladder"),
    "kathercolon_test": ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                         "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
    "rfmid_test": ("Optic disc pallor", "Chorioretinitis", "Macular hole", "Laser scars",
                   "Age-related macular degeneration", "Retinal pigment epithelium changes", "Retinitis pigmentosa",
                   "Optic disc edema", "Anterior ischemic optic neuropathy", "Drusens", "Myopia",
                   "Parafoveal telangiectasia", "Retinitis", "Exudation", "Tortuous vessels", "Asteroid hyalosis",
                   "Epiretinal membrane", "Diabetic retinopathy", "Optic disc cupping", "Media Haze", "Tessellation",
                   "Optociliary shunt", "Central serous retinopathy", "Branch retinal vein occlusion",
                   "Central retinal vein occlusion", "Macular scar", "Retinal traction", "normal", "Other"),
    "vindrcxr_test": ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
                      "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
                      "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule or Mass", "Pleural effusion",
                      "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion",
                      "COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "No finding", "Other disease"),
    "vindrmammo_test": ("Suspicious Calcification", "Nipple Retraction", "Skin Retraction", "Architectural Distortion",
                        "Global Asymmetry", "Focal Asymmetry", "Suspicious Lymph Node", "Asymmetry", "Mass",
                        "Skin Thickening", _NO_FINDING),
    "vindrpcxr_test": ("Bronchitis", "Brocho-pneumonia", "Bronchiolitis", "Situs inversus", "Pneumonia",
                       "Pleuro-pneumonia", "Diagphramatic hernia", "Tuberculosis", "Congenital emphysema", "CPAM",
                       "Hyaline membrane disease", "Mediastinal tumor", "Lung tumor", "Other disease", "No finding"),
    "vindrspinexr_test": ("Surgical implant", "Foraminal stenosis", "Vertebral collapse", "Disc space narrowing",
                          "Osteophytes", "Spondylolysthesis", "Other lesions", "No finding"),
    "busi_test": ("benign", "malignant", "normal"),
    "butterfly_test": ("Morisons pouch", "Bladder", "PLAX view of the heart", "4 chambers of the heart",
                       "2 chambers of the heart", "IVC", "Carotid artery", "Lungs", "Thyroid"),
    "ultracovid_test": ("pneumonia", "regular", "covid19"),
    "messidor2_test": ("None", "DR"),
    "breastmnist_test": ("malignant", "normal or benign"),
    "chestmnist_test": ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
                        "Hernia", "Infiltration", "Mass", "Nodule", "Pleural Thickening", "Pneumonia", "Pneumothorax",
                        _NO_FINDING),
    "octmnist_test": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pneumoniamnist_test": ("normal", "pneumonia"),
}
MULTILABEL = frozenset({"chestmnist_test", "brset_test", "chexpert_test", "cxr14_test", "rfmid_test", "vindrcxr_test",
                        "vindrmammo_test", "vindrpcxr_test", "vindrspinexr_test"})


def _closest_class(answer: str, classes: Sequence[str]) -> int:
    scores = [bleu1_f32(answer, c.lower()) for c in classes]
    return scores.index(max(scores))


def classification(records: list[dict], classes: Sequence[str], multilabel: bool) -> dict:
    """`cls/evaluate_cls.py`, one file. Trailing punctuation stripped and ", " -> ","; the truth
    must be a class exactly (case kept); the answer (lower-cased) is split at "," and each part
    takes the class of highest BLEU-1 (the first on ties). Multi-class: the first part only;
    macro F1 over the classes seen in truth or answers. Multi-label: one-hot rows; macro F1 over
    EVERY class of the list (an absent class scores 0) and exact-row accuracy (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score

    punct = string.punctuation
    truth, pred = [], []
    for idx, rec in enumerate(records):
        gt = _text(rec, "gt_answer", idx).rstrip(punct).replace(", ", ",")
        res = _text(rec, "pred_answer", idx).rstrip(punct).replace(", ", ",").lower()
        parts = gt.split(",") if multilabel else [gt]
        try:
            g = [list(classes).index(p) for p in parts]
        except ValueError:
            raise ReleaseError(f"{_where(rec, idx)}: ground truth {gt!r} is not one of the classes; the authors' "
                               "classification script stops (ValueError)") from None
        p = [_closest_class(a, classes) for a in res.lower().split(",")]
        truth.append(g if multilabel else g[0])
        pred.append(p if multilabel else p[0])
    if not records:
        raise ReleaseError("no records: the authors' classification script stops")
    if multilabel:
        def onehot(rows):
            m = np.zeros((len(rows), len(classes)), dtype=np.int64)
            for i, idxs in enumerate(rows):
                m[i, idxs] = 1
            return m
        y_true, y_pred = onehot(truth), onehot(pred)
    else:
        y_true, y_pred = np.array(truth), np.array(pred)
    return {"F1-macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "Accuracy": float(accuracy_score(y_pred, y_true))}


# --- one entry point --------------------------------------------------------------------------------

def script_for(task: str, setting: str | None = None, lang: str | None = None) -> str:
    if task == "t2r":
        return f"{SOURCE}/{SCRIPTS[setting]}"
    s = TASK_SCRIPTS.get(task)
    if isinstance(s, dict):
        s = s["zh" if lang == "zh" else "en"]
    return f"{SOURCE}/{s}"


def score_records(records: list[dict], task: str, setting: str | None = None, lang: str | None = None,
                  classes: Sequence[str] | None = None, multilabel: bool = False, wordnet: Any = None,
                  bertscore: Any = None) -> dict:
    """The figures one of their scripts prints for `records` (their record shape)."""
    if task == "t2r":
        if setting not in T2R:
            raise ValueError(f"--setting is required for t2r under --protocol release: one of {', '.join(SETTINGS)}")
        return T2R[setting](records)
    if task == "r2t":
        return r2t(records, bertscore)
    if task == "report":
        return report(records, lang or "en", wordnet, bertscore)
    if task == "vqa":
        return vqa(records, lang or "en", bertscore)
    if task == "cls":
        if not classes:
            raise ValueError("classification under --protocol release needs a class list")
        return classification(records, classes, multilabel)
    if task in NOT_SHIPPED:
        raise ValueError(f"--protocol release: {NOT_SHIPPED[task]}")
    raise ValueError(f"unknown task {task!r}")


def release_figures(items: list[dict], task: str, setting: str | None = None, lang: str | None = None,
                    classes: Sequence[str] | None = None, multilabel: bool = False, wordnet: Any = None,
                    bertscore: Any = None) -> dict:
    """For the evaluate stage: the figures the authors' script for `task` (and `setting`/`lang`)
    prints on `items` (our native answer items or their records), or `{"not_computed": why}`
    when their script would stop on them. Keys are theirs."""
    records = [as_release_record(dict(i), task) for i in items]
    try:
        return score_records(records, task, setting, lang, classes, multilabel, wordnet, bertscore)
    except ReleaseError as err:
        return {"not_computed": f"the authors' script stops on these answers: {err}"}


def release_block(items: list[dict], wordnet: Any = None, bertscore: Any = None) -> dict:
    """Every release figure the evaluate stage can give beside ours: Text-to-Region per setting
    (languages pooled, as their scripts ignore language), the other tasks per language. Our
    classification items have no public class list: their distinct truths, in order of first
    appearance, stand for it."""
    by: dict[tuple, list[dict]] = {}
    for item in items:
        task = item.get("task")
        if task == "t2r":
            key = (task, item.get("setting") or "SS")
        else:
            key = (task, item.get("lang") or "en")
        by.setdefault(key, []).append(item)
    out: dict[str, Any] = {"protocol": PROTOCOL, "source": SOURCE,
                           "note": "the authors' released evaluators reproduced, defects included "
                                   "(docs/evaluation-protocols.md); keys are theirs"}
    for (task, sub), rows in sorted(by.items()):
        if task in NOT_SHIPPED:
            out[task] = NOT_SHIPPED[task]
            continue
        if task not in ("t2r", "r2t", "report", "vqa", "cls"):
            continue
        if task == "t2r":
            fig = release_figures(rows, task, setting=sub)
            fig["script"] = script_for(task, sub)
        else:
            classes = list(dict.fromkeys(str(r.get("ground_truth") or "").rstrip(string.punctuation)
                                         for r in rows)) if task == "cls" else None
            fig = release_figures(rows, task, lang=sub, classes=classes, wordnet=wordnet, bertscore=bertscore)
            fig["script"] = script_for(task, lang=sub)
        fig["n"] = len(rows)
        out.setdefault(task, {})[sub] = fig
    return out


def release_headline(block: dict) -> dict[str, dict[str, dict[str, float]]]:
    """The numeric figures of a `release_block`, `{task: {setting or lang: {their key: value}}}`:
    what metrics.json, MLflow (`release/...`) and the model card carry beside ours. Figures their
    script would not print (`not_computed`, a task they ship no evaluator for) are left out."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for task, subs in block.items():
        figures = {sub: {k: float(v) for k, v in fig.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                   for sub, fig in (subs.items() if isinstance(subs, dict) else ())
                   if isinstance(fig, dict) and "not_computed" not in fig}
        if figures:
            out[task] = figures
    return out


def score_files(paths: Sequence[str | Path], task: str, setting: str | None = None, lang: str | None = None,
                dataset: str | None = None, wordnet: Any = None, bertscore: Any = None) -> dict:
    """`medrega score --protocol release`: what their script prints on these files. Text-to-Region
    and Region-to-Text merge every file into one evaluation (their comma-separated list); report,
    VQA and classification evaluate each file alone, and `release` then maps file -> figures when
    there are several."""
    if task in NOT_SHIPPED:
        raise ValueError(f"--protocol release: {NOT_SHIPPED[task]}")
    files = read_release_files(paths, task)
    out: dict[str, Any] = {"protocol": PROTOCOL, "task": task, "files": [str(p) for p in paths]}
    if task in ("t2r", "r2t"):
        records = [r for f in files for r in f]
        out.update(setting=setting, script=script_for(task, setting), n=len(records))
        out["release"] = score_records(records, task, setting, bertscore=bertscore)
        return out
    per_file: dict[str, Any] = {}
    scripts = set()
    for path, records in zip(paths, files):
        name = dataset or dataset_name(path)
        file_lang = lang or ("zh" if "zh" in name else "en")
        classes, multilabel = None, False
        if task == "cls":
            if name not in CLASS_LISTS:
                raise ReleaseError(f"{path}: dataset {name!r} (from the file name, or --dataset) has no class list in "
                                   f"the authors' script, which stops (KeyError); known: {', '.join(sorted(CLASS_LISTS))}")
            classes, multilabel = CLASS_LISTS[name], name in MULTILABEL
        try:
            figs = score_records(records, task, lang=file_lang, classes=classes, multilabel=multilabel,
                                 wordnet=wordnet, bertscore=bertscore)
        except ReleaseError as err:
            raise ReleaseError(f"{path}: {err}") from None
        figs["n"] = len(records)
        if task == "cls":
            figs["dataset"] = name
        else:
            figs["lang"] = file_lang
        scripts.add(script_for(task, lang=file_lang))
        per_file[str(path)] = figs
    out["script"] = ", ".join(sorted(scripts))
    out["release"] = next(iter(per_file.values())) if len(per_file) == 1 else per_file
    return out


__all__ = ["ReleaseError", "release_figures", "release_block", "score_files", "score_records", "SCRIPTS", "KEYS",
           "read_release_answer", "iou_matrix32", "bleu1_f32", "name_rule"]
