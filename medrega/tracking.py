"""MLflow tracking: where runs go, and one run per stage nested under the pipeline's run.

Default store: SQLite under `mlflow/` with artifacts in `mlflow/artifacts` (MLflow >= 3.13
refuses the plain file store). `MLFLOW_TRACKING_URI` points elsewhere (a real server). The
pipeline flow exports `MEDREGA_PARENT_RUN_ID` so stages started by `dvc repro` nest under it.
Inside a DVC experiment each stage's run carries the experiment's name (`dvc.exp_name`) and
lands in the repository's store even when DVC runs the experiment in a copy under .dvc/tmp/exps.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXPERIMENT = os.environ.get("MEDREGA_EXPERIMENT", "medrega")
PARENT_ENV = "MEDREGA_PARENT_RUN_ID"
MLFLOW_DIR = Path("mlflow")
# MLflow 3's UI opens an experiment on the view its kind names; without the tag it guesses, and
# guessed GenAI traces (empty here) for ours. Its values in MLflow 3.17: genai_development,
# custom_model_development (runs: training, metrics, models), and `*_inferred` / no_inferred_type
# for the UI's own guesses.
KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"


def store_dir() -> Path:
    """`mlflow/` of the repository: DVC_ROOT names it when DVC runs a stage in an experiment's
    copy under .dvc/tmp/exps (deleted afterwards, and with it anything logged there)."""
    return Path(os.environ.get("DVC_ROOT") or ".") / MLFLOW_DIR


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(store_dir() / 'mlflow.db').resolve()}"


ARTIFACT_ROOT_ENV = "MEDREGA_ARTIFACT_ROOT"


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside its database (else MLflow uses ./mlruns);
    a tracking server decides for itself. `MEDREGA_ARTIFACT_ROOT` (e.g. `s3://bucket/mlflow`,
    with `MLFLOW_S3_ENDPOINT_URL` for MinIO/Ceph) puts a new experiment's artifacts there;
    boto3 takes the credentials from the environment or ~/.aws, never from MLflow."""
    if os.environ.get(ARTIFACT_ROOT_ENV):
        return os.environ[ARTIFACT_ROOT_ENV].rstrip("/") + f"/{EXPERIMENT}"
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None


def setup() -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        store_dir().mkdir(exist_ok=True)
    existing = mlflow.get_experiment_by_name(EXPERIMENT)
    if existing is None:
        experiment_id = mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_location(uri),
                                                 tags={KIND_TAG: KIND})
    else:
        experiment_id = existing.experiment_id
        # an experiment made before the tag, or one the UI guessed for: a choice made in the UI stays
        kind = existing.tags.get(KIND_TAG, "")
        if kind in ("", "no_inferred_type") or kind.endswith("_inferred"):
            mlflow.MlflowClient().set_experiment_tag(experiment_id, KIND_TAG, KIND)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested sections (dicts or config models) as `a.b.c` -> text, for MLflow params."""
    out: dict[str, str] = {}
    for key, value in d.items():
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json", by_alias=True)
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


@contextmanager
def stage_run(stage: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
    """An MLflow run for one stage, nested under the pipeline run when there is one."""
    import mlflow

    from medrega import experiments

    setup()
    parent = os.environ.get(PARENT_ENV)
    exp = experiments.current()
    name = f"{stage} ({exp.name})" if exp else stage
    with mlflow.start_run(run_name=name, parent_run_id=parent, nested=bool(parent)) as run:
        mlflow.set_tags({"medrega.stage": stage, **(exp.tags() if exp else {})})
        if params:
            mlflow.log_params(flatten(params, f"{stage}."))
        yield run


def log_json(data: Any, artifact_file: str) -> None:
    import mlflow

    mlflow.log_dict(data, artifact_file)


def log_history(history: list[dict[str, Any]], prefix: str = "train") -> None:
    """Trainer log history (loss, learning rate, grad norm) as step-indexed metrics; one prefix
    per Trainer run, so curves that each start at step 1 in one MLflow run stay apart."""
    import mlflow

    for entry in history:
        step = int(entry.get("step", 0))
        for key in ("loss", "learning_rate", "grad_norm"):
            if isinstance(entry.get(key), (int, float)):
                mlflow.log_metric(f"{prefix}/{key}", float(entry[key]), step=step)


def log_training(summary: dict[str, Any], prefix: str | None = None) -> None:
    """A training summary: the loss curve as metrics, the scalar figures, the whole as JSON.
    `prefix` names one of several Trainer runs logged into the same MLflow run."""
    import mlflow

    log_history(summary.get("log_history", []), prefix or "train")
    scalars = {f"{prefix}/{k}" if prefix else k: float(v) for k, v in summary.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    mlflow.log_metrics(scalars)
    log_json(summary, f"{prefix or summary.get('stage', 'train')}_summary.json")


def metric_name(name: str) -> str:
    """MLflow allows only [A-Za-z0-9_-. :/] in metric names; `acc@0.5` becomes `acc_at_0.5`."""
    return name.replace("@", "_at_")


def log_release_metrics(release: dict[str, dict[str, dict[str, float]]]) -> None:
    """The authors' protocol's figures (`release_headline`) as `release/<task>/<setting or
    lang>/<their key>`, so no figure of theirs can be mistaken for one of ours."""
    import mlflow

    mlflow.log_metrics({metric_name(f"release/{task}/{sub}/{k}"): float(v) for task, subs in release.items()
                        for sub, figures in subs.items() for k, v in figures.items()})


def log_task_metrics(metrics: dict[str, dict[str, Any]]) -> None:
    """`{task: {figure: value}}` as `task/figure` metrics."""
    import mlflow

    mlflow.log_metrics({metric_name(f"{task}/{k}"): float(v) for task, m in metrics.items()
                        for k, v in m.items() if isinstance(v, (int, float))})
