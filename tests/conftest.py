"""Shared fixtures: an isolated copy of the repository to run stages, DVC and the flow in."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# What `make test` exports, so `python -m pytest` alone behaves the same (2 slow cores: Prefect's
# ephemeral server needs more than its default 30 s to start). One OpenMP thread per process: the
# suite runs three workers, each with its own subprocesses, on two cores, where a second thread per
# process only spins (measured: 6-16 % less CPU for the same tests, and no slower alone).
for _key, _value in (("OMP_NUM_THREADS", "1"),
                     ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"), ("DS_ACCELERATOR", "cpu"),
                     ("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                     ("DO_NOT_TRACK", "1"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                     ("MLFLOW_DISABLE_TELEMETRY", "true"), ("DVC_NO_ANALYTICS", "1"),
                     ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")):
    os.environ.setdefault(_key, _value)


# `make test` runs three xdist workers (much of the suite waits on servers, timeouts and
# subprocesses), each taking whole files (--dist loadfile): a module's shared run stays in one
# process and its tests keep their file order. Files go out in this order (measured), so the
# workers end close together: the three longest first, one to each worker; then, since xdist
# hands every worker a second file at once, a short one for the longest's worker; then the next
# two longest for the others; the rest alphabetically, to whichever worker is free.
LONGEST_FIRST = ("test_end_to_end.py", "test_cluster.py", "test_experiments.py", "test_make_ui.py",
                 "test_real_checkpoints.py", "test_registry.py", "test_training.py", "test_serving.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept within


SMALL = {  # the tiny profile cut down so a whole pipeline runs in a couple of minutes
    "data": {"patients_per_modality": 2, "slices_per_patient": 1},
    "materialize": {"test_share": 0.5},  # 16 patients: both splits non-empty
    # one checkpoint per run at most: each holds the optimizer's state, and every byte of them is
    # cached and pushed by DVC (the tests of resume set their own save_steps)
    "pretrain": {"save_steps": 100, "per_device_batch_size": 4},
    "align": {"max_steps": 3, "save_steps": 100, "per_device_batch_size": 4},
    "tune": {"max_steps": 4, "save_steps": 4, "per_device_batch_size": 2},
    "evaluate": {"max_samples_per_task": 4, "max_new_tokens": 8, "batch_size": 4},
}


def small_params(params: dict) -> dict:
    """params.yaml's raw mapping with SMALL merged into its top level (the tiny profile)."""
    from medrega.config import deep_merge

    params = deep_merge(params, SMALL)
    params["pretrain"]["phases"] = [{**phase, "max_steps": 3} for phase in params["pretrain"]["phases"]]
    return params


def tiny(overlay: dict | None = None, small: bool = False):
    """The repository's tiny profile as a Config, optionally cut down and with `overlay` on top."""
    from medrega.config import resolve

    cfg = resolve(REPO / "params.yaml", "tiny")
    if small:
        cfg = cfg.merged(SMALL).merged({"pretrain": {"phases": [
            {**p.model_dump(), "max_steps": 3} for p in cfg.pretrain.phases]}})
    return cfg.merged(overlay) if overlay else cfg


def isolated_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(root / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        DO_NOT_TRACK="1",
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MEDREGA_PROFILE", None)
    return env


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A git + DVC workspace holding the project's files and a reduced params.yaml."""
    return make_workspace(tmp_path / "ws")


def make_workspace(root: Path) -> Path:
    """The `workspace` fixture's body, for fixtures of a wider scope (one pipeline run shared
    by a module's tests)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if not src.is_file() or rel in ("data.dvc", "dvc.lock", "params.resolved.yaml") \
                or rel.startswith(("tests/", "artifacts/")):
            continue
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(small_params(params), sort_keys=False, allow_unicode=True))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


@pytest.fixture(scope="session")
def stage_inputs(tmp_path_factory) -> dict:
    """Materialized instructions and an aligned tiny model, built once for the training tests."""
    from medrega.config import write_resolved
    from medrega.sources.synthetic import generate
    from tasks.align import align
    from tasks.materialize import materialize

    root = tmp_path_factory.mktemp("stages")
    cfg = tiny(small=True)
    config_file = write_resolved(cfg, root / "params.resolved.yaml")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    d = cfg.data
    generate(root / "data", d.patients_per_modality, d.slices_per_patient, d.image_size, d.seed)
    materialize(root / "data", root / "instructions", cfg)
    align(root / "instructions", root / "align", cfg)
    return {"root": root, "config": cfg, "config_file": config_file,
            "instructions": root / "instructions", "aligned": root / "align"}
