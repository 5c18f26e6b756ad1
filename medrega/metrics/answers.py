"""Short-answer metrics (SPEC §6): VQA closed accuracy and open recall, classification macro F1.

VQA follows the LLaVA-Med convention the paper's tables use: a closed question (yes/no) is
right when the normalised answer equals the truth; an open question scores the share of
ground-truth tokens found in the prediction (token recall). A line may say which kind it is
(`answer_type`: closed/open); otherwise yes/no truths (是/否 in Chinese) are closed.
"""
from __future__ import annotations

from collections import Counter

from medrega.grammar import detect_lang
from medrega.metrics.text import token_scores
from medrega.vocab import canonical, normalize

_YES_NO = {"yes": "yes", "no": "no", "是": "yes", "否": "no", "是的": "yes", "不是": "no"}


def answer_type(item: dict) -> str:
    kind = item.get("answer_type")
    if kind in ("closed", "open"):
        return kind
    return "closed" if normalize(item.get("ground_truth") or "") in _YES_NO else "open"


def _closed_value(text: str) -> str:
    """yes/no from an answer; a longer answer counts by its first word ("Yes, there is ...")."""
    norm = normalize(text or "")
    if norm in _YES_NO:
        return _YES_NO[norm]
    first = norm.split(" ")[0] if norm else ""
    return _YES_NO.get(first, norm)


def score_vqa_sample(item: dict) -> dict:
    prediction = item.get("prediction") if isinstance(item.get("prediction"), str) else ""
    truth = item.get("ground_truth") or ""
    if answer_type(item) == "closed":
        return {"answer_type": "closed", "closed_accuracy": float(_closed_value(prediction) == _closed_value(truth))}
    lang = item.get("lang") or detect_lang(truth)
    return {"answer_type": "open", "open_recall": token_scores(prediction, truth, lang)["token_recall"]}


def aggregate_vqa(samples: list[dict]) -> dict:
    closed = [s["closed_accuracy"] for s in samples if s["answer_type"] == "closed"]
    opened = [s["open_recall"] for s in samples if s["answer_type"] == "open"]
    return {"n": len(samples), "n_closed": len(closed), "n_open": len(opened),
            "closed_accuracy": sum(closed) / len(closed) if closed else 0.0,
            "open_recall": sum(opened) / len(opened) if opened else 0.0}


def label(text: str) -> str:
    """A class label in one form across languages: the vocabulary key when it is a known name."""
    text = text if isinstance(text, str) else ""
    return canonical(text) or normalize(text)


def macro_f1(predicted: list[str], truth: list[str]) -> float:
    """Unweighted mean of per-class F1 over every class seen in the truth or the predictions."""
    classes = set(truth) | set(predicted)
    if not classes:
        return 0.0
    tp = Counter(p for p, t in zip(predicted, truth) if p == t)
    n_pred, n_true = Counter(predicted), Counter(truth)
    total = 0.0
    for c in classes:
        # F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted c + true c)
        total += 2 * tp[c] / (n_pred[c] + n_true[c])
    return total / len(classes)


def aggregate_cls(samples: list[dict]) -> dict:
    predicted, truth = [s["pred_label"] for s in samples], [s["true_label"] for s in samples]
    n = len(samples)
    return {"n": n, "accuracy": sum(p == t for p, t in zip(predicted, truth)) / n if n else 0.0,
            "macro_f1": macro_f1(predicted, truth)}


def score_cls_sample(item: dict) -> dict:
    return {"pred_label": label(item.get("prediction")), "true_label": label(item.get("ground_truth"))}
