"""Evaluation speed: batched vs one-at-a-time generation, and scoring throughput.

Both generation modes run on the same model and the same test items in this one run, so the
ratio is free of machine-to-machine noise; answers must be identical under greedy decoding.
Scoring is timed on a synthetic answers file (default 100k lines) of every task.

    .venv/bin/python benchmarks/eval_bench.py --model artifacts/tune/model \
        --instructions artifacts/instructions --per-task 32 --batch-size 16
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from medrega.metrics.scoring import score_answers  # noqa: E402
from medrega.metrics.region import read_answers  # noqa: E402
from medrega.grammar import format_regions  # noqa: E402
from model.infer import Generator, Query  # noqa: E402
from tasks.evaluate import test_items  # noqa: E402


def bench_generation(args) -> dict:
    items = test_items(Path(args.instructions) / "meta_test.json", ["r2t", "t2r", "caption"], args.per_task)
    queries = [Query(Path(i["image"]), i["question"], i["base_prompt"]) for i in items]
    generator = Generator.from_pretrained(args.model)
    generator.generate(queries[:2], batch_size=2, max_new_tokens=4)  # warm-up (allocator, kernels)

    t0 = time.perf_counter()
    sequential = generator.generate(queries, batch_size=1, max_new_tokens=args.max_new_tokens)
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = generator.generate(queries, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    t_bat = time.perf_counter() - t0

    differ = [i for i, (a, b) in enumerate(zip(sequential, batched)) if a != b]
    for i in differ[:5]:
        print(f"  differs #{i}: sequential={sequential[i]!r} batched={batched[i]!r}")
    return {"samples": len(queries), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
            "sequential_samples_per_s": len(queries) / t_seq, "batched_samples_per_s": len(queries) / t_bat,
            "speedup": t_seq / t_bat, "identical_answers": not differ, "differing": len(differ)}


def synthetic_answers(n: int, seed: int = 0) -> list[dict]:
    """Answers of every task with realistic lengths; about half the predictions are wrong."""
    rng = random.Random(seed)
    names = ["liver", "left kidney", "right kidney", "spleen", "heart", "肝脏", "脾脏"]
    sentence = "the liver is of normal size with no focal lesion and the spleen is unremarkable".split()
    rows = []

    def box():
        x, y = rng.randint(0, 800), rng.randint(0, 800)
        return [x, y, x + rng.randint(20, 199), y + rng.randint(20, 199)]

    for i in range(n):
        task = ("t2r", "r2t", "grounded", "report", "vqa", "cls")[i % 6]
        lang = rng.choice(["en", "zh"])
        gt_regions = [(rng.choice(names), [box()]) for _ in range(rng.randint(1, 3))]
        pred_regions = [(rng.choice(names), [box()]) for _ in range(rng.randint(1, 3))]
        text = " ".join(rng.sample(sentence, 10)) if lang == "en" else "肝脏大小正常，未见明显占位。脾脏未见异常。"
        gt, pred = {
            "t2r": (format_regions(gt_regions), format_regions(pred_regions)),
            "r2t": (rng.choice(names), rng.choice(names)),
            "grounded": (format_regions(gt_regions) + ": " + text, format_regions(pred_regions) + ": " + text[::-1]),
            "report": (text, " ".join(rng.sample(sentence, 10))),
            "vqa": (rng.choice(["yes", "no", "liver"]), rng.choice(["yes", "no", "spleen"])),
            "cls": (rng.choice(names), rng.choice(names)),
        }[task]
        rows.append({"question": "q", "prediction": pred, "ground_truth": gt, "width": 512, "height": 512,
                     "task": task, "lang": lang, "modality": rng.choice(["ct", "mr", "xray"]),
                     "setting": "SS" if task == "t2r" else None,
                     "answer_type": ("closed" if gt in ("yes", "no") else "open") if task == "vqa" else None})
    return rows


def bench_scoring(n: int) -> dict:
    """The whole file (read + score + breakdowns), then each task's lines alone."""
    rows = synthetic_answers(n)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "answers.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        t0 = time.perf_counter()
        score_answers(read_answers(path))
        elapsed = time.perf_counter() - t0
    per_task = {}
    for task in ("t2r", "r2t", "grounded", "report", "vqa", "cls"):
        subset = [r for r in rows if r["task"] == task]
        t0 = time.perf_counter()
        score_answers(subset)
        per_task[task] = round(len(subset) / (time.perf_counter() - t0))
    return {"lines": n, "seconds": elapsed, "samples_per_s": n / elapsed, "per_task_samples_per_s": per_task}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="artifacts/tune/model")
    ap.add_argument("--instructions", default="artifacts/instructions")
    ap.add_argument("--per-task", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--score-lines", type=int, default=100_000)
    ap.add_argument("--skip-generation", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}")
    if not args.skip_generation:
        g = bench_generation(args)
        print(json.dumps(g, indent=2))
        print(f"batched vs sequential (baseline, same run): {g['speedup']:.2f}x samples/s; "
              f"identical answers: {g['identical_answers']}")
    if args.score_lines:
        s = bench_scoring(args.score_lines)
        print(json.dumps(s, indent=2))


if __name__ == "__main__":
    main()
