"""What more base pretraining buys Text-to-Region: phase 1 of the tiny preset's pretraining run for
each step count from one fresh base, each scored on the same held-out T2R items against the
image-blind mean-box prior, paired per item (BENCHMARKS.md, "The budget cannot hold it").

Run after `make pipeline` has materialized the data (it reads params.yaml and artifacts/):
    .venv/bin/python benchmarks/pretrain_curve.py --steps 400 1000 2000
Phase 1 is the committed one (params `pretrain.phases[0]`) with only `max_steps` changed (and the
learning rate, with --lr); questions are asked without base prompts, as phase 1 trains. Outputs
go to artifacts/benchmarks/pretrain-curve/ (one model per step count) and the figures to
artifacts/benchmarks/pretrain_curve.json.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from learning import paired  # benchmarks/learning.py (this folder is on the path when run as a script)

from medrega import config, io
from medrega.metrics.baselines import PriorBaseline
from medrega.metrics.scoring import score_samples
from model.data import iter_records
from model.infer import Generator, Query
from model.recipes import pretrain
from tasks.align import build_base
from tasks.evaluate import scorer, test_items

OUT = Path("artifacts/benchmarks")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", required=True, help="phase-1 step counts, one run each")
    ap.add_argument("--lr", type=float, default=None, help="phase-1 learning rate (default: the committed one)")
    ap.add_argument("--items", type=int, default=300, help="held-out T2R items, drawn once with seed 0")
    ap.add_argument("--params", default="params.yaml")
    a = ap.parse_args()
    cfg = config.resolve(a.params, None)
    meta = cfg.materialize.out / "meta_file.json"
    items = test_items(cfg.materialize.out / "meta_test.json", ["t2r"], -1, cfg.seed)
    items = random.Random(0).sample(items, min(a.items, len(items)))
    s = scorer(cfg.evaluate)
    blind = PriorBaseline((r for r, _ in iter_records(meta, ["r2t", "t2r"])), kind="mean")
    prior = score_samples([{**i, "prediction": blind.answer(i)} for i in items], scorer=s)
    prior_iou = statistics.mean(p["iou"] for p in prior)
    queries = [Query(Path(i["image"]), i["question"], None) for i in items]

    root = OUT / "pretrain-curve"
    base = root / "base"
    if not (base / "config.json").exists():
        build_base(cfg, meta, base)
    rows = []
    for steps in a.steps:
        update = {"max_steps": steps, "save_steps": steps} | ({"learning_rate": a.lr} if a.lr else {})
        phase = cfg.pretrain.phases[0].model_copy(update=update)
        start = time.perf_counter()
        pretrain.run(cfg, phase, meta, base, root / f"phase-1-{steps}")
        seconds = time.perf_counter() - start
        answers = Generator.from_pretrained(root / f"phase-1-{steps}" / "model").generate(
            queries, cfg.evaluate.batch_size, cfg.evaluate.max_new_tokens)
        scored = score_samples([{**i, "prediction": p} for i, p in zip(items, answers)], scorer=s)
        rows.append({"steps": steps, "learning_rate": phase.learning_rate, "train_s": round(seconds),
                     "t2r_mean_iou": statistics.mean(m["iou"] for m in scored), "prior_mean_iou": prior_iou,
                     "iou_minus_prior": paired(scored, prior, "iou")})
        print(rows[-1], flush=True)
    print(f"\n{len(items)} held-out T2R items; phase 1 as committed but max_steps\n")
    print("| phase-1 steps | train s | T2R mean IoU | mean-box prior | model minus prior (SE) |")
    print("|---|---|---|---|---|")
    for r in rows:
        gap = r["iou_minus_prior"]
        print(f"| {r['steps']} | {r['train_s']} | {r['t2r_mean_iou']:.3f} | {r['prior_mean_iou']:.3f} | "
              f"{gap['mean']:+.3f} ({gap['stderr']:.3f}) |")
    io.write_json(OUT / "pretrain_curve.json", {"items": len(items), "runs": rows})


if __name__ == "__main__":
    main()
