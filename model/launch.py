"""Launchers for work on many ranks: torchrun on this machine, or a Slurm batch job.

Both run the same worker on every rank (`python -m model.recipes.tune`, `.align`, or `.generate`
for evaluation), handing it the resolved config file the stage was given (every rank reads that
file, never params.yaml). The local launcher is what the tiny profile uses (two CPU ranks, gloo);
the Slurm launcher writes an sbatch script with `srun torchrun` and a c10d rendezvous on the first
node, submits it and waits.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from medrega.config import LauncherConfig
from medrega.errors import BadInput, MedregaError


class LaunchFailed(MedregaError):
    """The training job exited non-zero; the message carries the tail of its log."""


def worker_args(config: Path, meta: Path, base: Path, out: Path, recipe: str = "tune") -> list[str]:
    """A training recipe's command line on every rank (`model/recipes/<recipe>.py`)."""
    return ["-m", f"model.recipes.{recipe}", "--config", str(config), "--meta", str(meta),
            "--base", str(base), "--out", str(out)]


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # This interpreter's tools first: DeepSpeed JIT-builds its ops with the first `ninja` on PATH,
    # and two ninja versions (the venv's, the system's) write logs the other cannot read, so
    # callers with different PATHs would rebuild the op (a minute or more) on every launch.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]).rstrip(os.pathsep)
    # DeepSpeed picks its accelerator at import; on a CPU box it must be told.
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_local(launcher: LauncherConfig, args: list[str], log_file: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={launcher.nproc_per_node}",
           *args]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=worker_env(), text=True)
        assert proc.stdout is not None
        for line in proc.stdout:  # stream: the flow's log shows training as it happens
            log.write(line)
            log.flush()
            sys.stdout.write(line)
        code = proc.wait()
    if code != 0:
        raise diagnosis(log_file, f"torchrun exited {code}")


_RAISED = re.compile(r"^(?P<cls>[A-Za-z_][\w.]*(?:Error|Exception|Failed|Refused|Input|Busy)): (?P<msg>.+)$")


def diagnosis(log_file: Path, what: str) -> MedregaError:
    """What a failed job's ranks raised, as the error to raise here: a rank that stopped on bad
    input (any medrega BadInput, e.g. DataError, ConfigError) stays bad input, so it is not
    retried; anything else is LaunchFailed naming the rank's own error before the log's tail."""
    import importlib

    raised = [m for m in map(_RAISED.match, tail(log_file, 400).splitlines())
              if m and not m["cls"].endswith("ChildFailedError")]
    for m in raised:
        module, _, name = m["cls"].rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name) if module.startswith(("medrega", "model")) else None
        except (ImportError, AttributeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, BadInput):
            return BadInput(m["msg"])
    first = f"\nfirst error: {raised[0]['cls']}: {raised[0]['msg']}" if raised else ""
    return LaunchFailed(f"{what}{first}\nlast lines of {log_file}:\n{tail(log_file)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def sbatch_script(launcher: LauncherConfig, args: list[str], workdir: Path, log_file: Path,
                  stage: str = "tune") -> str:
    """A batch script: one task per node, each running torchrun for that node's GPUs."""
    nodes, ranks = launcher.nnodes, launcher.nproc_per_node
    gpus = launcher.gpus_per_node or ranks  # more GPUs than ranks: each rank spreads over several
    cpu_only = launcher.backend == "gloo"
    # a CPU job needs one core per rank; a GPU job some data-loader cores per GPU
    cpus = launcher.cpus_per_task or (ranks if cpu_only else 8 * gpus)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={launcher.job_name or 'medrega-' + stage}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --output={log_file}",
        f"#SBATCH --time={launcher.time}",
    ]
    if not cpu_only:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    for key in ("partition", "account", "qos"):
        if getattr(launcher, key):
            lines.append(f"#SBATCH --{key}={getattr(launcher, key)}")
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        # rendezvous on the address Slurm itself uses for that node (a node name need not resolve)
        'head_addr=$(scontrol show node "$head_node" | sed -n "s/.*NodeAddr=\\([^ ]*\\).*/\\1/p")',
        'head_addr=${head_addr:-$head_node}',
        f"export MASTER_PORT={launcher.port}",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
    ]
    if cpu_only:
        lines.append("export DS_ACCELERATOR=cpu")
    torchrun = [
        shlex.quote(launcher.python or sys.executable), "-m", "torch.distributed.run",
        f"--nnodes={nodes}", f"--nproc-per-node={ranks}",
        "--rdzv-backend=c10d", '--rdzv-endpoint="$head_addr:$MASTER_PORT"', '--rdzv-id="$SLURM_JOB_ID"',
        *(shlex.quote(a) for a in args),
    ]
    lines.append("srun --kill-on-bad-exit=1 " + " ".join(torchrun))
    return "\n".join(lines) + "\n"


def run_slurm(launcher: LauncherConfig, args: list[str], log_file: Path, poll_s: float = 2.0,
              on_line=print, stage: str = "tune") -> str:
    """Submit, stream the job's log, and raise LaunchFailed with the job's error if it fails."""
    script = log_file.with_suffix(".sbatch")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.unlink(missing_ok=True)
    script.write_text(sbatch_script(launcher, args, Path.cwd(), log_file.resolve(), stage))
    out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        raise LaunchFailed(f"sbatch {script} failed: {out.stderr.strip()}")
    job = out.stdout.strip().split(";")[0]
    offset = 0
    while True:
        state = job_state(job)
        if log_file.exists():
            text = log_file.read_text(errors="replace")
            for line in text[offset:].splitlines():
                on_line(line)
            offset = len(text)
        if state in {"COMPLETED"}:
            return job
        if state in {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}:
            raise diagnosis(log_file, f"Slurm job {job} ended {state}")
        time.sleep(poll_s)


def job_state(job: str) -> str:
    """The job's state from squeue while it is queued or running, then from scontrol/sacct."""
    q = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    if q.returncode == 0 and q.stdout.strip():
        return q.stdout.strip().splitlines()[0]
    s = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    for token in s.stdout.split():
        if token.startswith("JobState="):
            return token.split("=", 1)[1]
    a = subprocess.run(["sacct", "-n", "-X", "-j", job, "-o", "State"], capture_output=True, text=True)
    return (a.stdout.split() or ["UNKNOWN"])[0]


def launch(launcher: LauncherConfig, args: list[str], log_file: Path, stage: str = "tune") -> None:
    if launcher.kind == "slurm":
        run_slurm(launcher, args, log_file, stage=stage)
    else:
        run_local(launcher, args, log_file)
