"""A failed `dvc exp run` in the workspace leaves it as it was (medrega/experiments.py), on a
two-stage DVC project small enough to try every case with real git and DVC: the -S edit undone,
files the passed stage rewrote and its outputs back, the failed stage's leftovers and the
experiment's params kept aside, uncommitted work kept, and a refusal when dvc.lock is untracked.
(tests/test_experiments.py does it once on the real pipeline.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, REPO

pytestmark = pytest.mark.slow

STEP = '''import sys
import yaml
from medrega import experiments

params = yaml.safe_load(open("params.yaml"))
if sys.argv[1] == "prep":
    open("out1.txt", "w").write(f"a={params['a']}\\n")
else:
    with open("out2.txt", "w") as out:
        out.write("partial\\n")  # what a stage leaves when it dies half way
        if params["b"] == 0:
            experiments.on_stage_failure()  # what `python -m cli` does before a stage exits non-zero
            sys.exit(3)
        out.write(open("out1.txt").read() + f"b={params['b']}\\n")
'''


def run(root: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    for key in ("DVC_EXP_NAME", "DVC_ROOT", "DVC_STAGE"):
        env.pop(key, None)
    proc = subprocess.run(list(cmd), cwd=root, env=env, capture_output=True, text=True, check=False)
    if check:
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(root, str(BIN / "dvc"), *args, check=check)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "step.py").write_text(STEP)
    (root / "notes.txt").write_text("notes\n")
    (root / "params.yaml").write_text("a: 1\nb: 1\n")
    (root / ".gitignore").write_text("/.medrega/\n")  # as in this repository
    stage = f"{sys.executable} step.py"
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "prep": {"cmd": f"{stage} prep", "deps": ["step.py"], "params": ["a"], "outs": ["out1.txt"]},
        "use": {"cmd": f"{stage} use", "deps": ["step.py", "out1.txt"], "params": ["b"], "outs": ["out2.txt"]},
    }}))
    run(root, "git", "init", "-q")
    for key, value in (("user.name", "test"), ("user.email", "test@example.invalid")):
        run(root, "git", "config", key, value)
    dvc(root, "init", "-q")
    dvc(root, "repro")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "baseline")
    return root


def state(root: Path) -> dict[str, str]:
    return {name: (root / name).read_text() for name in ("params.yaml", "dvc.lock", "out1.txt", "out2.txt", "notes.txt")}


def clean(root: Path) -> bool:
    return run(root, "git", "status", "--porcelain").stdout == "" and \
        json.loads(dvc(root, "status", "--json").stdout or "{}") == {}


def test_a_failed_experiment_is_undone_and_what_it_left_is_kept(project):
    before = state(project)
    failed = dvc(project, "exp", "run", "-S", "a=2", "-S", "b=0", "-n", "broken", check=False)
    assert failed.returncode != 0
    # prep passed (out1.txt and dvc.lock rewritten), use failed half way through out2.txt
    assert "the workspace is as it was before the experiment" in failed.stdout + failed.stderr
    assert state(project) == before and clean(project)
    kept = project / ".medrega/experiments/broken"
    assert yaml.safe_load((kept / "params.yaml").read_text()) == {"a": 2, "b": 0}
    assert (kept / "outputs/out2.txt").read_text() == "partial\n"
    passed = yaml.safe_load((kept / "dvc.lock").read_text())["stages"]["prep"]
    assert passed["params"]["params.yaml"]["a"] == 2  # the passed stage's output is in the cache

    # the same name again: its own folder, nothing overwritten
    assert dvc(project, "exp", "run", "-S", "b=0", "-n", "broken", check=False).returncode != 0
    assert (project / ".medrega/experiments/broken.2/params.yaml").exists() and state(project) == before


def test_uncommitted_work_stays_and_uncommitted_params_are_kept_aside(project):
    (project / "notes.txt").write_text("an edit in progress\n")
    (project / "params.yaml").write_text("a: 1\nb: 5\n")  # edited by hand, then `dvc exp run -S`
    before = state(project)
    assert dvc(project, "exp", "run", "-S", "b=0", "-n", "on-dirty", check=False).returncode != 0
    after = state(project)
    assert after["notes.txt"] == "an edit in progress\n"
    # params.yaml: -S and hand edits are one commit to DVC; back to the last commit, the
    # experiment's version kept
    assert after["params.yaml"] == "a: 1\nb: 1\n"
    assert yaml.safe_load((project / ".medrega/experiments/on-dirty/params.yaml").read_text()) == {"a": 1, "b": 0}
    assert {k: v for k, v in after.items() if k != "params.yaml"} == \
        {k: v for k, v in before.items() if k != "params.yaml"}


def test_an_untracked_dvc_lock_is_refused_loudly_and_left_in_place(project):
    run(project, "git", "rm", "-q", "--cached", "dvc.lock")
    run(project, "git", "commit", "-qm", "dvc.lock untracked")
    failed = dvc(project, "exp", "run", "-S", "b=0", "-n", "no-lock", check=False)
    assert failed.returncode != 0
    text = failed.stdout + failed.stderr
    assert "could NOT be restored" in text and "commit dvc.lock" in text
    assert (project / "dvc.lock").exists()


def test_outside_an_experiment_a_failure_changes_nothing(project):
    (project / "params.yaml").write_text("a: 1\nb: 0\n")
    failed = dvc(project, "repro", check=False)
    assert failed.returncode != 0 and "as it was" not in failed.stdout + failed.stderr
    assert (project / "params.yaml").read_text() == "a: 1\nb: 0\n"  # `dvc repro` is not an experiment
