"""The names of every scalar figure evaluation reports, per task: one table for three readers.

- the scorer (`medrega.metrics.scoring.summarise`) checks every figure it produces is listed here,
  so a figure added to an aggregator without a row here fails the first evaluation that makes it;
- the config (`register.gate.metrics`) refuses, when params load, a gate name that evaluation
  cannot produce for the configured tasks and languages (a gate that always reads "not measured"
  protects nothing);
- registration tags each version with a few `HEADLINE` figures beside the gate's.

This module imports nothing heavy: params.yaml is read by every command, and the scorers pull in
scipy, nltk and sacrebleu.

Kinds: `score` is a quality figure where higher is better (the only kind a gate may compare);
`count` is how many samples/failures a figure rests on; `setting` is an option it was measured
under. Names are as tagged on model versions and logged to MLflow (`acc@0.5` -> `acc_at_0.5`).
"""
from __future__ import annotations

SCORE, COUNT, SETTING = "score", "count", "setting"

# Algorithm 1 (medrega.metrics.region.aggregate): object/region/alignment P/R/F1, IoU, Acc@t
_REGION = {
    **{f"{kind}_{m}": SCORE for kind in ("object", "region", "align") for m in ("precision", "recall", "f1")},
    "mean_iou": SCORE, "acc@0.25": SCORE, "acc@0.5": SCORE, "acc@0.75": SCORE,
    "n": COUNT, "parse_failures": COUNT, "untagged_answers": COUNT, "acc_n": COUNT, "threshold": SETTING,
}
# medrega.metrics.report.TEXT_KEYS
_TEXT = {"bleu1": SCORE, "bleu4": SCORE, "rouge1": SCORE, "rougeL": SCORE, "meteor": SCORE}

FIGURES: dict[str, dict[str, str]] = {
    "t2r": _REGION,
    "r2t": {"n": COUNT, "bleu1": SCORE, "token_f1": SCORE, "token_recall": SCORE, "accuracy": SCORE,
            "name_accuracy": SCORE},
    "grounded": {**_REGION, **_TEXT},
    "report": {"n": COUNT, **_TEXT},
    "caption": {"n": COUNT, **_TEXT},
    "vqa": {"n": COUNT, "n_closed": COUNT, "n_open": COUNT, "closed_accuracy": SCORE, "open_recall": SCORE},
    "cls": {"n": COUNT, "accuracy": SCORE, "macro_f1": SCORE},
}

# What every version carries as tags (besides the gate's figures): the figures a reader of the
# registry page looks for first, SPEC §7's headline columns. The rest is in the version's JSON.
HEADLINE: dict[str, tuple[str, ...]] = {
    "t2r": ("object_f1", "region_f1", "align_f1", "mean_iou"),
    "r2t": ("bleu1", "accuracy"),
    "grounded": ("bleu1", "region_f1", "align_f1", "mean_iou"),
    "report": ("bleu1", "bleu4", "rougeL"),
    "caption": ("bleu1",),
    "vqa": ("closed_accuracy", "open_recall"),
    "cls": ("macro_f1",),
}


def tag_name(figure: str) -> str:
    """A figure's name as tagged and logged: MLflow allows only [A-Za-z0-9_-. :/] (`acc@0.5`)."""
    return figure.replace("@", "_at_")


def gate_names(tasks, langs) -> dict[str, list[str]]:
    """Every name a gate may compare, `<task>.<figure>` and `<task>.<lang>.<figure>` (the score
    figures of the evaluated tasks), keyed by task: what evaluation can produce."""
    out = {}
    for task in tasks:
        figures = [tag_name(f) for f, kind in FIGURES[task].items() if kind == SCORE]
        out[task] = [f"{task}.{f}" for f in figures] + [f"{task}.{lang}.{f}" for lang in langs for f in figures]
    return out
