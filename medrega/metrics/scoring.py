"""Score an answers file of any task mix (SPEC §6): one entry point for the evaluate stage
and `medrega score`.

Tasks: t2r (Algorithm 1), r2t, grounded (Algorithm 1 on the boxes + report text metrics on
the descriptions), report and caption (text metrics), vqa (closed accuracy, open recall),
cls (macro F1). Every task's figures are also given by language, modality and setting.
Metrics that need model weights (BERTScore, CheXbert, RadGraph) are not computed unless a
plug-in is given a local model (`medrega.metrics.plugins`); the result then says so instead of
leaving them out.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

from medrega.grammar import detect_lang, parse_answer_regions, strip_regions
from medrega.metrics import answers, plugins, region, report, text
from medrega.metrics.figures import FIGURES
from medrega.vocab import names_match
from medrega.errors import BadInput

TASKS = ("t2r", "r2t", "grounded", "report", "caption", "vqa", "cls")
GROUP_KEYS = ("lang", "modality", "setting")
MODEL_METRICS = plugins.PLUGINS
NOT_COMPUTED = plugins.NOT_REQUESTED
# Every figure here is ours (SPEC §6); the authors' released protocol is `medrega.metrics.release`.
PROTOCOL = "medrega"

def _description(answer: str) -> str:
    """The text of a grounded report: after the last box (tagged, or bare `name[[..]]` boxes in
    an answer without tags), or the whole answer without its tags when the boxes cannot be
    read (the words are still scored)."""
    parsed = parse_answer_regions(answer)
    if parsed.text is not None:
        return parsed.text
    return strip_regions(answer)


def _lang(item: dict) -> str:
    return item.get("lang") or detect_lang(item.get("ground_truth") or "")


class Scorer:
    """Per-sample scoring and macro aggregation for each task, with fixed options."""

    def __init__(self, name_match: Callable[[str, str], bool] = names_match, threshold: float = 0.5, wordnet=None):
        self.name_match, self.threshold, self.wordnet = name_match, threshold, wordnet

    def sample(self, task: str, item: dict, idx: int) -> dict:
        if task == "t2r":
            return region.score_item(item, self.name_match, self.threshold, idx)
        if task == "r2t":
            return text.score_text(item.get("prediction"), item.get("ground_truth") or "", _lang(item))
        if task == "grounded":
            s = region.score_item(item, self.name_match, self.threshold, idx)
            s.update(report.score_report(_description(item.get("prediction")), _description(item["ground_truth"]),
                                         _lang(item), self.wordnet))
            return s
        if task in ("report", "caption"):
            return report.score_report(item.get("prediction"), item.get("ground_truth") or "", _lang(item), self.wordnet)
        if task == "vqa":
            return answers.score_vqa_sample(item)
        if task == "cls":
            return answers.score_cls_sample(item)
        raise BadInput(f"{region.where(item, idx)}: unknown task {task!r} (known: {', '.join(TASKS)})")

    def _text_means(self, samples: list[dict]) -> dict:
        n = len(samples)
        out = {k: sum(s[k] for s in samples) / n if n else 0.0 for k in report.TEXT_KEYS if k != "meteor"}
        out["meteor"] = (sum(s["meteor"] for s in samples) / n if n else 0.0) if self.wordnet is not None \
            else report.METEOR_UNAVAILABLE
        return out

    def aggregate(self, task: str, samples: list[dict]) -> dict:
        if task == "t2r":
            return region.aggregate(samples)
        if task == "r2t":
            return text.aggregate(samples)
        if task == "grounded":
            return {**region.aggregate(samples), **self._text_means(samples)}
        if task in ("report", "caption"):
            return {"n": len(samples), **self._text_means(samples)}
        if task == "vqa":
            return answers.aggregate_vqa(samples)
        return answers.aggregate_cls(samples)


def score_samples(items: Iterable[dict], task: str | None = None, scorer: Scorer | None = None) -> list[dict]:
    """Per-sample figures, each with its `task`, `index` in `items` and `groups`.

    `task` forces one task: lines without a task take it, lines of another task are skipped
    (so `--task t2r` on a full answers file scores its T2R lines). Without it every line
    must name its task.
    """
    scorer = scorer or Scorer()
    out = []
    for idx, item in enumerate(items):
        own = item.get("task")
        if task is not None and own not in (None, task):
            continue
        kind = own or task
        if kind is None:
            raise BadInput(f"{region.where(item, idx)}: no task on the line; pass --task ({', '.join(TASKS)})")
        s = scorer.sample(kind, item, idx)
        s.update(task=kind, index=idx, groups={**{k: item.get(k) for k in GROUP_KEYS}, "lang": _lang(item)})
        out.append(s)
    return out


def model_texts(items: Iterable[dict], task: str | None = None) -> dict[tuple[str, str], tuple[list[str], list[str]]]:
    """`{(task, lang): (predictions, references)}` of the text tasks, for the model-metric
    plug-ins; the same task filter as `score_samples`; grounded reports give their descriptions."""
    out: dict[tuple[str, str], tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for item in items:
        own = item.get("task")
        kind = own or task
        if (task is not None and own not in (None, task)) or kind not in ("r2t", "grounded", "report", "caption"):
            continue
        pred, ref = item.get("prediction"), item.get("ground_truth") or ""
        if kind == "grounded":
            pred, ref = _description(pred), _description(ref)
        preds, refs = out[kind, _lang(item)]
        preds.append(pred if isinstance(pred, str) else "")
        refs.append(ref)
    return dict(out)


def summarise(samples: list[dict], scorer: Scorer, model_metrics: dict[str, Any] | None = None) -> dict:
    """`{task: {headline figures..., "by": {"by_lang": {...}, ...}}}` plus the model metrics."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        by_task[s["task"]].append(s)
    result: dict[str, Any] = {}
    for task in sorted(by_task, key=TASKS.index):
        rows = by_task[task]
        entry = scorer.aggregate(task, rows)
        entry["protocol"] = PROTOCOL
        if task in ("t2r", "grounded"):
            entry.update(threshold=scorer.threshold, precision_recall_note=region.PRECISION_RECALL_NOTE)
        entry["by"] = {}
        for key in GROUP_KEYS:
            groups: dict[str, list[dict]] = defaultdict(list)
            for s in rows:
                if s["groups"][key] is not None:
                    groups[str(s["groups"][key])].append(s)
            if groups:
                entry["by"][f"by_{key}"] = {v: scorer.aggregate(task, g) for v, g in sorted(groups.items())}
        _check_figures(task, entry)
        result[task] = entry
    given = model_metrics or {}
    result["model_metrics"] = {m: given.get(m, NOT_COMPUTED) for m in MODEL_METRICS}
    return result


def _check_figures(task: str, entry: dict) -> None:
    """Every scalar figure is in the table gate names and registry tags are read from
    (medrega.metrics.figures): a figure added here without a row there is a bug, caught now."""
    unlisted = sorted(k for k, v in entry.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in FIGURES[task])
    if unlisted:
        raise RuntimeError(f"{task}: figure(s) {', '.join(unlisted)} missing from medrega.metrics.figures.FIGURES")


def score_answers(items: list[dict], task: str | None = None, name_match: Callable[[str, str], bool] = names_match,
                  threshold: float = 0.5, wordnet=None, loaded_plugins: dict[str, Any] | None = None) -> dict:
    """Score `items`; `loaded_plugins` (from `plugins.load_plugins`) adds the model metrics."""
    scorer = Scorer(name_match, threshold, wordnet)
    samples = score_samples(items, task, scorer)
    if not samples:
        raise BadInput(f"no {task + ' ' if task else ''}answers to score among {len(items)} record(s)")
    return summarise(samples, scorer, plugins.compute(loaded_plugins or {}, model_texts(items, task)))


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar figures of each task, for metrics.json and MLflow (breakdowns go elsewhere)."""
    return {task: {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, m in metrics.items() if task in TASKS}
