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

Answers are generated in this process, or (`evaluate.launcher`) on every rank of a torchrun or
Slurm launch, each rank a deterministic share of the batches (model/recipes/generate.py), merged
in item order: the same answers either way. The model is placed per `model.dtype` and
`model.device_map` (model.infer.placement).

Any model can be evaluated, not only the one tune wrote (`medrega evaluate --model`): a Hugging
Face InternVL folder, an InternVL remote-layout checkpoint (imported first, model/convert.py), or a
registered model (`models:/NAME@ALIAS`, `runs:/...`), so released weights can be scored on the
same held-out split before anything is tuned. Such a run writes `comparison.json`: each headline
figure beside the pipeline's own evaluation of its tuned model, when that covered the same items.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from medrega import config as config_mod
from medrega import io, tracking
from medrega.config import Config, EvaluateConfig
from medrega.errors import BadInput
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


def model_folder(ref: str, work: Path, max_length: int) -> Path:
    """A local Hugging Face InternVL folder, with its processor, for what `medrega evaluate --model`
    names: such a folder, a remote-layout InternVL checkpoint (imported under `work`, reused while
    the source is unchanged), a logged pyfunc model folder, or a registered model URI."""
    if ref.startswith(("models:/", "runs:/")):
        return pyfunc_weights(download(ref, work / "registered"), work)
    path = Path(ref)
    if not path.is_dir():
        raise BadInput(f"{ref}: no such model folder (give a folder, or a registered model as models:/NAME@ALIAS)")
    if (path / "MLmodel").is_file():
        return pyfunc_weights(path, work)
    from model.convert import checkpoint_layout, ensure_hf_checkpoint
    from model.processor import CONFIG_NAME

    if checkpoint_layout(path) == "remote":
        return Path(ensure_hf_checkpoint(str(path), work, max_length=max_length))
    if not (path / CONFIG_NAME).is_file():
        raise BadInput(f"{path}: a Hugging Face InternVL folder without {CONFIG_NAME}, so its image size and chat "
                       "format are unknown; give the remote-layout checkpoint (it is imported with them) or a "
                       "folder this pipeline wrote")
    return path


def download(uri: str, dst: Path) -> Path:
    """A registered (or logged) model's files, from the tracking server in MLFLOW_TRACKING_URI."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking.tracking_uri())
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise BadInput(f"{uri}: {err.message} (tracking server {tracking.tracking_uri()})") from None
        raise


def pyfunc_weights(folder: Path, work: Path) -> Path:
    """The weights of a logged MedRegA pyfunc model: the merged checkpoint, the referenced one
    (fetched from the DVC remote and verified), or base + LoRA adapter merged once into
    `work/merged` (what the served model does in memory)."""
    import yaml

    flavor = (yaml.safe_load((folder / "MLmodel").read_text()).get("flavors") or {}).get("python_function") or {}
    artifacts = {name: folder / entry["path"] for name, entry in (flavor.get("artifacts") or {}).items()}
    if "model" in artifacts:
        return artifacts["model"]
    if "weights_ref" in artifacts:
        from medrega import weights

        return weights.fetch(json.loads(artifacts["weights_ref"].read_text(encoding="utf-8")))
    if {"base", "adapter"} <= set(artifacts):
        from tasks.tune import merge_adapter

        merge_adapter(artifacts["base"], artifacts["adapter"], work / "merged")
        return work / "merged"
    raise BadInput(f"{folder / 'MLmodel'}: not a MedRegA model (its artifacts are {sorted(artifacts) or 'none'}; "
                   "expected 'model', 'weights_ref', or 'base' and 'adapter')")


def generate_answers(items: list[dict[str, Any]], model_dir: Path, out_dir: Path, config: Config) -> list[str]:
    """The model's answer to every item, in item order: here, or on the ranks of `evaluate.launcher`."""
    cfg = config.evaluate
    queries = [Query(Path(i["image"]), i["question"], i["base_prompt"]) for i in items]
    if cfg.launcher is None:
        generator = Generator.from_pretrained(model_dir, config.model.dtype, config.model.device_map)
        return generator.generate(queries, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
    from model.launch import launch
    from model.recipes import generate

    work = out_dir / "ranks"
    shutil.rmtree(work, ignore_errors=True)  # answers of an earlier run must not be merged into this one
    generate.write_queries(work, queries)
    run_config = config_mod.write_resolved(config, work / "config.yaml")
    launch(cfg.launcher, ["-m", "model.recipes.generate", "--config", str(run_config), "--model", str(model_dir),
                          "--work", str(work)], out_dir / "generate.log", stage="evaluate")
    answers = generate.merge(work, len(queries))
    shutil.rmtree(work)
    return answers


def evaluate(instructions_dir: Path, model_dir: Path, out_dir: Path, config: Config,
             model_ref: str | None = None) -> dict[str, Any]:
    """Answer and score the held-out items. `model_ref` names a model other than the pipeline's
    tuned one (as the user gave it): it is tagged on the MLflow run and compared (`comparison.json`)."""
    cfg = config.evaluate
    out_dir = Path(out_dir)
    loaded = plugins.load_plugins(cfg.plugins)  # a requested plug-in that cannot load fails before anything
    tasks = [t for t in (cfg.tasks or config.materialize.tasks) if t in TASKS]
    items = test_items(Path(instructions_dir) / "meta_test.json", tasks, cfg.max_samples_per_task, config.seed)
    measured = measured_on(items, cfg)
    with tracking.stage_run("evaluate", {"evaluate": cfg}):
        import mlflow

        if model_ref:
            mlflow.set_tags({"medrega.model": model_ref, "medrega.model_dir": str(model_dir)})
        predictions = generate_answers(items, Path(model_dir), out_dir, config)
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
        tracking.log_task_metrics({task: m for task, m in flat.items() if task != RELEASE})
        tracking.log_release_metrics(flat[RELEASE])
        names = ["answers.jsonl", "breakdown.json", "report.html"]
        if model_ref and compare(out_dir, cfg.out, model_ref):
            names.append("comparison.json")
        for name in names:
            mlflow.log_artifact(str(out_dir / name))
    return flat


def compare(out_dir: Path, pipeline_dir: Path, model_ref: str) -> bool:
    """`comparison.json`: this model's headline figures beside the pipeline's tuned model's, and
    the difference tuning made (tuned minus this), when both answered the same items."""
    ours, theirs = Path(out_dir), Path(pipeline_dir)
    if ours.resolve() == theirs.resolve() or not (theirs / "metrics.json").is_file():
        return False

    def ids(folder: Path) -> list | None:
        answers = folder / "answers.jsonl"
        lines = answers.read_text(encoding="utf-8").splitlines() if answers.is_file() else None
        return None if lines is None else [json.loads(line)["id"] for line in lines]

    if ids(ours) != ids(theirs):
        return False  # another split, sample cap or task mix: the figures would not be comparable
    this, tuned = (json.loads((d / "metrics.json").read_text(encoding="utf-8")) for d in (ours, theirs))
    figures = {}
    for task in sorted(set(this) & set(tuned)):
        for key in sorted(set(this[task]) & set(tuned[task])):
            a, b = this[task][key], tuned[task][key]
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
                figures[f"{task}.{key}"] = {"model": a, "tuned": b, "tuning_difference": b - a}
    io.write_json(ours / "comparison.json", {"model": model_ref, "tuned_evaluation": str(theirs), "figures": figures})
    return True
