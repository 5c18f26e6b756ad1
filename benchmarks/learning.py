"""Is the learning real? Held-out scores of the tuned model against the untrained model and
a prior baseline that never looks at the image, on the same test items, in one run.

Run after `make pipeline` (it reads artifacts/):  .venv/bin/python benchmarks/learning.py
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from medrega.config import load_params
from medrega.metrics.baselines import PriorBaseline
from model.data import iter_records
from model.infer import Generator, Query
from tasks.evaluate import score, test_items

FIGURES = [("r2t", "accuracy"), ("r2t", "name_accuracy"), ("t2r", "mean_iou"), ("t2r", "region_f1"),
           ("t2r", "object_f1"), ("t2r", "acc@0.5"), ("t2r", "parse_failures")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--max-samples", type=int, default=200, help="per task")
    a = ap.parse_args()
    params = load_params(a.params)
    inst = Path(params["materialize"]["out"])
    items = test_items(inst / "meta_test.json", ["r2t", "t2r"], a.max_samples, params["seed"])
    cfg = params["evaluate"]

    prior = PriorBaseline(r for r, _ in iter_records(inst / "meta_file.json", ["r2t", "t2r"]))
    results = {"prior (no image)": score([{**i, "prediction": prior.answer(i)} for i in items], cfg)}
    models = {
        "untrained (random init)": Path(params["align"]["out"]) / "base",
        "after align": Path(params["align"]["out"]) / "model",
        "after tune (LoRA)": Path(params["tune"]["out"]) / "model",
    }
    queries = [Query(Path(i["image"]), i["question"], i["base_prompt"]) for i in items]
    for name, path in models.items():
        answers = Generator.from_pretrained(path).generate(queries, cfg["batch_size"], cfg["max_new_tokens"])
        results[name] = score([{**i, "prediction": p} for i, p in zip(items, answers)], cfg)

    header = "| model | " + " | ".join(f"{t} {k}" for t, k in FIGURES) + " |"
    print(f"{len(items)} held-out items ({sum(i['task'] == 'r2t' for i in items)} R2T, "
          f"{sum(i['task'] == 't2r' for i in items)} T2R)\n")
    print(header)
    print("|" + "---|" * (len(FIGURES) + 1))
    for name, m in results.items():
        cells = [m[t][k] for t, k in FIGURES]
        print(f"| {name} | " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    Path("artifacts/benchmarks").mkdir(parents=True, exist_ok=True)
    Path("artifacts/benchmarks/learning.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
