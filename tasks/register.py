"""Register: log the tuned model as an MLflow pyfunc and register a version as `challenger`.

The logged model stands alone: weights (merged, or base + LoRA adapter per `register.weights`),
tokenizer with its chat template, processor config, the `model/` package as code (box parser,
inference), a signature and an input example. With `register.weights: reference` the weights are
not copied: the model carries where the tuned checkpoint is on the DVC remote and its hashes
(medrega/weights.py), checked here to be on the remote, fetched and verified when it loads.
Each version carries a curated set of tags: lineage (git commit, the DVC hashes of the dataset
and checkpoint from dvc.lock, profile, Prefect flow run), the gate's and headline figures, and
what they were measured on (the promotion gate reads these). Every figure, every DVC hash and
the params are in the run's `registration.json`. A markdown model card is logged with the model
and set as the version's description.
"""
from __future__ import annotations

import base64
import io as bytes_io
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from PIL import Image

from medrega import experiments, io, registry, tracking
from medrega import weights as weights_mod
from medrega.config import Config, RegisterConfig
from medrega.errors import BadInput
from medrega.grammar import BASE_PROMPTS
from medrega.metrics import figures

REPO = Path(__file__).resolve().parent.parent
# the served model's code: the network package and the text format it reads and writes
CODE_PATHS = [REPO / "model", REPO / "medrega"]


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def dvc_hashes(lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """`stage:path -> md5` for every output recorded in dvc.lock."""
    if not lock_file.exists():
        return {}
    lock = yaml.safe_load(lock_file.read_text()) or {}
    hashes = {}
    for stage, body in (lock.get("stages") or {}).items():
        for out in body.get("outs", []):
            hashes[f"{stage}:{out['path']}"] = out.get("md5", "")
    return hashes


def example_input(image_path: Path) -> pd.DataFrame:
    buffer = bytes_io.BytesIO()
    with Image.open(image_path) as image:
        image.convert("RGB").save(buffer, format="PNG")
    return pd.DataFrame({
        "image": [base64.b64encode(buffer.getvalue()).decode()],
        "question": ["Where is the <ref>liver</ref> in this image?"],
        "task": ["t2r"],
    })


def flat_metrics(eval_dir: Path) -> dict[str, float]:
    """`task.figure` and `task.lang.figure` from metrics.json and breakdown.json (when present)."""
    eval_dir = Path(eval_dir)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    out = {f"{task}.{k}": float(v) for task, m in metrics.items() for k, v in m.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    breakdown = eval_dir / "breakdown.json"
    if breakdown.exists():
        for task, m in json.loads(breakdown.read_text()).items():
            for lang, figures in ((m.get("by") or {}).get("by_lang") or {}).items():
                out.update({f"{task}.{lang}.{k}": float(v) for k, v in figures.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


def lineage_hashes(cfg: Config, lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """The DVC hashes of the dataset and of the tuned checkpoint this model came from."""
    out = {"dvc.dataset": "", "dvc.checkpoint": ""}
    if not lock_file.exists():
        return out
    stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages") or {}
    data_root = str(cfg.data.root).rstrip("/")
    for dep in (stages.get("validate") or {}).get("deps", []):
        if dep.get("path", "").rstrip("/") == data_root:
            out["dvc.dataset"] = dep.get("md5", "")
    for o in (stages.get("tune") or {}).get("outs", []):
        if o.get("path", "").rstrip("/") == str(cfg.tune.out).rstrip("/"):
            out["dvc.checkpoint"] = o.get("md5", "")
    return out


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "question"),
                       ColSpec("string", "task", required=False)]),
        outputs=Schema([ColSpec("string", "answer"), ColSpec("string", "regions")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 0)]),
    )


def release_metrics(eval_dir: Path) -> dict:
    """The authors' protocol's figures from metrics.json (`release`), {} when it has none."""
    release = json.loads((Path(eval_dir) / "metrics.json").read_text()).get("release")
    return release if isinstance(release, dict) else {}


def release_section(release: dict) -> list[str]:
    """Model-card lines: the authors' released evaluators' figures, one table per task and
    setting (or language), in their keys, so none can be read as ours."""
    lines = ["## Evaluation under the authors' released evaluators (protocol `release`)", "",
             "The same answers scored by the evaluators of xmed-lab/MedRegA (`src/eval`), reproduced with their",
             "defects (docs/evaluation-protocols.md): comparable with the paper's tables, not with the figures above.",
             "Keys are theirs (their `precision`/`recall` swapped; SM = one object in several boxes, their `ms`).", ""]
    if not release:
        return lines + ["(not computed for this evaluation)", ""]
    for task, subs in sorted(release.items()):
        for sub, theirs in sorted(subs.items()):
            keys = list(theirs)
            lines += [f"### {task} · {sub}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                      "| " + " | ".join(f"{theirs[k]:.4g}" for k in keys) + " |", ""]
    return lines


def model_card(cfg: Config, metrics: dict[str, float], lineage: dict[str, str], instructions_dir: Path | None,
               release: dict | None = None) -> str:
    """Markdown: data mix, training settings, metrics tables (ours, then the authors' protocol's), known limits."""
    t, m = cfg.tune, cfg.model
    lines = [f"# {cfg.register_.model_name}: MedRegA ({cfg.profile} profile)", "",
             "Region-aware bilingual (English/Chinese) medical multimodal LLM. Input: an image and a question;",
             "output: the answer text and the regions it names, as boxes in pixels of the input image.", "",
             "## Lineage", ""]
    lines += [f"- {k}: `{v}`" for k, v in lineage.items() if not k.startswith("dvc.") or k in ("dvc.dataset", "dvc.checkpoint")]
    lines += ["", "## Data mix (training annotation files)", "", "| dataset | records | repeat_time | augment |", "|---|---|---|---|"]
    meta = Path(instructions_dir) / "meta_file.json" if instructions_dir else None
    if meta and meta.exists():
        mix: dict[str, list] = {}
        for name, entry in json.loads(meta.read_text(encoding="utf-8")).items():
            # materialize writes one entry per shard ("r2t_en-00003"): one row per dataset here
            row = mix.setdefault(re.sub(r"-\d{5}$", "", name), [0, entry.get("repeat_time"), entry.get("data_augment")])
            row[0] += entry.get("length") or 0
        for name, (n, repeat, augment) in sorted(mix.items()):
            lines.append(f"| {name} | {n} | {repeat} | {augment} |")
    else:
        lines.append("| (meta_file.json not available) | | | |")
    lines += ["", "## Training", "",
              f"- base: preset `{m.preset}`{', checkpoint `' + str(m.checkpoint) + '`' if m.checkpoint else ''}, "
              f"{m.image_size} px images, max length {m.max_length}",
              f"- stage 1 (align): projector only, {cfg.align.max_steps} steps, lr {cfg.align.learning_rate}",
              f"- stage 2 (tune): mode `{t.mode}`" + (f" (LoRA r={t.lora.r}, alpha={t.lora.alpha}, dropout={t.lora.dropout})" if t.mode == "lora" else "")
              + f", {t.max_steps} steps, lr {t.learning_rate} {t.lr_scheduler}, weight decay {t.weight_decay}, "
              + (f"DeepSpeed ZeRO-{t.deepspeed.zero_stage}, " if t.deepspeed else "no DeepSpeed, ")
              + f"{t.launcher.nnodes}x{t.launcher.nproc_per_node} ranks",
              f"- weights shipped: `{cfg.register_.weights}`", "",
              "## Evaluation (protocol `medrega`, ours: held-out patients; precision/recall in the standard sense)", ""]
    tasks = sorted({k.split(".")[0] for k in metrics})
    for task in tasks:
        figures = sorted({k.split(".")[-1] for k in metrics if k.startswith(task + ".")})
        langs = sorted({k.split(".")[1] for k in metrics if k.startswith(task + ".") and k.count(".") == 2})
        lines += [f"### {task}", "", "| figure | all | " + " | ".join(langs) + " |", "|---|---|" + "---|" * len(langs)]
        for fig in figures:
            cells = [metrics.get(f"{task}.{fig}")] + [metrics.get(f"{task}.{lang}.{fig}") for lang in langs]
            lines.append(f"| {fig} | " + " | ".join("" if c is None else f"{c:.4g}" for c in cells) + " |")
        lines.append("")
    lines += release_section(release or {})
    lines += ["## Known limits", "",
              "- The `tiny` profile is a few-million-parameter model trained minutes on synthetic scans: its answers",
              "  demonstrate the pipeline, not medical ability. Never use any profile's output for diagnosis.",
              "- Boxes are on a 0-999 grid relative to the original image; small structures lose precision.",
              "- One 2D image per question (3D scans: a single slice); no multi-turn dialogue.",
              "- Unparseable answers return no regions (`regions` is `[]`), never a zero box.",
              "- Grounded-report metrics are absent when the evaluation set had no grounded reports."]
    return "\n".join(lines) + "\n"


def measured_on(eval_dir: Path) -> dict[str, Any] | None:
    """What evaluation measured its figures on (breakdown.json's `measured_on`), or None for an
    evaluation that predates it (such a version is "not comparable" at promotion, never assumed so)."""
    breakdown = Path(eval_dir) / "breakdown.json"
    return json.loads(breakdown.read_text()).get("measured_on") if breakdown.exists() else None


def version_tags(lineage: dict[str, str], metrics: dict[str, float], gates: list[str],
                 measured: dict[str, Any] | None) -> dict[str, str]:
    """The curated tags of a version: lineage, the gate's figures and a few headline ones
    (medrega.metrics.figures.HEADLINE), and what they were measured on. Everything else is in
    the run's registration.json (a version page of 249 tags is read by nobody)."""
    tagged = {figures.tag_name(k): v for k, v in metrics.items()}
    wanted = [f"{task}.{f}" for task, names in figures.HEADLINE.items() for f in names] + list(gates)
    tags = {**lineage, **{f"{registry.METRIC_PREFIX}{k}": str(tagged[k]) for k in wanted if k in tagged}}
    if measured:
        tags.update(registry.measured_tags(measured))
    return tags


def weight_artifacts(config: Config, model_dir: Path, adapter_dir: Path | None, base_dir: Path | None,
                     staging: Path) -> tuple[dict[str, str], dict[str, Any] | None]:
    """The pyfunc artifacts holding (or pointing at) the weights, and the DVC reference if any."""
    weights = config.register_.weights
    if weights == "reference":
        tuned = config.tune.out / "model"
        if Path(model_dir).resolve() != tuned.resolve():
            raise BadInput(f"{model_dir}: register.weights=reference registers the checkpoint DVC tracks "
                           f"({tuned}); a model elsewhere needs register.weights merged")
        reference = weights_mod.reference(config.tune.out)
        io.write_json(staging / "weights_ref.json", reference)
        return {"weights_ref": str(staging / "weights_ref.json")}, reference
    if weights == "adapter":
        adapter_dir = Path(adapter_dir or config.tune.out / "adapter")
        base_dir = Path(base_dir or config.align.out / "model")
        for path in (adapter_dir, base_dir):
            if not path.is_dir():
                raise BadInput(f"{path}: needed for register.weights=adapter")
        return {"base": str(base_dir), "adapter": str(adapter_dir)}, None
    return {"model": str(model_dir)}, None


def requirements(reference: dict[str, Any] | None) -> list[str]:
    reqs = [f"torch=={_version('torch')}", f"transformers=={_version('transformers')}",
            f"peft=={_version('peft')}", "pillow", "pandas", f"mlflow=={_version('mlflow')}"]
    if reference:  # loading fetches through DVC (and its S3 plug-in for s3:// remotes)
        reqs += [f"dvc=={_version('dvc')}", "pyyaml"]
        if reference["remote"]["url"].startswith("s3://"):
            reqs.append(f"dvc-s3=={_version('dvc-s3')}")
    return reqs


def not_registered(cfg: RegisterConfig, exp: experiments.Experiment, out_dir: Path) -> dict[str, Any]:
    """Inside a DVC experiment (unless register.in_experiments): no version, `alias` where it
    was; the experiment's figures are in its evaluate run (tagged dvc.exp_name). The output says
    so, for `dvc exp show` and for the flow, which registers an applied experiment's model."""
    result = {"registered": False, "model_name": cfg.model_name, "experiment": exp.name,
              "reason": f"inside DVC experiment {exp.name!r} (register.in_experiments is false)"}
    io.write_json(Path(out_dir) / "registered.json", result)
    return result


def register(model_dir: Path, eval_dir: Path, out_dir: Path, config: Config,
             example_image: Path | None = None, adapter_dir: Path | None = None,
             base_dir: Path | None = None, instructions_dir: Path | None = None) -> dict[str, Any]:
    import mlflow

    from model.pyfunc import MedRegAModel

    cfg = config.register_
    out_dir = Path(out_dir)
    exp = experiments.current()
    if exp is not None and not cfg.in_experiments:
        return not_registered(cfg, exp, out_dir)
    metrics, measured = flat_metrics(eval_dir), measured_on(eval_dir)
    staging = out_dir / "staging"
    prompts: dict[str, Any] = {task: dict(langs) for task, langs in BASE_PROMPTS.items()}
    prompts["_max_new_tokens"] = config.evaluate.max_new_tokens
    io.write_json(staging / "base_prompts.json", prompts)
    io.write_json(staging / "params.json", config.as_dict())
    artifacts, reference = weight_artifacts(config, model_dir, adapter_dir, base_dir, staging)

    with tracking.stage_run("register", {"register": cfg}) as run:
        lineage = {"git_commit": git_commit(), "prefect_flow_run_id": os.environ.get("MEDREGA_FLOW_RUN_ID", ""),
                   "profile": config.profile, "weights": cfg.weights, **lineage_hashes(config),
                   "params.tune.mode": config.tune.mode, "params.model.preset": config.model.preset,
                   **(exp.tags() if exp else {})}
        if reference:
            lineage["weights.remote"] = reference["remote"]["url"]
        mlflow.set_tags(lineage)
        mlflow.log_params(tracking.flatten({k: v for k, v in config.as_dict().items() if k != "register"}))
        mlflow.log_metrics({tracking.metric_name(k.replace(".", "/")): v for k, v in metrics.items()})
        # the whole record, of which the version's tags are the curated part
        mlflow.log_dict({"lineage": {**lineage, **{f"dvc.{k}": v for k, v in dvc_hashes().items()}},
                         "metrics": metrics, "measured_on": measured, "weights": reference or {"layout": cfg.weights},
                         "params": config.as_dict()}, "registration.json")
        card = model_card(config, metrics, lineage, instructions_dir or config.materialize.out,
                          release_metrics(eval_dir))
        io.write_text(staging / "model_card.md", card)
        mlflow.log_text(card, "model_card.md")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=MedRegAModel(),
            artifacts={**artifacts, "base_prompts": str(staging / "base_prompts.json"),
                       "params": str(staging / "params.json"), "model_card": str(staging / "model_card.md")},
            code_paths=[str(p) for p in CODE_PATHS],
            signature=signature(),
            # where the served model places itself unless its loader says otherwise (model/pyfunc.py)
            model_config={"dtype": config.model.dtype, "device_map": config.model.device_map},
            # MLflow loads the model to check an input example: by reference that would download
            # the whole checkpoint at registration, so the example goes with the copied layouts only
            input_example=example_input(example_image) if example_image and not reference else None,
            pip_requirements=requirements(reference),
            registered_model_name=cfg.model_name,
        )
        client = mlflow.MlflowClient()
        version = str(info.registered_model_version)
        client.update_model_version(cfg.model_name, version, description=card)
        for key, value in version_tags(lineage, metrics, list(cfg.gate.metrics), measured).items():
            client.set_model_version_tag(cfg.model_name, version, key, str(value))
        # the alias last: a challenger never stands without the evidence the gate reads
        client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
        result = {"registered": True, "model_name": cfg.model_name, "version": version, "alias": cfg.alias,
                  "uri": f"models:/{cfg.model_name}@{cfg.alias}", "run_id": run.info.run_id,
                  "weights": cfg.weights, "tracking_uri": tracking.tracking_uri()}
        if reference:
            result["checkpoint"] = {"remote": reference["remote"]["url"], "md5": reference["checkpoint"]["md5"]}
    io.write_json(out_dir / "registered.json", result)
    return result


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package).split("+")[0]
