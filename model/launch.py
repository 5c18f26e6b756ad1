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
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from medrega.config import LauncherConfig
from medrega.errors import BadInput, MedregaError, Transient


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


@dataclass(frozen=True)
class Node:
    """One torchrun agent: a node of the job. On one machine a "node" is a torchrun process with
    its own loopback address; the rendezvous cannot tell it from a separate host."""

    index: int
    address: str            # the node's own address (torchrun --local-addr)
    endpoint: str           # host:port of the c10d rendezvous store it joins
    cmd: list[str]


def local_nodes(launcher: LauncherConfig, args: list[str], port: int | None = None,
                rdzv_id: str | None = None) -> list[Node]:
    """The torchrun commands of a local run: one standalone node, or `nnodes` nodes on
    127.0.0.1, 127.0.0.2, ... joining a c10d rendezvous that node 0 hosts on 127.0.0.1."""
    run = [sys.executable, "-m", "torch.distributed.run"]
    if launcher.nnodes == 1:
        return [Node(0, "127.0.0.1", "standalone",
                     [*run, "--standalone", f"--nproc-per-node={launcher.nproc_per_node}", *args])]
    if launcher.nnodes > 9:  # the rendezvous compares addresses as text: 127.0.0.10 < 127.0.0.2
        raise BadInput(f"tune.launcher.nnodes {launcher.nnodes}: a local rehearsal runs at most 9 nodes "
                       "(127.0.0.1 to 127.0.0.9); use kind: slurm for more")
    endpoint = f"127.0.0.1:{port or free_port()}"
    rdzv_id = rdzv_id or f"medrega-{os.getpid()}-{int(time.time())}"
    nodes = []
    for k in range(launcher.nnodes):
        # The c10d backend ignores --node-rank and orders nodes by address: 127.0.0.(k+1) makes
        # node k group rank k. Node 0 hosts the store; the others only connect (is_host=0), so a
        # node pointed at the wrong endpoint fails instead of hosting a store of its own.
        conf = (f"join_timeout={launcher.rdzv_timeout_s},read_timeout={read_timeout(launcher)},"
                f"is_host={int(k == 0)}")
        nodes.append(Node(k, f"127.0.0.{k + 1}", endpoint, [
            *run, f"--nnodes={launcher.nnodes}", f"--nproc-per-node={launcher.nproc_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}", f"--rdzv-conf={conf}",
            f"--local-addr=127.0.0.{k + 1}", "--max-restarts=0", *args]))
    return nodes


def read_timeout(launcher: LauncherConfig) -> int:
    """How long a node tries to reach the rendezvous store: well inside the join timeout, so a
    node that cannot reach it says so before the others give up waiting for it."""
    return max(5, launcher.rdzv_timeout_s // 4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(launcher: LauncherConfig, args: list[str], log_file: Path) -> None:
    supervise(local_nodes(launcher, args), log_file, launcher)


def supervise(nodes: list[Node], log_file: Path, launcher: LauncherConfig, grace_s: float = 10.0) -> None:
    """Run the nodes, streaming their output into `log_file` (lines prefixed `[node k]` when
    there are several). The first node that fails stops the others (their ranks would otherwise
    wait in a collective until comm_timeout_s) and its diagnosis is raised."""
    env, many = worker_env(), launcher.nnodes > 1
    if many:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a rehearsal on one machine talks over loopback
    log_file.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    recent = {n.index: deque(maxlen=400) for n in nodes}
    with log_file.open("w") as log:
        def emit(node: Node, line: str) -> None:
            recent[node.index].append(line.rstrip("\n"))
            text = f"[node {node.index}] {line}" if many else line
            with lock:  # stream: the flow's log shows training as it happens
                log.write(text)
                log.flush()
                sys.stdout.write(text)

        procs, readers = [], []
        try:
            for node in nodes:
                emit(node, "$ " + shlex.join(node.cmd) + "\n")
                # own session: stopping a node stops its torchrun and every rank under it
                proc = subprocess.Popen(node.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                        text=True, start_new_session=True)
                procs.append(proc)
                readers.append(threading.Thread(target=lambda n=node, p=proc: [emit(n, x) for x in p.stdout],
                                                daemon=True))
                readers[-1].start()
            codes, order, stopped = _watch(procs, grace_s)
        finally:  # interrupted here (Ctrl-C, a failed start): no node outlives its launcher
            for proc in procs:
                if proc.poll() is None:
                    _stop(proc)
            for reader in readers:
                reader.join(timeout=30)
    failed = [(nodes[k], f"torchrun exited {codes[k]}", "\n".join(recent[nodes[k].index]))
              for k in order if codes[k] and k not in stopped]
    if failed:
        err = failure_diagnosis(failed, launcher.nnodes, log_file, launcher)
        if stopped:
            err.args = (f"{err.args[0]}\n(stopped by the launcher after that: "
                        f"{', '.join(f'node {k}' for k in sorted(stopped))})",)
        raise err


def _watch(procs: list[subprocess.Popen], grace_s: float) -> tuple[list[int], list[int], set[int]]:
    """Exit codes once every node ended, the nodes in the order they ended, and which were
    stopped here: after the first failure the others get `grace_s` to end on their own (their
    own error may be the cause), then are stopped."""
    deadline, stopped, order = None, set(), []
    while True:
        codes = [p.poll() for p in procs]
        order += [k for k, c in enumerate(codes) if c is not None and k not in order]
        if all(c is not None for c in codes):
            for p in procs:
                p.wait()
            time.sleep(0.2)  # let the output threads drain
            return codes, order, stopped
        if deadline is None and any(c not in (None, 0) for c in codes):
            deadline = time.monotonic() + grace_s
        if deadline is not None and time.monotonic() > deadline:
            for k, (p, c) in enumerate(zip(procs, codes)):
                if c is None:
                    stopped.add(k)
                    _stop(p)
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# a raised error's last line; srun --label puts "3: " and torchrun "[rank3]: " before it
_RAISED = re.compile(r"^(?:\s*\d+: )?(?:\[rank\d+\]:\s*)?"
                     r"(?P<cls>[A-Za-z_][\w.]*(?:Error|Exception|Failed|Refused|Input|Busy))(?:: (?P<msg>.+)|\s*)$")
# what a rank or agent raises when the network between nodes, not the training, is at fault
_BACKEND = re.compile(r"Dist(?:Network|Backend|Store)Error|gloo|nccl|ProcessGroup|Connection (?:closed|reset) by peer|"
                      r"Connection refused|Broken pipe|timed out|timeout", re.IGNORECASE)


class RendezvousFailed(Transient):
    """Nodes could not find or reach each other: which node, which address, what to check."""


class RendezvousTimedOut(RendezvousFailed):
    """A node waited for the others in vain: mostly the symptom of another node's failure."""


def failure_diagnosis(failed: list[tuple[Node, str, str]], nnodes: int, log_file: Path,
                      launcher: LauncherConfig) -> MedregaError:
    """The error that explains a failure, from (node, what happened, its output) of each failed
    node in the order they failed: bad input on any node (it is never retried), else the first
    node's that is not a rendezvous timeout, since what the others report next (a lost store, a
    timed-out collective) is mostly that node going away, and a node left waiting at the
    rendezvous may end before the one that could not join. The other failed nodes are named too."""
    verdicts = [(node, node_diagnosis(node, what, text, log_file, launcher, nnodes)) for node, what, text in failed]
    node, err = min(verdicts, key=lambda verdict: _blame_order(verdict[1]))  # the first of equals
    others = [f"node {n.index}: {what}" for n, what, _ in failed if n.index != node.index]
    if others:
        err.args = (f"{err.args[0]}\n(also failed, after node {node.index} or for the same cause: "
                    f"{'; '.join(others)})",)
    return err


def _blame_order(err: MedregaError) -> int:
    """Bad input first, a node left waiting at the rendezvous last, any other error between."""
    return 0 if isinstance(err, BadInput) else 2 if isinstance(err, RendezvousTimedOut) else 1


def node_diagnosis(node: Node, what: str, text: str, log_file: Path, launcher: LauncherConfig,
                   nnodes: int) -> MedregaError:
    """One failed node's output read as bad input, an unreachable rendezvous store, a rendezvous
    timeout, a backend failure or its own error, each with what to check."""
    where = "" if nnodes == 1 else f"node {node.index} ({node.address}): "
    raised = [m for m in map(_RAISED.match, text.splitlines()) if m and not m["cls"].endswith("ChildFailedError")]
    names = " ".join(m["cls"] for m in raised)
    bad = _bad_input(raised)
    if bad is not None:
        return bad
    if "RendezvousConnectionError" in names:
        return RendezvousFailed(
            f"{where}could not reach the rendezvous store at {node.endpoint} within {read_timeout(launcher)} s. "
            f"Check that node 0 is running and hosts the store on that address and port, that the port is right "
            f"and open (a firewall), and that {node.endpoint.rsplit(':', 1)[0]} routes from this node.")
    if "RendezvousTimeoutError" in names:
        return RendezvousTimedOut(
            f"{where}the rendezvous at {node.endpoint} did not complete within {launcher.rdzv_timeout_s} s "
            f"(tune.launcher.rdzv_timeout_s): not all {nnodes} nodes joined. Check that every node was started with "
            f"the same --rdzv-id and --nnodes={nnodes}, that each reaches {node.endpoint} (the address of node 0; "
            f"a firewall), and whether a node failed before joining (its lines in {log_file}).")
    backend = [m for m in raised if _BACKEND.search(f"{m['cls']} {m['msg'] or ''}")]
    if backend:
        first = backend[0]
        return RendezvousFailed(
            f"{where}the nodes met at {node.endpoint} but the {launcher.backend} backend failed: "
            f"{first['cls']}: {first['msg'] or ''}. Check that the nodes reach each other on the interface "
            f"{launcher.backend} uses (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME), that no rank died first "
            f"(the other nodes' lines in {log_file}), and that no step waits longer than "
            f"tune.launcher.comm_timeout_s ({launcher.comm_timeout_s} s).")
    return diagnosis_of(raised, where + what, text, str(log_file))


def _bad_input(raised: list[re.Match]) -> BadInput | None:
    """A rank that stopped on bad input (any medrega BadInput, e.g. DataError, ConfigError,
    ResumeRefused) stays bad input, so it is not retried: raised here as its own class where
    that takes the message alone, else as BadInput."""
    import importlib

    for m in raised:
        module, _, name = m["cls"].rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name) if module.startswith(("medrega", "model")) else None
        except (ImportError, AttributeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, BadInput):
            try:
                err = cls(m["msg"] or m["cls"])
            except Exception:  # a class built from something else (PlanDoesNotFit takes a plan)
                err = None
            return err if isinstance(err, BadInput) and str(err) == (m["msg"] or m["cls"]) \
                else BadInput(m["msg"] or m["cls"])
    return None


def diagnosis_of(raised: list[re.Match], what: str, text: str, source: str = "the log") -> MedregaError:
    """BadInput when a rank stopped on bad input; else LaunchFailed naming the rank's own error
    before the log's tail."""
    bad = _bad_input(raised)
    if bad is not None:
        return bad
    first = f"\nfirst error: {raised[0]['cls']}: {raised[0]['msg'] or ''}" if raised else ""
    return LaunchFailed(f"{what}{first}\nlast lines of {source}:\n" + "\n".join(text.splitlines()[-30:]))


def diagnosis(log_file: Path, what: str) -> MedregaError:
    """What a failed job's ranks raised (from its log), as the error to raise here."""
    text = tail(log_file, 400)
    raised = [m for m in map(_RAISED.match, text.splitlines()) if m and not m["cls"].endswith("ChildFailedError")]
    return diagnosis_of(raised, what, text, str(log_file))


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
        # read back by the launcher's diagnosis: node k of the `--label`ed lines is the k-th name
        ('echo "medrega: nodes $(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd " ") '
         'rendezvous $head_addr:$MASTER_PORT"'),
    ]
    if cpu_only:
        lines.append("export DS_ACCELERATOR=cpu")
    torchrun = [
        shlex.quote(launcher.python or sys.executable), "-m", "torch.distributed.run",
        f"--nnodes={nodes}", f"--nproc-per-node={ranks}",
        "--rdzv-backend=c10d", '--rdzv-endpoint="$head_addr:$MASTER_PORT"', '--rdzv-id="$SLURM_JOB_ID"',
        f"--rdzv-conf=join_timeout={launcher.rdzv_timeout_s},read_timeout={read_timeout(launcher)}",
        "--max-restarts=0", *(shlex.quote(a) for a in args),
    ]
    # --label: every line starts with the task (= node) number, so a failure names its node
    lines.append("srun --label --kill-on-bad-exit=1 " + " ".join(torchrun))
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
            raise slurm_diagnosis(log_file, launcher, f"Slurm job {job} ended {state}")
        time.sleep(poll_s)


_NODES_LINE = re.compile(r"^medrega: nodes (?P<hosts>.*) rendezvous (?P<endpoint>\S+)$")
_LABELLED = re.compile(r"^\s*(?P<task>\d+): (?P<line>.*)$")


def slurm_diagnosis(log_file: Path, launcher: LauncherConfig, what: str) -> MedregaError:
    """The job's log split by node (srun --label) and read like a local run's nodes."""
    hosts, endpoint, per_node, first_error = [], "the first node", {}, {}
    for i, line in enumerate(tail(log_file, 4000).splitlines()):
        if m := _NODES_LINE.match(line):
            hosts, endpoint = m["hosts"].split(), m["endpoint"]
        elif m := _LABELLED.match(line):
            k = int(m["task"])
            per_node.setdefault(k, []).append(m["line"])
            if _RAISED.match(m["line"]):
                first_error.setdefault(k, i)  # the order the nodes failed in
    failed = [(Node(k, hosts[k] if k < len(hosts) else "?", endpoint, []), what, "\n".join(per_node[k][-400:]))
              for k in sorted(first_error, key=first_error.get)]
    if not failed:
        return diagnosis(log_file, what)
    return failure_diagnosis(failed, launcher.nnodes, log_file, launcher)


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
