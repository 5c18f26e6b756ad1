"""Shared fixtures: an isolated copy of the repository to run stages, DVC and the flow in."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medrega import environment

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# What `make test` exports, so `python -m pytest` alone behaves the same (2 slow cores: Prefect's
# ephemeral server needs more than its default 30 s to start), with the project's environment
# (medrega/environment.py) for the servers and tools tests start directly. One OpenMP thread per
# process: the suite runs four workers, each with its own subprocesses, on two cores, where a
# second thread per process only spins (measured: 6-16 % less CPU for the same tests, and no
# slower alone). MLflow's server job runner serves GenAI features the pipeline does not use.
for _key, _value in (("OMP_NUM_THREADS", "1"), ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"),
                     ("DS_ACCELERATOR", "cpu"), ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")):
    os.environ.setdefault(_key, _value)
environment.apply()


# `make test` runs four xdist workers on two cores: much of the suite waits on servers, timeouts
# and subprocesses, and with three the cores sat idle a quarter of the time (22.8 CPU-minutes in
# 15.1 minutes; four: the same work in 12.5, measured 2026-12-02). Each worker takes whole files
# (--dist loadfile): a module's shared run stays in one process and its tests keep their file
# order. Files go out in this order (measured), so the workers end close together: the three
# longest first, one to each worker, and test_make_ui.py to the fourth, which then takes
# registry, training and serving as the others are busy; test_experiments.py follows
# test_real_checkpoints.py, by when the end-to-end module has published the workspace it works on
# (TRAINED below), so no worker idles waiting for it; the rest to whichever worker is free.
LONGEST_FIRST = ("test_end_to_end.py", "test_cluster.py", "test_real_checkpoints.py", "test_make_ui.py",
                 "test_registry.py", "test_training.py", "test_experiments.py", "test_serving.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept within


# The end-to-end module is the run's critical path: its pipeline runs, then its tests one after
# another, with test_experiments.py waiting on its first run. Competing evenly with the three
# other workers it got a third of a core while training (that run: 6 min 53 s) and ended last.
# The two workers whose files do not lead to it (those that start with these) lower their
# priority, and their subprocesses inherit it: they take what the critical path leaves
# (measured on clean clones: that run 5 min 55 s, the suite 11 min 46 s instead of 12 min 18 s).
BACKGROUND_FIRST = ("test_cluster.py", "test_make_ui.py")
_lowered = False


def pytest_runtest_setup(item: pytest.Item) -> None:
    global _lowered
    if os.environ.get("PYTEST_XDIST_WORKER") and not _lowered and item.path.name in BACKGROUND_FIRST:
        os.nice(4)
        _lowered = True


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
        environment.OFFLINE_AND_QUIET,
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(root / ".prefect"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        DS_ACCELERATOR="cpu",
        PYTHONUNBUFFERED="1",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MEDREGA_PROFILE", None)
    return env


def plain_env(ws: Path, path: tuple[str, ...] = ()) -> dict[str, str]:
    """A shell in which nothing is activated: the system's PATH (plus `path`), no VIRTUAL_ENV."""
    env = isolated_env(ws)
    env["PATH"] = os.pathsep.join([*path, "/usr/local/bin", "/usr/bin", "/bin"])
    env["PYTHONPATH"] = str(ws)  # the workspace's copy of the code, also for the console scripts
    for key in ("VIRTUAL_ENV", "CONDA_PREFIX", "MEDREGA_PYTHON"):
        env.pop(key, None)
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


def stages_run(dvc_output: str) -> list[str]:
    """The stages `dvc repro` or `dvc exp run` ran, in order, from its output."""
    return re.findall(r"Running stage '([\w-]+)'", dvc_output)


# -- one trained workspace per run ---------------------------------------------------------------
# Training a workspace is the costliest thing the suite does. tests/test_end_to_end.py trains one
# (its first pipeline run) and publishes a copy of it, as it was then, for the other modules that
# need a trained pipeline to work on (tests/test_experiments.py); they take a copy of their own.

TRAINED = "trained-workspace"


def run_root(tmp_path_factory) -> Path:
    """The temporary folder of the whole run, which every xdist worker shares (each worker's
    own base folder is a child of it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def publish_trained(tmp_path_factory, ws: Path | None, failure: str = "") -> None:
    """A copy of `ws` for other modules (written aside, then renamed: a reader never sees half),
    or, when the run that should have trained it failed, a note saying so."""
    dest = run_root(tmp_path_factory) / TRAINED
    if ws is None:
        dest.with_name(TRAINED + ".failed").write_text(failure or "the end-to-end run failed")
        return
    partial = dest.with_name(TRAINED + ".partial")
    # DVC's own scratch (locks, its hash cache keyed by inode) stays with the workspace it describes
    shutil.copytree(ws, partial, symlinks=True, ignore=lambda d, names: ["tmp"] if d.endswith("/.dvc") else [])
    partial.rename(dest)


def trained_copy(request: pytest.FixtureRequest, tmp_path_factory, dest: Path) -> Path:
    """A copy, at `dest`, of the workspace tests/test_end_to_end.py trained in this run. That
    module must be part of the run (pytest says so and stops otherwise): it trains the workspace
    on another worker, or first on this one (conftest orders it first)."""
    if not any(item.path.name == "test_end_to_end.py" for item in request.session.items):
        pytest.fail(f"{request.node.path.name} works on the workspace tests/test_end_to_end.py trains: "
                    "run the two together", pytrace=False)
    trained, failed = run_root(tmp_path_factory) / TRAINED, run_root(tmp_path_factory) / (TRAINED + ".failed")
    deadline = time.monotonic() + 2400
    while not trained.exists():
        if failed.exists():
            pytest.fail(f"no trained workspace: {failed.read_text()[-2000:]}", pytrace=False)
        assert time.monotonic() < deadline, "tests/test_end_to_end.py published no trained workspace in 40 minutes"
        time.sleep(2)
    shutil.copytree(trained, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def stage_inputs(tmp_path_factory) -> dict:
    """Materialized instructions and an aligned tiny model for the training tests, built once per
    run: the first worker to need them builds them under a lock, the others wait and read them
    (nothing writes there afterwards). Each worker logs its own MLflow runs to its own store."""
    from filelock import FileLock

    from medrega.config import write_resolved
    from medrega.sources.synthetic import generate
    from tasks.align import align
    from tasks.materialize import materialize

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.getbasetemp() / 'stage-inputs-mlflow.db'}"
    root, cfg = run_root(tmp_path_factory) / "stages", tiny(small=True)
    built = root / "built"
    with FileLock(f"{root}.lock"):
        if not built.exists():  # built in place (the meta file names its folders), so a failed build is started over
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            write_resolved(cfg, root / "params.resolved.yaml")
            d = cfg.data
            generate(root / "data", d.patients_per_modality, d.slices_per_patient, d.image_size, d.seed)
            materialize(root / "data", root / "instructions", cfg)
            align(root / "instructions", root / "align", cfg)
            built.touch()
    return {"root": root, "config": cfg, "config_file": root / "params.resolved.yaml",
            "instructions": root / "instructions", "aligned": root / "align"}
