"""DVC experiments on the real pipeline: `dvc exp run -S`, `dvc exp show`, `dvc exp apply`, the
queue (`--queue`, `dvc queue start`), from one committed baseline: a copy of the workspace
tests/test_end_to_end.py trained (one trained workspace serves the run; tests.conftest.TRAINED).

The workspace is laid out as a clone after `make install` (.venv in the checkout) and nothing is
activated: no venv on PATH, no VIRTUAL_ENV. Stage commands find their interpreter themselves
(scripts/medrega; tests/test_real_checkpoints.py runs every stage's command that way with `dvc
repro`). Real DVC, MLflow (SQLite) and Prefect throughout.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, plain_env, stages_run, trained_copy

pytestmark = pytest.mark.slow

EVAL_OUTS = ("answers.jsonl", "breakdown.json", "metrics.json", "report.html", "result.json")


def sh(ws: Path, *cmd: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=ws, env=env or plain_env(ws), capture_output=True, text=True, check=False)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def dvc(ws: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return sh(ws, str(ws / ".venv" / "bin" / "dvc"), *args, **kwargs)  # as the README shows it


def registry(ws: Path) -> tuple[list[str], str | None]:
    """Registered versions of `medrega` and the one `challenger` points at."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")
    versions = sorted((str(v.version) for v in client.search_model_versions("name='medrega'")), key=int)
    if not versions:
        return [], None
    challenger = client.get_registered_model("medrega").aliases.get("challenger")
    return versions, None if challenger is None else str(challenger)


def tagged_runs(ws: Path, exp_name: str) -> dict[str, object]:
    """MLflow runs of one DVC experiment, by stage; and the MLflow experiment's tags."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medrega")
    runs = client.search_runs([experiment.experiment_id], f"tags.`dvc.exp_name` = '{exp_name}'")
    return {"tags": experiment.tags, **{r.data.tags["medrega.stage"]: r for r in runs}}


def shown(ws: Path, name: str) -> dict:
    """`dvc exp show --json`: the experiment's params and metrics, as DVC reports them."""
    for row in json.loads(dvc(ws, "exp", "show", "--json").stdout):
        for group in row.get("experiments") or []:
            for rev in group.get("revs", []):
                if rev.get("name") == name:
                    return rev["data"]
    raise AssertionError(f"experiment {name} not in `dvc exp show`")


def snapshot(ws: Path) -> dict[str, bytes]:
    files = ["params.yaml", "params.resolved.yaml", "dvc.lock", *(f"artifacts/eval/{n}" for n in EVAL_OUTS),
             "artifacts/register/registered.json", "artifacts/register/result.json"]
    return {f: (ws / f).read_bytes() for f in files}


def back_to_baseline(ws: Path) -> None:
    """After a successful workspace experiment (which DVC leaves in the workspace)."""
    sh(ws, "git", "checkout", "--", ".")
    dvc(ws, "checkout", "--force")


@pytest.fixture(scope="module")
def baseline(request, tmp_path_factory) -> Path:
    """The workspace tests/test_end_to_end.py trained, as a clone after `make install` has it
    (.venv in the checkout) and committed: its own MLflow store and Prefect home (the copied ones
    belong to that module's servers), no DVC remote (nothing here pushes)."""
    ws = trained_copy(request, tmp_path_factory, tmp_path_factory.mktemp("experiments") / "ws")
    for own in (".prefect", ".medrega", "mlflow/artifacts"):
        shutil.rmtree(ws / own, ignore_errors=True)
    (ws / "mlflow" / "mlflow.db").unlink()  # mlflow/ itself is the project's (its .gitignore)
    (ws / ".venv").symlink_to(BIN.parent)  # what `make install` leaves in a clone
    env = plain_env(ws)
    assert shutil.which("medrega", path=env["PATH"]) is None and shutil.which("dvc", path=env["PATH"]) is None
    for key, value in (("user.name", "test"), ("user.email", "test@example.invalid")):
        sh(ws, "git", "config", key, value)
    for line in dvc(ws, "remote", "list").stdout.splitlines():  # name, url and maybe "(default)"
        dvc(ws, "remote", "remove", line.split()[0])
    assert json.loads(dvc(ws, "status", "--json").stdout or "{}") == {}  # the copy is up to date as trained
    sh(ws, "git", "add", "-A")
    sh(ws, "git", "commit", "-qm", "baseline")
    assert sh(ws, "git", "status", "--porcelain").stdout == ""
    return ws


def test_exp_run_without_path_reruns_resolve_evaluate_register_and_registers_nothing(baseline):
    ws = baseline
    versions, challenger = registry(ws)
    run = dvc(ws, "exp", "run", "-S", "evaluate.max_new_tokens=2", "-n", "short-answers")
    # params.yaml changed, resolve re-resolved it, and exactly the stages reading the change re-ran
    assert stages_run(run.stdout) == ["resolve", "evaluate", "register"]
    reg = json.loads((ws / "artifacts/register/registered.json").read_text())
    assert reg["registered"] is False and reg["experiment"] == "short-answers"
    assert registry(ws) == (versions, challenger)  # no version, `challenger` where it was

    # its evaluation is an MLflow run named after the experiment; the MLflow page opens on runs
    runs = tagged_runs(ws, "short-answers")
    assert runs["tags"]["mlflow.experimentKind"] == "custom_model_development"
    evaluate = runs["evaluate"]
    assert evaluate.info.status == "FINISHED" and evaluate.info.run_name == "evaluate (short-answers)"
    logged = {k.rsplit(".", 1)[-1]: v for k, v in evaluate.data.params.items()}
    assert logged["max_new_tokens"] == "2" and "t2r/n" in evaluate.data.metrics

    data = shown(ws, "short-answers")
    assert data["params"]["params.yaml"]["data"]["evaluate"]["max_new_tokens"] == 2
    metrics = data["metrics"]["artifacts/eval/metrics.json"]["data"]
    assert metrics == json.loads((ws / "artifacts/eval/metrics.json").read_text())
    back_to_baseline(ws)


def test_a_failed_exp_run_leaves_the_workspace_as_it_was(baseline):
    ws = baseline
    before, registered = snapshot(ws), registry(ws)
    # the evaluate stage refuses a plug-in it cannot load (bad input, exit 3) after DVC has applied
    # the -S edit, resolve has re-resolved and dvc.lock was updated, and evaluate's outputs deleted
    failed = dvc(ws, "exp", "run", "-S", "evaluate.plugins.bertscore.model_path=/no/such/model", "-n", "bad-plugin",
                 check=False)
    assert failed.returncode != 0
    assert stages_run(failed.stdout) == ["resolve", "evaluate"]
    assert "the workspace is as it was before the experiment" in failed.stdout + failed.stderr
    assert snapshot(ws) == before
    assert sh(ws, "git", "status", "--porcelain").stdout == ""
    assert json.loads(dvc(ws, "status", "--json").stdout or "{}") == {}
    assert registry(ws) == registered
    kept = ws / ".medrega/experiments/bad-plugin"
    assert "/no/such/model" in (kept / "params.yaml").read_text()  # the experiment's edit is kept
    assert yaml.safe_load((kept / "dvc.lock").read_text()) != yaml.safe_load(before["dvc.lock"])

    # a value the schema refuses fails in resolve, whose output (tracked by git) DVC had deleted
    refused = dvc(ws, "exp", "run", "-S", "evaluate.max_samples_per_task=0", "-n", "bad-value", check=False)
    assert refused.returncode != 0 and "max_samples_per_task" in refused.stdout + refused.stderr
    assert snapshot(ws) == before and sh(ws, "git", "status", "--porcelain").stdout == ""


def test_a_queued_experiment_runs_in_a_copy_then_applies_and_registers_when_asked(baseline):
    ws = baseline
    versions, _ = registry(ws)
    before = snapshot(ws)
    # DVC's queue starts its worker and each run as `dvc` from PATH (DVC's own rule): a folder
    # with just `dvc` in it; the stage commands still find their interpreter themselves
    only_dvc = ws.parent / "only-dvc"
    only_dvc.mkdir(exist_ok=True)
    (only_dvc / "dvc").unlink(missing_ok=True)
    (only_dvc / "dvc").symlink_to(BIN / "dvc")
    env = plain_env(ws, (str(only_dvc),))
    # asked to register (register.in_experiments), which is all that changes: resolve and register re-run
    dvc(ws, "exp", "run", "--queue", "-S", "register.in_experiments=true", "-n", "queued", env=env)
    assert snapshot(ws) == before  # queued: the workspace is not touched
    try:
        dvc(ws, "queue", "start", env=env)
        status = wait_for(ws, "queued", env)
    finally:
        dvc(ws, "queue", "stop", env=env, check=False)
    assert status == "Success", dvc(ws, "queue", "logs", "queued", env=env, check=False).stdout[-4000:]
    assert snapshot(ws) == before

    # asked for (register.in_experiments): a version, tagged with the experiment, as challenger;
    # its runs are in the repository's store, not in the deleted copy's
    after, challenger = registry(ws)
    assert len(after) == len(versions) + 1 and challenger == after[-1]
    assert "register" in tagged_runs(ws, "queued")
    data = shown(ws, "queued")
    assert data["params"]["params.yaml"]["data"]["register"]["in_experiments"] is True

    dvc(ws, "exp", "apply", "queued", env=env)
    assert yaml.safe_load((ws / "params.yaml").read_text())["register"]["in_experiments"] is True
    assert json.loads((ws / "artifacts/eval/metrics.json").read_text()) == \
        data["metrics"]["artifacts/eval/metrics.json"]["data"]
    assert json.loads((ws / "artifacts/register/registered.json").read_text())["version"] == challenger
    back_to_baseline(ws)


def wait_for(ws: Path, name: str, env: dict[str, str]) -> str:
    """The queued experiment's final status: wait for its run to start, follow its log to the end."""
    import time

    status = "Queued"
    while status in ("Queued", ""):
        time.sleep(2)
        line = next((ln for ln in dvc(ws, "queue", "status", env=env).stdout.splitlines()
                     if re.search(rf"\s{re.escape(name)}\s", f" {ln} ")), "")
        status = line.split()[-1] if line else ""
    dvc(ws, "queue", "logs", "--follow", name, env=env, check=False)  # returns when the run ends
    line = next(ln for ln in dvc(ws, "queue", "status", env=env).stdout.splitlines() if f" {name} " in f" {ln} ")
    return line.split()[-1]


def test_the_pipeline_registers_an_applied_experiment_and_keeps_prefect_in_the_project(baseline, tmp_path):
    ws = baseline
    dvc(ws, "exp", "apply", "short-answers")
    assert json.loads((ws / "artifacts/register/registered.json").read_text())["registered"] is False
    versions, _ = registry(ws)
    # a direct console-script call, as the README shows it: nothing exported, HOME elsewhere
    env = plain_env(ws)
    env.pop("PREFECT_HOME")
    env["HOME"] = str(tmp_path / "home")
    run = sh(ws, str(ws / ".venv" / "bin" / "medrega"), "pipeline", "--no-push", env=env)
    stages = ("validate", "materialize", "align", "tune", "evaluate", "register")
    rows = {stage: status for stage, status in re.findall(r"^\|\s*(\w+)\s*\|\s*([^|]+?)\s*\|$", run.stdout,
                                                          re.MULTILINE) if stage in stages}
    assert rows.pop("register") == "ran" and set(rows.values()) == {"up to date (skipped)"}, rows
    after, challenger = registry(ws)
    assert len(after) == len(versions) + 1 and challenger == after[-1]
    assert json.loads((ws / "artifacts/register/registered.json").read_text())["version"] == challenger

    # the flow's artifacts are in the project's Prefect home (what `make ui` shows), not in ~/.prefect
    import sqlite3

    with sqlite3.connect(ws / ".prefect" / "prefect.db") as db:
        keys = {key for (key,) in db.execute("SELECT key FROM artifact")}
    assert {"medrega-register", "medrega-pipeline"} <= keys
    assert not (tmp_path / "home" / ".prefect").exists()
    back_to_baseline(ws)
