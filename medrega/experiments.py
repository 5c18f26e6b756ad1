"""DVC experiments (`dvc exp run`): what a stage does differently inside one, and putting the
workspace back when one run in the workspace fails.

DVC tells a stage command it runs in an experiment through the environment (DVC 3.67:
`DVC_EXP_NAME`, `DVC_EXP_BASELINE_REV`, `DVC_ROOT` = the repository the experiment belongs to,
`DVC_STAGE` = the stage). Queued and `--temp` experiments run in a copy of the repository under
`.dvc/tmp/exps/` and never touch the workspace. A plain `dvc exp run` runs in the workspace: DVC
applies the experiment there (the uncommitted changes plus the `-S` edits of params.yaml) and
runs the stages; when one fails it stops and leaves everything as it is: params.yaml edited,
dvc.lock and params.resolved.yaml rewritten by the stages that passed, the failed stage's
outputs deleted. A following `make pipeline` would then quietly build (and register) the
experiment. So a stage command that fails in a workspace experiment calls `restore_workspace`
before it exits, while DVC waits for it (DVC releases its repository lock while a stage command
runs, and `dvc checkout` takes no other lock):

- the files the run rewrote (dvc.lock, params.resolved.yaml) go back to the experiment's start,
  `refs/exps/exec/EXEC_MERGE` (the commit DVC made of the workspace it started from);
- params files go back to the baseline commit: DVC puts the `-S` edits and any uncommitted edits
  of params.yaml into that one commit, and only the baseline is free of `-S` edits;
- outputs are restored from the DVC cache by `dvc checkout --force` from the restored dvc.lock.

Nothing is lost: the experiment's params.yaml, the failed run's dvc.lock (naming the outputs of
the stages that passed, all in the DVC cache) and whatever the failed stage left in its outputs
(a partial checkpoint of a persistent output) are kept under `.medrega/experiments/<name>/`.
DVC refusing to start a stage (a missing dependency) happens before any stage command runs and
is outside this: `dvc pull` first on a fresh clone.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

EXEC_MERGE = "refs/exps/exec/EXEC_MERGE"   # the workspace the experiment started from
EXEC_HEAD = "refs/exps/exec/EXEC_HEAD"     # the baseline commit
KEEP_DIR = Path(".medrega/experiments")
PARAMS_FILES = ("params.yaml",)            # what `-S key=value` edits (DVC's default params file)
RUN_FILES = ("dvc.lock", "params.resolved.yaml")  # tracked files the stages rewrite


class RestoreError(RuntimeError):
    """The workspace could not be put back; the message says what is left to do."""


@dataclass(frozen=True)
class Experiment:
    name: str
    baseline: str       # the commit the experiment is based on
    root: Path          # the repository the experiment belongs to
    in_workspace: bool  # False for queued and --temp runs (a copy under .dvc/tmp/exps)

    def tags(self) -> dict[str, str]:
        """What MLflow runs and registry versions made inside the experiment are tagged with."""
        return {"dvc.exp_name": self.name, "dvc.exp_baseline_rev": self.baseline}


def current(environ: dict[str, str] | None = None, cwd: Path | None = None) -> Experiment | None:
    """The DVC experiment this process runs in, if any (from DVC's environment)."""
    env = os.environ if environ is None else environ
    name = env.get("DVC_EXP_NAME")
    if not name:
        return None
    here = Path(cwd or Path.cwd()).resolve()
    root = Path(env.get("DVC_ROOT") or here).resolve()
    executors = root / ".dvc" / "tmp"
    in_workspace = here == root or (root in here.parents and executors not in here.parents)
    return Experiment(name, env.get("DVC_EXP_BASELINE_REV", ""), root, in_workspace)


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, check=False)
    if check and proc.returncode != 0:
        raise RestoreError(f"git {' '.join(args)}: {proc.stderr.decode(errors='replace').strip()}")
    return proc


def _blob(root: Path, rev: str, path: str) -> bytes | None:
    """A file's content at a commit; None when the commit has no such file."""
    proc = _git(root, "cat-file", "blob", f"{rev}:{path}", check=False)
    return proc.stdout if proc.returncode == 0 else None


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _put(path: Path, content: bytes | None) -> None:
    """Write (atomically) or remove a workspace file."""
    if content is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.restore")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def _keep_dir(root: Path, name: str) -> Path:
    """A fresh folder for what a failed experiment leaves (a re-run of a name gets its own)."""
    base = root / KEEP_DIR / name
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{name}.{n}")
    return folder


def _stage_outputs(root: Path, stage: str) -> list[Path]:
    """The workspace paths of a stage's outputs, as DVC resolves them from dvc.yaml."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return [Path(out.fs_path) for s in repo.stage.collect(stage) for out in s.outs]


def restore_workspace(root: Path, name: str, failed_stage: str | None = None) -> list[str]:
    """Put a workspace back as it was before the experiment `name` started (module docstring).
    Returns one line per thing done; raises RestoreError naming what could not be done."""
    root = Path(root).resolve()
    start = _git(root, "rev-parse", "--verify", EXEC_MERGE).stdout.decode().strip()
    baseline = _git(root, "rev-parse", "--verify", EXEC_HEAD).stdout.decode().strip()
    if _blob(root, start, "dvc.lock") is None and (root / "dvc.lock").exists():
        # untracked: what it said before the experiment's stages rewrote it is known nowhere
        raise RestoreError("dvc.lock is not committed, so nothing records the workspace before the experiment; "
                           "commit dvc.lock before `dvc exp run`")
    keep = _keep_dir(root, name)
    done: list[str] = []
    # before anything is written: tracked files that differ from the experiment's start now
    changed = _git(root, "diff", "--name-only", "-z", start, "--", ".", ":(exclude).dvc/tmp").stdout.decode()
    rewritten = (set(filter(None, changed.split("\0"))) | set(RUN_FILES)) - set(PARAMS_FILES)

    def save(rel: str, content: bytes) -> None:
        (keep / rel).parent.mkdir(parents=True, exist_ok=True)
        (keep / rel).write_bytes(content)

    if failed_stage:  # first: a git-tracked output (cache: false) is then restored like any tracked file
        for out in _stage_outputs(root, failed_stage):
            if out.exists():
                target = keep / "outputs" / out.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(out), str(target))
                done.append(f"{out.relative_to(root)}: what the failed stage left is in {target.relative_to(root)}")
    for rel in PARAMS_FILES:
        now, before = _read(root / rel), _blob(root, baseline, rel)
        if now != before:
            if now is not None:
                save(rel, now)
            _put(root / rel, before)
            done.append(f"{rel}: back to the baseline commit {baseline[:7]}; the experiment's copy is in "
                        f"{(keep / rel).relative_to(root)}")
    for rel in sorted(rewritten):
        now, before = _read(root / rel), _blob(root, start, rel)
        if now != before:
            if now is not None and rel == "dvc.lock":
                save(rel, now)  # names the outputs of the stages that passed (in the DVC cache)
            _put(root / rel, before)
            done.append(f"{rel}: as at the experiment's start")
    checkout = subprocess.run([str(Path(sys.executable).with_name("dvc")), "checkout", "--force"], cwd=root,
                              capture_output=True, text=True, check=False)
    if checkout.returncode != 0:
        raise RestoreError(f"dvc checkout --force: {(checkout.stderr or checkout.stdout).strip()}"
                           f" (done so far: {'; '.join(done) or 'nothing'})")
    done.append("outputs: checked out from the DVC cache as dvc.lock records them (dvc checkout --force)")
    return done


def on_stage_failure(stream=None) -> None:
    """Called by a stage command that is about to exit with a failure: inside a workspace
    experiment, restore the workspace and say so. Never raises (the stage's own failure is the
    one to report); a restore that fails says what is left to do."""
    stream = stream or sys.stderr
    exp = current()
    stage = os.environ.get("DVC_STAGE")
    if exp is None or not exp.in_workspace or not stage:
        return
    try:
        done = restore_workspace(exp.root, exp.name, failed_stage=stage)
    except Exception as err:  # noqa: BLE001 - report, then let the stage's failure through
        print(f"experiment {exp.name!r}: stage {stage!r} failed and the workspace could NOT be restored: {err}\n"
              "restore it by hand: `git checkout -- params.yaml params.resolved.yaml dvc.lock && dvc checkout --force`",
              file=stream)
        return
    print(f"experiment {exp.name!r}: stage {stage!r} failed; the workspace is as it was before the experiment:",
          file=stream)
    for line in done:
        print(f"  - {line}", file=stream)
