"""Is the learning real? Held-out scores of the trained models against two priors that never look
at the image (the mean box of each name, and the box a blind model decoding greedily writes), on
the same test items, in one run.

Run after `make pipeline` (it reads artifacts/):  .venv/bin/python benchmarks/learning.py
Every held-out R2T and T2R item is scored by default. Differences to each prior are paired over the
same items and printed with their standard error, overall and per language: a model has learned
from pixels where its Text-to-Region IoU and region F1 beat both priors by more than 3 standard
errors, in English and in Chinese. The figures go to artifacts/benchmarks/learning.json and to an
MLflow run named `learning-check`. Figures are our protocol's (medrega, SPEC §6).
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import mlflow

from medrega import config, io, tracking
from medrega.metrics.baselines import PriorBaseline
from medrega.metrics.scoring import score_samples, summarise
from model.data import iter_records
from model.infer import Generator, Query
from tasks.evaluate import scorer, test_items

FIGURES = [("r2t", "accuracy"), ("r2t", "name_accuracy"), ("t2r", "mean_iou"), ("t2r", "region_f1"),
           ("t2r", "object_f1"), ("t2r", "acc@0.5"), ("t2r", "parse_failures")]
# Each row's short name (MLflow metric prefix) and its label (table, learning.json).
LABELS = {"prior": "prior (mean box, no image)", "digit_prior": "prior (greedy digit mode, no image)",
          "untrained": "untrained (random init)", "align": "after align", "tune": "after tune (LoRA)"}
PRIORS = {"prior": "mean", "digit_prior": "digit_mode"}
PAIRED = {"iou": "t2r_iou", "region_f1": "t2r_region_f1"}  # per-sample T2R figure -> name of its gap


def paired(model: list[dict], prior: list[dict], key: str) -> dict | None:
    """Mean and standard error of the per-item difference model - prior."""
    diff = [m[key] - p[key] for m, p in zip(model, prior)]
    if len(diff) < 2:
        return None
    return {"mean": statistics.mean(diff), "stderr": statistics.stdev(diff) / len(diff) ** 0.5, "n": len(diff)}


def gaps(rows: list[dict], prior_rows: list[dict], prior: str) -> dict:
    """`t2r_iou_minus_<prior>` and `t2r_region_f1_minus_<prior>`, overall and `by_lang`."""
    t2r = [(r, p) for r, p in zip(rows, prior_rows) if r["task"] == "t2r"]
    out: dict = {"by_lang": {}}
    for lang in (None, "en", "zh"):
        pairs = [(r, p) for r, p in t2r if lang is None or r["groups"]["lang"] == lang]
        target = out if lang is None else out["by_lang"].setdefault(lang, {})
        for key, name in PAIRED.items():
            value = paired([r for r, _ in pairs], [p for _, p in pairs], key)
            if value:
                target[f"{name}_minus_{prior}"] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--max-samples", type=int, default=-1, help="per task (-1: every held-out item)")
    a = ap.parse_args()
    cfg = config.resolve(a.params, a.profile)
    inst = cfg.materialize.out
    items = test_items(inst / "meta_test.json", ["r2t", "t2r"], a.max_samples, cfg.seed)
    s = scorer(cfg.evaluate)

    def scored(predictions: list[str]) -> list[dict]:
        return score_samples([{**i, "prediction": p} for i, p in zip(items, predictions)], scorer=s)

    samples = {}
    for name, kind in PRIORS.items():
        prior = PriorBaseline((r for r, _ in iter_records(inst / "meta_file.json", ["r2t", "t2r"])), kind=kind)
        samples[name] = scored([prior.answer(i) for i in items])
    models = {"untrained": cfg.align.out / "base", "align": cfg.align.out / "model", "tune": cfg.tune.out / "model"}
    queries = [Query(Path(i["image"]), i["question"], i["base_prompt"]) for i in items]
    for name, path in models.items():
        samples[name] = scored(Generator.from_pretrained(path).generate(queries, cfg.evaluate.batch_size,
                                                                        cfg.evaluate.max_new_tokens))
    results = {name: summarise(rows, s) for name, rows in samples.items()}
    for name in models:
        for prior in PRIORS:
            g = gaps(samples[name], samples[prior], prior)
            results[name].setdefault("by_lang", {})
            for lang, figures in g.pop("by_lang").items():
                results[name]["by_lang"].setdefault(lang, {}).update(figures)
            results[name].update(g)
    report(items, results, models)
    out = Path("artifacts/benchmarks/learning.json")
    io.write_json(out, {LABELS[name]: m for name, m in results.items()}, default=str)
    log_to_mlflow(results, len(items), a.params, out)


def report(items: list[dict], results: dict, models: dict) -> None:
    print(f"{len(items)} held-out items ({sum(i['task'] == 'r2t' for i in items)} R2T, "
          f"{sum(i['task'] == 't2r' for i in items)} T2R); protocol: medrega\n")
    print("| model | " + " | ".join(f"{t} {k}" for t, k in FIGURES) + " |")
    print("|" + "---|" * (len(FIGURES) + 1))
    for name, m in results.items():
        cells = [m[t][k] for t, k in FIGURES]
        print(f"| {LABELS[name]} | " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    print()
    for name in models:
        for scope, figures in [("all", results[name])] + [(lang, f) for lang, f in results[name]["by_lang"].items()]:
            for key, v in figures.items():
                if key.endswith(tuple(f"_minus_{p}" for p in PRIORS)):
                    verdict = "above by > 3 SE" if v["mean"] > 3 * v["stderr"] else "NOT clearly above"
                    print(f"{LABELS[name]} [{scope}]: {key} {v['mean']:+.3f} (SE {v['stderr']:.3f}, {v['n']} items) "
                          f"{verdict}")


def log_to_mlflow(results: dict, n_items: int, params: str, out: Path) -> None:
    """One run; metrics named <model>.<task>/<figure> (e.g. tune.t2r/mean_iou) and
    <model>.<gap>[.<lang>]/mean|stderr (e.g. tune.t2r_iou_minus_prior.zh/mean)."""
    with tracking.stage_run("learning-check", {"learning": {"items": n_items, "params": params,
                                                             "protocol": "medrega"}}):
        for name, m in results.items():
            figures = {f"{name}.{t}": m[t] for t in ("r2t", "t2r")}
            for key, v in m.items():
                if "_minus_" in key:
                    figures[f"{name}.{key}"] = v
            for lang, by in (m.get("by_lang") or {}).items():
                figures.update({f"{name}.{key}.{lang}": v for key, v in by.items() if "_minus_" in key})
            tracking.log_task_metrics(figures)
        mlflow.log_artifact(str(out))


if __name__ == "__main__":
    main()
