"""Evaluate: generate answers on the held-out split of every task, then score them (SPEC §6).

Writes `answers.jsonl` (one line per sample: question, prediction, ground truth, image size,
task, language, modality, setting), `metrics.json` (headline figures, read by
`dvc metrics show`), `breakdown.json` (every figure by language, modality and setting) and
`report.html` (tables, IoU distribution, name confusions, a gallery of drawn boxes).
`breakdown.json` also holds, under "release", the figures the authors' released evaluators
print on the same answers (`medrega.metrics.release`, their keys), beside ours; their numeric
headline is in `metrics.json` under "release" (`{task: {setting or lang: {their key: value}}}`),
in the MLflow run as `release/<task>/<setting or lang>/<key>` and in the model card. Every other
figure is ours (protocol `medrega`). Under "measured_on": what the figures were measured on
(settings, sample counts, test-item hashes).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from medrega import io, tracking
from medrega.config import Config, EvaluateConfig
from medrega.metrics import html, plugins
from medrega.metrics.release import PROTOCOL as RELEASE, release_block, release_headline
from medrega.metrics.report import find_wordnet
from medrega.metrics.scoring import PROTOCOL, TASKS, Scorer, headline, model_texts, score_samples, summarise
from medrega.vocab import names_match, names_match_lenient
from model.data import iter_records
from model.infer import Generator, Query


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
                    **{k: record.get(k) for k in ("task", "lang", "modality", "setting", "answer_type")},
                })
    return items


# what, besides the image, decides a test item's figures: the model's input and the reference
ITEM_KEYS = ("id", "task", "lang", "modality", "setting", "answer_type", "question", "base_prompt",
             "ground_truth", "width", "height")


def measured_on(items: list[dict[str, Any]], cfg: EvaluateConfig) -> dict[str, Any]:
    """What the figures are measured on, so the registry compares only like with like: the
    settings that change a figure, and per task the sample count and a hash of the test items
    (their text and image bytes, not their paths: the same split hashes alike on any machine)."""
    tasks: dict[str, Any] = {}
    for task in dict.fromkeys(item["task"] for item in items):
        rows = [item for item in items if item["task"] == task]
        parts = [part for item in rows for part in ({k: item.get(k) for k in ITEM_KEYS}, Path(item["image"]))]
        tasks[task] = {"n": len(rows), "items": io.content_hash(*parts)}
    return {"protocol": PROTOCOL, "iou_threshold": cfg.iou_threshold, "name_match": cfg.name_match,
            "max_new_tokens": cfg.max_new_tokens, "tasks": tasks}


def scorer(cfg: EvaluateConfig) -> Scorer:
    match = names_match_lenient if cfg.name_match == "lenient" else names_match
    return Scorer(match, cfg.iou_threshold, find_wordnet(cfg.wordnet_dir))


def evaluate(instructions_dir: Path, model_dir: Path, out_dir: Path, config: Config) -> dict[str, Any]:
    cfg = config.evaluate
    out_dir = Path(out_dir)
    loaded = plugins.load_plugins(cfg.plugins)  # a requested plug-in that cannot load fails before anything
    tasks = [t for t in (cfg.tasks or config.materialize.tasks) if t in TASKS]
    items = test_items(Path(instructions_dir) / "meta_test.json", tasks, cfg.max_samples_per_task, config.seed)
    measured = measured_on(items, cfg)
    with tracking.stage_run("evaluate", {"evaluate": cfg}):
        generator = Generator.from_pretrained(model_dir)
        predictions = generator.generate(
            [Query(Path(i["image"]), i["question"], i["base_prompt"]) for i in items],
            batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
        )
        for item, prediction in zip(items, predictions):
            item["prediction"] = prediction
            del item["base_prompt"]
        s = scorer(cfg)
        samples = score_samples(items, scorer=s)
        metrics = summarise(samples, s, plugins.compute(loaded, model_texts(items)))
        flat = headline(metrics)
        metrics["release"] = release_block(items, wordnet=s.wordnet, bertscore=loaded.get("bertscore"))
        flat[RELEASE] = release_headline(metrics["release"])  # beside ours, never mixed in: its own key
        metrics["measured_on"] = measured  # read by register: the promotion gate compares like with like
        io.write_jsonl(out_dir / "answers.jsonl", items)
        io.write_json(out_dir / "breakdown.json", metrics)
        io.write_json(out_dir / "metrics.json", flat)
        io.write_text(out_dir / "report.html", html.render(metrics, items, samples, gallery=cfg.gallery))
        import mlflow

        tracking.log_task_metrics({task: m for task, m in flat.items() if task != RELEASE})
        tracking.log_release_metrics(flat[RELEASE])
        for name in ("answers.jsonl", "breakdown.json", "report.html"):
            mlflow.log_artifact(str(out_dir / name))
    return flat
