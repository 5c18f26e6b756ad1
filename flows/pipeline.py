"""The MedRegA pipeline as one Prefect flow.

Every stage runs through `dvc repro --single-item <stage>`, i.e. the exact command in
dvc.yaml, so Prefect runs and `dvc repro` runs are the same thing and DVC decides what is up
to date. The flow adds what DVC does not: retries, one MLflow parent run that the stages nest
under, a Prefect artifact per stage, and a `dvc push` once everything succeeded.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.tasks import exponential_backoff

from medrega import config as config_mod
from medrega import errors, runlock, stages, tracking
from medrega.config import Config
from medrega.errors import BadInput, MedregaError
from medrega.storage import dvc

STAGES = stages.NAMES


class PipelineFailed(MedregaError):
    def __init__(self, stage: str, detail: str, exit_code: int = 1):
        super().__init__(f"stage {stage!r} failed: {detail}")
        self.stage, self.exit_code = stage, exit_code


class StageFailed(RuntimeError):
    """A stage command exited non-zero; `kind` comes from the failure file it wrote (if any)."""

    def __init__(self, stage: str, kind: str, exit_code: int, log_tail: str):
        super().__init__(f"{stage} failed ({kind}, exit {exit_code}):\n{log_tail}")
        self.stage, self.kind, self.exit_code = stage, kind, exit_code


def stage_up_to_date(stage: str) -> bool:
    out = dvc("status", stage, "--json").stdout.strip()
    return json.loads(out or "{}") == {}


def _retry_unless_bad_input(task, task_run, state) -> bool:
    err = state.result(raise_on_failure=False)
    return not (isinstance(err, StageFailed) and err.kind == BadInput.kind)


@task(name="raw-data", retries=1)
def ensure_raw_data(cfg: Config) -> str:
    """The embedded default's raw data: generated if missing, then tracked by data.dvc."""
    logger = get_run_logger()
    root = cfg.data.root
    if not (root / "SAMed2D_v1.json").exists():
        logger.info("generating the embedded default data (synthetic + package scans) in %s", root)
        from medrega.sources.embedded import build_default

        build_default(root, cfg.data)
    status = dvc("status", "data.dvc", "--json", check=False)
    if status.returncode != 0 or json.loads(status.stdout.strip() or "{}"):
        dvc("add", "data")  # hashes and caches the data; data.dvc only changes if the data did
    return str(root)


def _flat(d: dict[str, Any], prefix: str = "") -> list[dict[str, str]]:
    rows = []
    for key, value in d.items():
        if isinstance(value, dict):
            rows += _flat(value, f"{prefix}{key}.")
        elif not isinstance(value, list):
            rows.append({"figure": f"{prefix}{key}", "value": str(value)})
    return rows


def dvc_repro(stage: str, env: dict[str, str], force: bool = False) -> None:
    """`dvc repro --single-item <stage>`, its output streamed live; a failure says which kind
    of failure from the file the stage command wrote (medrega.errors), not from DVC's text."""
    errors.clear_failure(stage)
    cmd = [str(Path(sys.executable).with_name("dvc")), "repro", "--single-item", *(["--force"] if force else []), stage]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        print(line, end="")  # live output in the terminal
    if proc.wait() != 0:
        failure = errors.read_failure(stage) or {"kind": "error", "exit_code": proc.returncode}
        raise StageFailed(stage, failure["kind"], failure["exit_code"], "\n".join(lines[-25:]))


@task(name="stage", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retry_unless_bad_input,
      task_run_name="{stage}")
def run_stage(stage: str, cfg: Config, env: dict[str, str]) -> dict[str, Any]:
    logger = get_run_logger()
    skipped = stage_up_to_date(stage)
    result = stages.read_result(cfg, stage)
    # an applied DVC experiment's register output says "not registered" (tasks/register.py): up to
    # date for DVC, but this run is where its model gets registered
    force = skipped and stage == "register" and result is not None and result.summary.get("registered") is False
    if skipped and not force:
        logger.info("%s: up to date (DVC), skipped", stage)
    else:
        logger.info("%s: running `dvc repro --single-item %s`%s", stage, stage,
                    " --force: not registered yet" if force else "")
        dvc_repro(stage, env, force=force)
        skipped = False
    result = stages.read_result(cfg, stage)
    summary = result.summary if result else {}
    rows = _flat(summary)[:200]
    create_table_artifact(key=f"medrega-{stage}", table=rows or [{"figure": "status", "value": "no summary"}],
                          description=f"**{stage}** — {'up to date, skipped' if skipped else 'ran'}")
    report = cfg.evaluate.out / "report.html"
    if stage == "evaluate" and report.exists():
        create_link_artifact(key="medrega-evaluation-report", link=report.resolve().as_uri(),
                             link_text="evaluation report (HTML)",
                             description="Tables by modality and language, IoU distribution, name confusions, box gallery")
    return {"stage": stage, "skipped": skipped, "summary": summary}


# S3 hiccups are the usual failure here: back off and retry (jittered, so two workspaces
# pushing to one bucket do not retry in step)
@task(name="dvc-push", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.5)
def dvc_push(targets: tuple[str, ...] = ()) -> str:
    out = dvc("push", *targets)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "pushed"


@flow(name="medrega-pipeline", log_prints=False)
def medrega_pipeline(profile: str | None = None, push: bool = True, params_file: str = "params.yaml") -> dict[str, Any]:
    # One run per workspace: a second run started meanwhile waits here (medrega/runlock.py)
    logger = get_run_logger()
    try:
        with runlock.run_lock(what=f"medrega pipeline (profile {profile or 'default'})", on_wait=logger.warning):
            return _pipeline(profile, push, params_file)
    except runlock.LockBusy as err:
        raise PipelineFailed("lock", str(err), err.exit_code) from err
    except BadInput as err:  # params.yaml itself
        raise PipelineFailed("config", str(err), err.exit_code) from err


def resolve_config(cfg: Config) -> None:
    """The active profile into params.resolved.yaml, recorded as DVC's `resolve` stage output
    (`dvc commit`, not a run: the stage's own command resolves params.yaml's `profile:` only, and
    DVC could restore that from its run cache), so what DVC compares is the profile chosen here."""
    config_mod.write_resolved(cfg)
    if not stage_up_to_date("resolve"):
        dvc("commit", "--force", "resolve")


def _pipeline(profile: str | None, push: bool, params_file: str) -> dict[str, Any]:
    import mlflow

    logger = get_run_logger()
    cfg = config_mod.resolve(params_file, profile)
    # dvc.yaml's commands (scripts/medrega) run this interpreter, and `dvc` finds its own
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, MEDREGA_PROFILE=cfg.profile, PYTHONUNBUFFERED="1", MEDREGA_PYTHON=sys.executable,
               PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    try:
        from prefect.runtime import flow_run

        env["MEDREGA_FLOW_RUN_ID"] = str(flow_run.id or "")
    except Exception:  # noqa: BLE001 - lineage is best effort outside a flow run
        pass

    try:
        ensure_raw_data(cfg)
    except Exception as err:  # noqa: BLE001 - name the stage in the run's state and exit code
        raise PipelineFailed("raw-data", f"{type(err).__name__}: {err}") from err
    try:
        resolve_config(cfg)
    except Exception as err:  # noqa: BLE001
        raise PipelineFailed("resolve", f"{type(err).__name__}: {err}") from err
    tracking.setup()
    results: dict[str, Any] = {}
    with mlflow.start_run(run_name=f"pipeline-{cfg.profile}") as parent:
        mlflow.set_tags({"medrega.profile": cfg.profile, "prefect.flow_run_id": env.get("MEDREGA_FLOW_RUN_ID", "")})
        env[tracking.PARENT_ENV] = parent.info.run_id
        for stage in STAGES:
            if stage == "register" and cfg.register_.weights == "reference" and push:
                # a version by reference points at the tuned checkpoint on the remote: it must be
                # there before register checks it (the full push waits for the end of the run)
                push_checkpoint()
            try:
                results[stage] = run_stage(stage, cfg, env)
            except StageFailed as err:
                mlflow.set_tag("medrega.failed_stage", stage)
                raise PipelineFailed(stage, str(err), err.exit_code if err.kind == BadInput.kind else 1) from err
        skipped = [s for s in STAGES if results[s]["skipped"]]
        mlflow.set_tag("medrega.skipped_stages", ",".join(skipped))
    try:
        pushed = dvc_push() if push else "not pushed (--no-push)"
    except Exception as err:  # noqa: BLE001 - retries are spent; outputs stay in the local cache
        # DVC's own ERROR line says why (e.g. "Could not connect to the endpoint URL"); drop its noise
        why = next((ln.strip() for ln in str(err).splitlines() if "ERROR" in ln), str(err) or repr(err))
        raise PipelineFailed("push", f"{why} -- every output is still in the local DVC cache; "
                             "the next run (or `dvc push`) uploads what is missing") from err
    report = final_report(cfg, results, pushed)
    create_markdown_artifact(key="medrega-pipeline", markdown=report, description="Where the results are")
    logger.info("pipeline finished; summary in the 'medrega-pipeline' artifact")
    print(report)
    return results


def push_checkpoint() -> None:
    try:
        dvc_push(("tune",))
    except Exception as err:  # noqa: BLE001 - retries are spent
        why = next((ln.strip() for ln in str(err).splitlines() if "ERROR" in ln), str(err) or repr(err))
        raise PipelineFailed("push", f"{why} -- register.weights=reference needs the tuned checkpoint on the "
                             "DVC remote before the version is registered") from err


def final_report(cfg: Config, results: dict[str, Any], pushed: str) -> str:
    reg = results["register"]["summary"]
    metrics = results["evaluate"]["summary"]
    lines = ["# MedRegA pipeline finished", ""]
    lines.append("| stage | status |")
    lines.append("|---|---|")
    for stage in STAGES:
        lines.append(f"| {stage} | {'up to date (skipped)' if results[stage]['skipped'] else 'ran'} |")
    lines += ["", f"- Registered model: `{reg.get('uri')}` (version {reg.get('version')}, name `{reg.get('model_name')}`)",
              f"- MLflow tracking: `{reg.get('tracking_uri')}`"]
    for task_name, m in metrics.items():
        if task_name == "release":  # the authors' protocol's figures: in metrics.json and report.html, not here
            continue
        keys = [k for k in ("align_f1", "region_f1", "mean_iou", "parse_failures", "accuracy", "macro_f1", "closed_accuracy", "open_recall", "bleu1", "rougeL", "meteor", "name_accuracy") if k in m]
        lines.append(f"- {task_name}: " + ", ".join(f"{k}={m[k]:.3f}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys))
    lines += [f"- Metrics file: `{cfg.evaluate.out}/metrics.json` (`dvc metrics show`); "
              f"report: `{cfg.evaluate.out}/report.html`",
              f"- DVC outputs: {', '.join(str(stages.out_dir(cfg, s)) for s in STAGES)}; remote: {pushed}",
              "- Prefect UI: `make ui` (or `prefect server start`), then open http://127.0.0.1:4200",
              "- MLflow UI: `mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db` then open http://127.0.0.1:5000"]
    return "\n".join(lines)


if __name__ == "__main__":
    medrega_pipeline()
