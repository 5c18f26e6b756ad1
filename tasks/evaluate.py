"""Evaluate: generate answers on the held-out split, then score them (SPEC §6).

Writes `answers.jsonl` (one line per sample: question, prediction, ground truth, image size,
task, language, modality, setting), `metrics.json` (headline figures, read by
`dvc metrics show`) and `breakdown.json` (every figure by language, modality and setting).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from medrega import io, tracking
from medrega.metrics.region import score_t2r
from medrega.metrics.text import score_r2t
from medrega.vocab import names_match, names_match_lenient
from model.data import iter_records
from model.infer import Generator, Query

SCORERS = {"t2r": score_t2r, "r2t": score_r2t}


def test_items(meta_test: Path, tasks: list[str], max_per_task: int, seed: int = 0) -> list[dict[str, Any]]:
    """The first `max_per_task` records of each task, taken evenly across its datasets."""
    per_dataset: dict[str, list] = {}
    for record, entry in iter_records(meta_test, tasks):
        per_dataset.setdefault(entry["annotation"], []).append((record, entry))
    items = []
    for task in tasks:
        groups = [rows for rows in per_dataset.values() if rows[0][0].get("task", "") == task]
        budget = max_per_task if max_per_task > 0 else sum(len(g) for g in groups)
        quota = -(-budget // max(1, len(groups)))  # ceil: an even share per dataset
        for rows in groups:
            # a seeded shuffle, so a capped test set spans every modality, not the first one
            rows = random.Random(seed).sample(rows, len(rows))
            for record, entry in rows[:quota]:
                items.append({
                    "id": record["id"], "image": str(Path(entry["root"]) / record["image"]),
                    "question": record["conversations"][0]["value"], "base_prompt": entry.get("base_prompt"),
                    "ground_truth": record["conversations"][1]["value"],
                    "width": record["width"], "height": record["height"],
                    **{k: record.get(k) for k in ("task", "lang", "modality", "setting")},
                })
    return items


def score(items: list[dict[str, Any]], cfg: dict[str, Any]) -> dict[str, Any]:
    match = names_match_lenient if cfg.get("name_match") == "lenient" else names_match
    out: dict[str, Any] = {}
    for task in ("t2r", "r2t"):
        rows = [i for i in items if i["task"] == task]
        if not rows:
            continue
        out[task] = score_t2r(rows, match, cfg["iou_threshold"]) if task == "t2r" else score_r2t(rows)
    return out


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar figures of each task (breakdowns go to breakdown.json)."""
    return {task: {k: v for k, v in m.items() if isinstance(v, (int, float))} for task, m in metrics.items()}


def evaluate(instructions_dir: Path, model_dir: Path, out_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
    cfg = params["evaluate"]
    out_dir = Path(out_dir)
    tasks = [t for t in params["materialize"]["tasks"] if t in SCORERS]
    items = test_items(Path(instructions_dir) / "meta_test.json", tasks, cfg["max_samples_per_task"], params["seed"])
    with tracking.stage_run("evaluate", {"evaluate": cfg}):
        generator = Generator.from_pretrained(model_dir)
        predictions = generator.generate(
            [Query(Path(i["image"]), i["question"], i["base_prompt"]) for i in items],
            batch_size=cfg["batch_size"], max_new_tokens=cfg["max_new_tokens"],
        )
        for item, prediction in zip(items, predictions):
            item["prediction"] = prediction
        metrics = score(items, cfg)
        flat = headline(metrics)
        io.write_text(out_dir / "answers.jsonl",
                      "".join(json.dumps({k: v for k, v in i.items() if k != "base_prompt"}, ensure_ascii=False) + "\n" for i in items))
        io.write_json(out_dir / "breakdown.json", metrics)
        io.write_json(out_dir / "metrics.json", flat)
        import mlflow

        tracking.log_task_metrics(flat)
        mlflow.log_artifact(str(out_dir / "answers.jsonl"))
        mlflow.log_artifact(str(out_dir / "breakdown.json"))
    return flat
