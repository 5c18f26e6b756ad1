"""Launchers for distributed training: torchrun on this machine, or a Slurm batch job.

Both run the same worker, `python -m model.train`, on every rank. The local launcher is what
the tiny profile uses (two CPU ranks, gloo); the Slurm launcher writes an sbatch script with
`srun torchrun` and a c10d rendezvous on the first node, submits it and waits.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


class LaunchFailed(RuntimeError):
    """The training job exited non-zero; the message carries the tail of its log."""


def worker_args(stage: str, params_file: Path, meta: Path, base: Path, out: Path) -> list[str]:
    return ["-m", "model.train", stage, "--params", str(params_file), "--meta", str(meta),
            "--base", str(base), "--out", str(out)]


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # DeepSpeed picks its accelerator at import; on a CPU box it must be told.
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_local(launcher: dict[str, Any], args: list[str], log_file: Path) -> None:
    nproc = int(launcher.get("nproc_per_node", 1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
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
        raise_data_error(log_file)
        raise LaunchFailed(f"torchrun exited {code}; last lines of {log_file}:\n{tail(log_file)}")


def raise_data_error(log_file: Path) -> None:
    """A rank that stopped on bad input: re-raise it as such, so it is not retried."""
    from model.data import DataError

    for line in tail(log_file, 200).splitlines():
        if line.startswith("model.data.DataError: "):
            raise DataError(line.split(": ", 1)[1])


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def sbatch_script(launcher: dict[str, Any], args: list[str], workdir: Path, log_file: Path) -> str:
    """A batch script: one task per node, each running torchrun for that node's GPUs."""
    nodes = int(launcher.get("nnodes", 1))
    gpus = int(launcher.get("nproc_per_node", 1))
    cpu_only = launcher.get("backend", "nccl") == "gloo"
    # a CPU job needs one core per rank; a GPU job some data-loader cores per GPU
    cpus = launcher.get("cpus_per_task") or (gpus if cpu_only else 8 * gpus)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={launcher.get('job_name', 'medrega-tune')}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --output={log_file}",
        f"#SBATCH --time={launcher.get('time', '48:00:00')}",
    ]
    if not cpu_only:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    for key in ("partition", "account", "qos"):
        if launcher.get(key):
            lines.append(f"#SBATCH --{key}={launcher[key]}")
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        # rendezvous on the address Slurm itself uses for that node (a node name need not resolve)
        'head_addr=$(scontrol show node "$head_node" | sed -n "s/.*NodeAddr=\\([^ ]*\\).*/\\1/p")',
        'head_addr=${head_addr:-$head_node}',
        f"export MASTER_PORT={launcher.get('port', 29500)}",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
    ]
    if cpu_only:
        lines.append("export DS_ACCELERATOR=cpu")
    torchrun = [
        shlex.quote(launcher.get("python", sys.executable)), "-m", "torch.distributed.run",
        f"--nnodes={nodes}", f"--nproc-per-node={gpus}",
        "--rdzv-backend=c10d", '--rdzv-endpoint="$head_addr:$MASTER_PORT"', '--rdzv-id="$SLURM_JOB_ID"',
        *(shlex.quote(a) for a in args),
    ]
    lines.append("srun --kill-on-bad-exit=1 " + " ".join(torchrun))
    return "\n".join(lines) + "\n"


def run_slurm(launcher: dict[str, Any], args: list[str], log_file: Path, poll_s: float = 2.0,
              on_line=print) -> str:
    """Submit, stream the job's log, and raise LaunchFailed with the job's error if it fails."""
    script = log_file.with_suffix(".sbatch")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.unlink(missing_ok=True)
    script.write_text(sbatch_script(launcher, args, Path.cwd(), log_file.resolve()))
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
            raise_data_error(log_file)
            raise LaunchFailed(f"Slurm job {job} ended {state}; last lines of {log_file}:\n{tail(log_file)}")
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


def launch(launcher: dict[str, Any], args: list[str], log_file: Path) -> None:
    kind = launcher.get("kind", "local")
    if kind == "local":
        run_local(launcher, args, log_file)
    elif kind == "slurm":
        run_slurm(launcher, args, log_file)
    else:
        raise ValueError(f"params.yaml: tune.launcher.kind must be 'local' or 'slurm', not {kind!r}")
