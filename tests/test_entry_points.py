"""Every way in runs the same thing: dvc.yaml's launcher picks the project's interpreter without
PATH, the CLI sets its own environment (Prefect home, no telemetry) before anything reads it,
and exit codes reach the caller as the README says (through make too, within what make can)."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from medrega import environment
from tests.conftest import BIN, REPO

LAUNCHER = REPO / "scripts" / "medrega"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "MEDREGA_PYTHON", "DVC_ROOT", "PYTHONPATH")}
    env["PATH"] = SYSTEM_PATH
    env.update(extra)
    return env


def _fake_python(env_dir: Path, label: str) -> Path:
    """An 'interpreter' that says who it is and what it was asked to run."""
    python = env_dir / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "{label} $* PYTHONPATH=$PYTHONPATH"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return python


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A checkout holding the launcher (and, per test, a .venv)."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(LAUNCHER, root / "scripts" / "medrega")
    return root


def _launch(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(root / "scripts" / "medrega"), *args], cwd=root, env=_clean_env(**env),
                          capture_output=True, text=True, check=False)


def test_the_launcher_prefers_medrega_python_then_the_checkouts_venv_then_dvc_root_then_an_active_env(
        checkout, tmp_path):
    _fake_python(tmp_path / "active", "active")
    _fake_python(tmp_path / "parent" / ".venv", "parent")
    _fake_python(tmp_path / "chosen", "chosen")
    active, parent = str(tmp_path / "active"), str(tmp_path / "parent")

    ran = _launch(checkout, "evaluate", "--config", "x", VIRTUAL_ENV=active)
    assert ran.returncode == 0 and ran.stdout.startswith("active -m cli evaluate --config x"), ran
    assert f"PYTHONPATH={checkout}" in ran.stdout  # the checkout's own code, first
    # a queued experiment's copy has no .venv: DVC_ROOT names the repository it came from
    assert _launch(checkout, "tune", VIRTUAL_ENV=active, DVC_ROOT=parent).stdout.startswith("parent -m cli tune")
    _fake_python(checkout / ".venv", "venv")
    assert _launch(checkout, "tune", VIRTUAL_ENV=active, DVC_ROOT=parent).stdout.startswith("venv -m cli tune")
    chosen = _launch(checkout, "tune", MEDREGA_PYTHON=str(tmp_path / "chosen" / "bin" / "python"))
    assert chosen.stdout.startswith("chosen -m cli tune")


def test_the_launcher_refuses_loudly_with_exit_3(checkout, tmp_path):
    none = _launch(checkout, "validate")
    assert none.returncode == 3 and "no Python environment" in none.stderr and "make install" in none.stderr
    _fake_python(checkout / ".venv", "venv")
    named = _launch(checkout, "validate", MEDREGA_PYTHON=str(tmp_path / "missing" / "python"))
    assert named.returncode == 3 and "MEDREGA_PYTHON" in named.stderr and named.stdout == ""


def test_the_launcher_runs_the_real_cli_from_a_checkouts_venv(tmp_path):
    root = tmp_path / "clone"
    root.mkdir()
    for name in ("scripts", "cli", "medrega", "model", "tasks", "flows"):
        (root / name).symlink_to(REPO / name)
    (root / ".venv").symlink_to(BIN.parent)  # what `make install` leaves in a clone
    shown = _launch(root, "--help")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "Usage: medrega" in shown.stdout and "pipeline" in shown.stdout


def test_the_cli_sets_the_projects_prefect_home_and_turns_telemetry_off(tmp_path):
    """Asked of each library itself, not of our variables: MLflow, for one, ignores DO_NOT_TRACK=1."""
    # as a direct `.venv/bin/medrega ...` starts: nothing set beforehand, HOME elsewhere, no CI
    # marker (MLflow turns its telemetry off by itself under pytest or CI, which would hide a miss)
    keys = ("PREFECT_HOME", *environment.OFFLINE_AND_QUIET, "PYTEST_CURRENT_TEST", "CI")
    env = {k: v for k, v in _clean_env(HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO)).items() if k not in keys}
    probe = """
import json, os, cli
from dvc.analytics import is_enabled as dvc_analytics
from huggingface_hub import constants
from mlflow.telemetry.utils import _is_ci_env_or_testing, is_telemetry_disabled
from prefect.settings import get_current_settings
settings = get_current_settings()
print(json.dumps({"home": str(settings.home), "prefect": settings.server.analytics_enabled,
                  "mlflow_off": is_telemetry_disabled(), "ci": _is_ci_env_or_testing(), "dvc": dvc_analytics(),
                  "hub_offline": constants.HF_HUB_OFFLINE, "gx": os.environ.get("GX_ANALYTICS_ENABLED")}))
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["home"] == str(tmp_path / ".prefect")  # Prefect itself reads the project's home
    assert seen["ci"] is False  # so MLflow's answer below comes from what the CLI set
    assert seen == {"home": str(tmp_path / ".prefect"), "prefect": False, "mlflow_off": True, "ci": False,
                    "dvc": False, "hub_offline": True, "gx": "False"}


def test_bad_input_exits_3_from_medrega_pipeline_and_make_says_error_3(tmp_path):
    env = _clean_env(PYTHONPATH=str(REPO), MEDREGA_PROFILE="no-such-profile")
    direct = subprocess.run([str(BIN / "medrega"), "pipeline", "--params", str(REPO / "params.yaml")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert direct.returncode == 3, direct.stderr[-2000:]
    assert "stage 'config' failed" in direct.stderr and "no-such-profile" in direct.stderr
    # `make pipeline`: make ends every failed recipe with its own status 2 and names the command's
    for name in ("Makefile", "params.yaml", "pyproject.toml", "constraints.txt"):
        shutil.copy2(REPO / name, tmp_path / name)
    (tmp_path / ".venv").symlink_to(BIN.parent)
    # -o: never reinstall into the shared environment, whatever the copies' times
    made = subprocess.run(["make", "-o", ".venv/.installed", "pipeline"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=False)
    assert made.returncode == 2, made.stdout[-2000:] + made.stderr[-2000:]
    assert "Error 3" in made.stderr and "stage 'config' failed" in made.stderr


def test_dvc_lock_params_resolved_and_data_dvc_are_for_git_outputs_are_not():
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO, check=False).returncode == 0

    # DVC records every stage's inputs and outputs in dvc.lock; experiments and a fresh clone's
    # `dvc pull` start from the committed one
    assert not ignored("dvc.lock") and not ignored("params.resolved.yaml") and not ignored("data.dvc")
    assert ignored("artifacts/eval/metrics.json") and ignored("data/samed2d/images/x.png")  # DVC's cache
    assert ignored(".venv") and ignored(".medrega/experiments/x/params.yaml")


def test_the_committed_resolved_config_is_what_resolve_writes(tmp_path, monkeypatch):
    from medrega.config import resolve, write_resolved

    monkeypatch.delenv("MEDREGA_PROFILE", raising=False)
    fresh = write_resolved(resolve(REPO / "params.yaml"), tmp_path / "params.resolved.yaml")
    assert (REPO / "params.resolved.yaml").read_text(encoding="utf-8") == fresh.read_text(encoding="utf-8"), \
        "params.resolved.yaml is stale: run `medrega config resolve` and commit it"


def test_a_stage_knows_its_dvc_experiment_and_whether_it_runs_in_the_workspace(tmp_path):
    from medrega.experiments import current

    root = tmp_path / "repo"
    copy = root / ".dvc" / "tmp" / "exps" / "tmpab12"
    env = {"DVC_EXP_NAME": "lr-1e-4", "DVC_EXP_BASELINE_REV": "abc123", "DVC_ROOT": str(root)}
    assert current({}, cwd=root) is None  # `dvc repro`, the flow, a shell
    here = current(env, cwd=root)
    assert here.in_workspace and here.root == root.resolve()
    assert here.tags() == {"dvc.exp_name": "lr-1e-4", "dvc.exp_baseline_rev": "abc123"}
    queued = current(env, cwd=copy)  # DVC_ROOT names the repository, the copy runs the stage
    assert not queued.in_workspace and queued.root == root.resolve()
