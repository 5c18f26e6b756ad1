"""Is the learning real? Held-out scores of the tuned model against the untrained model and
a prior baseline that never looks at the image, on the same test items, in one run.

Run after `make pipeline` (it reads artifacts/):  .venv/bin/python benchmarks/learning.py
By default every held-out R2T and T2R item is scored (about 3 minutes for the tiny profile): on
100 items a Text-to-Region gap to the prior moves by +-0.02 from one sample to the next, so the
paired difference is printed with its standard error.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import mlflow

from medrega import io, tracking
from medrega.config import load_params
from medrega.metrics.baselines import PriorBaseline
from medrega.metrics.scoring import score_samples, summarise
from model.data import iter_records
from model.infer import Generator, Query
from tasks.evaluate import scorer, test_items

FIGURES = [("r2t", "accuracy"), ("r2t", "name_accuracy"), ("t2r", "mean_iou"), ("t2r", "region_f1"),
           ("t2r", "object_f1"), ("t2r", "acc@0.5"), ("t2r", "parse_failures")]
# Each row's short name (MLflow metric prefix) and its label (table, learning.json).
LABELS = {"prior": "prior (no image)", "untrained": "untrained (random init)",
          "align": "after align", "tune": "after tune (LoRA)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--max-samples", type=int, default=-1, help="per task (-1: every held-out item)")
    a = ap.parse_args()
    params = load_params(a.params)
    inst = Path(params["materialize"]["out"])
    items = test_items(inst / "meta_test.json", ["r2t", "t2r"], a.max_samples, params["seed"])
    cfg = params["evaluate"]
    s = scorer(cfg)

    def scored(predictions: list[str]) -> list[dict]:
        return score_samples([{**i, "prediction": p} for i, p in zip(items, predictions)], scorer=s)

    prior = PriorBaseline(r for r, _ in iter_records(inst / "meta_file.json", ["r2t", "t2r"]))
    samples = {"prior": scored([prior.answer(i) for i in items])}
    models = {
        "untrained": Path(params["align"]["out"]) / "base",
        "align": Path(params["align"]["out"]) / "model",
        "tune": Path(params["tune"]["out"]) / "model",
    }
    queries = [Query(Path(i["image"]), i["question"], i["base_prompt"]) for i in items]
    for name, path in models.items():
        samples[name] = scored(Generator.from_pretrained(path).generate(queries, cfg["batch_size"], cfg["max_new_tokens"]))
    results = {name: summarise(rows, s) for name, rows in samples.items()}

    header = "| model | " + " | ".join(f"{t} {k}" for t, k in FIGURES) + " |"
    print(f"{len(items)} held-out items ({sum(i['task'] == 'r2t' for i in items)} R2T, "
          f"{sum(i['task'] == 't2r' for i in items)} T2R)\n")
    print(header)
    print("|" + "---|" * (len(FIGURES) + 1))
    for name, m in results.items():
        cells = [m[t][k] for t, k in FIGURES]
        print(f"| {LABELS[name]} | " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    # Paired over the same T2R items: the figure that says whether a model beats the prior at all.
    t2r_iou = {name: [r["iou"] for r in rows if r["task"] == "t2r"] for name, rows in samples.items()}
    print()
    for name in models:
        diff = [m - p for m, p in zip(t2r_iou[name], t2r_iou["prior"])]
        if len(diff) > 1:
            se = statistics.stdev(diff) / len(diff) ** 0.5
            results[name]["t2r_iou_minus_prior"] = {"mean": statistics.mean(diff), "stderr": se}
            print(f"{LABELS[name]}: T2R IoU minus prior {statistics.mean(diff):+.3f} (standard error {se:.3f}, {len(diff)} items)")
    out = Path("artifacts/benchmarks/learning.json")
    io.write_json(out, {LABELS[name]: m for name, m in results.items()}, default=str)
    # The same figures in the MLflow store the pipeline writes: one run, metrics named
    # <model>.<task>/<figure> (e.g. tune.t2r/mean_iou, prior.t2r/mean_iou, tune.t2r_vs_prior/mean).
    with tracking.stage_run("learning-check", {"learning": {"items": len(items), "params": a.params}}):
        for name, m in results.items():
            figures = {f"{name}.{t}": m[t] for t in ("r2t", "t2r")}
            if "t2r_iou_minus_prior" in m:
                figures[f"{name}.t2r_vs_prior"] = m["t2r_iou_minus_prior"]
            tracking.log_task_metrics(figures)
        mlflow.log_artifact(str(out))

if __name__ == "__main__":
    main()
