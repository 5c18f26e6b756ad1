"""Register: log the tuned model as an MLflow pyfunc and register a version as `challenger`.

Each version carries its lineage as tags: git commit, the DVC hashes of its data and model
(from dvc.lock), the Prefect flow run, and the evaluation metrics.
"""
from __future__ import annotations

import base64
import io as bytes_io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from PIL import Image

from medrega import io, tracking
from medrega.records.templates import BASE_PROMPTS

MODEL_DIR = Path(__file__).resolve().parent.parent / "model"


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


def register(model_dir: Path, eval_dir: Path, out_dir: Path, params: dict[str, Any],
             example_image: Path | None = None) -> dict[str, Any]:
    import mlflow
    from mlflow.models import infer_signature

    from model.pyfunc import MedRegAModel

    cfg = params["register"]
    metrics = json.loads((Path(eval_dir) / "metrics.json").read_text())
    out_dir = Path(out_dir)
    prompts = {task: dict(langs) for task, langs in BASE_PROMPTS.items()}
    prompts["_max_new_tokens"] = params["evaluate"]["max_new_tokens"]
    staging = out_dir / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "base_prompts.json").write_text(json.dumps(prompts, ensure_ascii=False))

    with tracking.stage_run("register", {"register": cfg}) as run:
        lineage = {"git_commit": git_commit(), "prefect_flow_run_id": os.environ.get("MEDREGA_FLOW_RUN_ID", ""),
                   "profile": params["profile"], **{f"dvc.{k}": v for k, v in dvc_hashes().items()}}
        mlflow.set_tags(lineage)
        tracking.log_task_metrics(metrics)
        example = example_input(example_image) if example_image else None
        signature = infer_signature(
            pd.DataFrame({"image": ["<base64>"], "question": ["q"], "task": ["t2r"]}),
            pd.DataFrame({"answer": ["a"], "regions": ["[]"]}),
        )
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=MedRegAModel(),
            artifacts={"model": str(model_dir), "base_prompts": str(staging / "base_prompts.json")},
            code_paths=[str(MODEL_DIR)],
            signature=signature,
            input_example=example,
            pip_requirements=[f"torch=={_version('torch')}", f"transformers=={_version('transformers')}",
                              f"peft=={_version('peft')}", "pillow", "pandas", f"mlflow=={_version('mlflow')}"],
            registered_model_name=cfg["model_name"],
        )
        client = mlflow.MlflowClient()
        version = str(info.registered_model_version)
        client.set_registered_model_alias(cfg["model_name"], cfg["alias"], version)
        for key, value in lineage.items():
            client.set_model_version_tag(cfg["model_name"], version, key, str(value))
        for task, m in metrics.items():
            for key, value in m.items():
                client.set_model_version_tag(cfg["model_name"], version, tracking.metric_name(f"metric.{task}.{key}"), str(value))
        result = {"model_name": cfg["model_name"], "version": version, "alias": cfg["alias"],
                  "uri": f"models:/{cfg['model_name']}@{cfg['alias']}", "run_id": run.info.run_id,
                  "tracking_uri": tracking.tracking_uri()}
    io.write_json(out_dir / "registered.json", result)
    return result


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package).split("+")[0]
