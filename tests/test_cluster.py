"""Cluster-ready operations, for real (torchrun, DeepSpeed ZeRO-3, gloo, a c10d rendezvous on
loopback, Slurm with two slurmd on this machine):

- a run killed with kill -9 resumes from its last checkpoint, and one resumed under another world
  size (2 ranks -> 1, then 1 -> 2), ends where the uninterrupted run ends; a world size that
  cannot keep the run exact is refused, not restarted;
- two torchrun "nodes" (127.0.0.1 and 127.0.0.2) train to the same result as one node with two
  ranks, and so do two Slurm nodes;
- a node that never joins, one pointed at the wrong port, a rank that stops answering: each ends
  in a diagnosis naming the node, the address and what to check, within the configured bounds.

The reference and the resumed runs train without LoRA dropout: dropout masks come from each
rank's random stream, which cannot be split or merged across ranks (model/resume.py), so with
dropout a resumed run follows another random path and only the data, the optimizer state and
the schedule could be compared.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from medrega.config import LauncherConfig
from medrega.errors import BadInput
from model import resume
from model.launch import (
    LaunchFailed,
    RendezvousFailed,
    free_port,
    local_nodes,
    run_slurm,
    supervise,
)
from tests.conftest import REPO

pytestmark = pytest.mark.slow

# Resumed under another world size, each logged loss after the resume and the final adapter
# weights match the uninterrupted run within these. Measured here: bitwise equal (two ranks sum
# the two halves of the global batch in the order one rank accumulates them, and halving is
# exact); a reduction in another order (more ranks, NCCL) rounds differently. A resume that lost
# Adam's moments misses the losses by 1.2e-3 to 1.9e-3 and the weights by 0.86 of their size.
LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-3


def params_for(stage_inputs, **launcher):
    return stage_inputs["config"].merged({"tune": {
        "max_steps": 6, "save_steps": 2, "logging_steps": 1, "lora": {"dropout": 0.0},
        "launcher": {"kind": "local", "nnodes": 1, "nproc_per_node": 2, **launcher}}})


def run_tune(stage_inputs, out: Path, params) -> dict:
    from tasks.tune import tune

    return tune(stage_inputs["instructions"], stage_inputs["aligned"], out, params)


def copy_checkpoint(src: Path, dest: Path, step: int) -> None:
    """`dest` as a run killed right after saving checkpoint-<step> leaves it."""
    keep = f"checkpoint-{step}"
    shutil.copytree(src, dest, ignore=lambda d, names: [n for n in names if d == str(src)
                                                        and n.startswith("checkpoint-") and n != keep])


def snapshot_when_saved(ckpt_dir: Path, step: int, dest: Path) -> threading.Thread:
    """Copies the checkpoints of a running run once checkpoint-<step> is whole (its layout is
    written last), before the Trainer's rotation deletes it."""
    def watch():
        marker = ckpt_dir / f"checkpoint-{step}" / resume.LAYOUT_FILE
        deadline = time.monotonic() + 900
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if marker.exists():
            copy_checkpoint(ckpt_dir, dest, step)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def reference(stage_inputs, tmp_path_factory):
    """The uninterrupted run (one node, two ranks), and its checkpoint-2 as a kill there leaves it."""
    root = tmp_path_factory.mktemp("reference")
    out, snapshot = root / "tune", root / "killed-at-2"
    watcher = snapshot_when_saved(out / "checkpoints", 2, snapshot)
    summary = run_tune(stage_inputs, out, params_for(stage_inputs))
    watcher.join(timeout=60)
    assert (snapshot / "checkpoint-2" / resume.LAYOUT_FILE).exists()
    return {"summary": summary, "out": out, "snapshot": snapshot}


def losses(summary: dict) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in summary["log_history"] if "loss" in h}


def assert_same_run(summary: dict, out: Path, reference: dict) -> None:
    """Every logged loss (a resumed run's history starts with its checkpoint's) and the final
    adapter weights as in the reference run."""
    ref = losses(reference["summary"])
    got = losses(summary)
    assert sorted(got) == sorted(ref)
    for step, loss in got.items():
        assert abs(loss - ref[step]) <= LOSS_RTOL * abs(ref[step]), (step, loss, ref[step])
    mine = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(reference["out"] / "adapter" / "adapter_model.safetensors"))
    assert mine.keys() == theirs.keys()
    for key, tensor in theirs.items():
        scale = tensor.abs().max().item()
        assert (mine[key] - tensor).abs().max().item() <= WEIGHT_RTOL * scale, key


# -- resume under another world size ---------------------------------------------------------

def test_world_size_changes_keep_the_global_batch():
    from tests.conftest import tiny

    cfg = tiny().tune.model_copy(update={"per_device_batch_size": 2, "gradient_accumulation_steps": 1})
    two = resume.Layout(2, 2, 1, 3)
    plan = resume.plan(None, cfg, 2, 3)
    assert plan.layout == two and not plan.convert and plan.saved is None

    def saved(tmp: Path, layout: resume.Layout) -> Path:
        (tmp / "checkpoint-4").mkdir(parents=True, exist_ok=True)
        (tmp / "checkpoint-4" / resume.LAYOUT_FILE).write_text(json.dumps(layout.__dict__))
        return tmp / "checkpoint-4"

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = saved(Path(tmp), two)
        one = resume.plan(ckpt, cfg, 1, 3)            # 2 ranks x 1 -> 1 rank x 2 accumulation
        assert one.layout == resume.Layout(1, 2, 2, 3) and one.convert and one.saved == two
        four = resume.plan(ckpt, cfg, 4, 3)           # more ranks than accumulation: smaller batches
        assert four.layout == resume.Layout(4, 1, 1, 3) and four.convert
        assert resume.plan(ckpt, cfg, 2, 3).layout == two and not resume.plan(ckpt, cfg, 2, 3).convert
        ckpt = saved(Path(tmp), resume.Layout(2, 2, 1, None))
        assert not resume.plan(ckpt, cfg, 1, None).convert   # a whole optimizer state loads anywhere
        with pytest.raises(resume.ResumeRefused, match=r"global batch 4 .*3 ranks cannot keep .*\[1, 2, 4\]"):
            resume.plan(ckpt, cfg, 3, None)
        grouped = cfg.model_copy(update={"group_by_length": True})
        with pytest.raises(resume.ResumeRefused, match="group_by_length .*Resume it under 2 ranks"):
            resume.plan(ckpt, grouped, 1, None)
        assert resume.plan(ckpt, grouped, 1, None, allow_inexact=True).layout == resume.Layout(1, 2, 2, None)
        assert resume.plan(ckpt, grouped, 2, None).layout.world_size == 2  # same world size: exact


def test_zero_below_3_leaves_no_stage3_setting_to_fill():
    from medrega.config import DeepSpeedConfig
    from model.training import deepspeed_config

    # the Trainer fills stage3_* "auto"s for ZeRO-3 only: left in a ZeRO-2 config they stop the run
    for stage in (0, 1, 2):
        assert not any(k.startswith("stage3_") for k in deepspeed_config(DeepSpeedConfig(zero_stage=stage))[
            "zero_optimization"])
    assert deepspeed_config(DeepSpeedConfig(zero_stage=3))["zero_optimization"]["stage3_prefetch_bucket_size"] == "auto"


def test_resume_under_another_world_size_ends_where_the_uninterrupted_run_ends(stage_inputs, reference, tmp_path):
    # killed after checkpoint-2 under two ranks, resumed under one
    one = tmp_path / "one-rank"
    shutil.copytree(reference["snapshot"], one / "checkpoints")
    summary = run_tune(stage_inputs, one, params_for(stage_inputs, nproc_per_node=1))
    assert summary["resumed_from"] == "checkpoint-2" and summary["world_size"] == 1
    assert summary["resumed_layout"]["world_size"] == 2 and summary["universal_checkpoint"]
    assert summary["layout"] == {"world_size": 1, "per_device_batch_size": 2, "gradient_accumulation_steps": 2,
                                 "zero_stage": 3}
    assert "Converting DeepSpeed checkpoint in" in (one / "train.log").read_text()  # deepspeed's converter ran
    assert_same_run(summary, one, reference)

    # that one-rank run killed after checkpoint-4, resumed under two ranks again
    two = tmp_path / "two-ranks"
    copy_checkpoint(one / "checkpoints", two / "checkpoints", 4)
    summary = run_tune(stage_inputs, two, params_for(stage_inputs))
    assert summary["resumed_from"] == "checkpoint-4" and summary["world_size"] == 2
    assert summary["resumed_layout"]["world_size"] == 1 and summary["layout"]["gradient_accumulation_steps"] == 1
    assert_same_run(summary, two, reference)


def test_a_run_killed_mid_training_resumes_and_ends_where_the_uninterrupted_run_ends(stage_inputs, reference,
                                                                                    tmp_path):
    from medrega.config import write_resolved
    from model.launch import worker_args, worker_env

    # the run started as the stage starts it, then kill -9 of torchrun and every rank once a
    # checkpoint is whole
    params = params_for(stage_inputs)
    out = tmp_path / "killed"
    args = worker_args(write_resolved(params, tmp_path / "killed-config.yaml"),
                       stage_inputs["instructions"] / "meta_file.json", stage_inputs["aligned"] / "model", out)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             *args], env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (out / "checkpoints" / "checkpoint-2" / resume.LAYOUT_FILE).exists():
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(0.1)
    # the ranks run in sessions of their own (torchrun starts them so), so each process of the
    # tree is killed, as a lost node loses all of them at once
    for victim in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        victim.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists()
    summary = run_tune(stage_inputs, out, params)  # the same stage again
    assert summary["resumed_from"] in ("checkpoint-2", "checkpoint-4")  # 4 if its save finished first
    assert_same_run(summary, out, reference)

    # killed after its final save: the stage takes the result from that checkpoint instead of
    # training a step past max_steps (under one rank: the world size does not matter then)
    done = tmp_path / "done"
    copy_checkpoint(reference["out"] / "checkpoints", done / "checkpoints", 6)
    summary = run_tune(stage_inputs, done, params_for(stage_inputs, nproc_per_node=1))
    assert summary["resumed_from"] == "checkpoint-6" and summary["global_step"] == 6
    assert (done / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (reference["out"] / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_world_size_that_cannot_resume_exactly_is_refused_not_restarted(stage_inputs, reference, tmp_path):
    out = tmp_path / "three-ranks"
    shutil.copytree(reference["snapshot"], out / "checkpoints")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(BadInput, match=r"checkpoint-2 was saved with global batch 4 .*3 ranks cannot keep"):
        run_tune(stage_inputs, out, params_for(stage_inputs, nproc_per_node=3))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing wiped
    assert not (out / "adapter").exists()


# -- several nodes -----------------------------------------------------------------------------

def test_two_nodes_on_loopback_train_like_one_node_with_two_ranks(stage_inputs, reference, tmp_path):
    out = tmp_path / "two-nodes"
    summary = run_tune(stage_inputs, out, params_for(stage_inputs, nnodes=2, nproc_per_node=1))
    log = (out / "train.log").read_text()
    for k in (0, 1):
        assert f"[node {k}] $ " in log and f"--local-addr=127.0.0.{k + 1}" in log
    assert "--rdzv-backend=c10d" in log and "is_host=1" in log and "is_host=0" in log
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3
    assert_same_run(summary, out, reference)


@pytest.fixture(scope="module")
def slurm_two_nodes(tmp_path_factory):
    import os

    state = tmp_path_factory.mktemp("slurm2")
    start = subprocess.run(["bash", str(REPO / "scripts/slurm-local.sh"), "start", str(state), "2"],
                           capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, f"could not start the two-node Slurm cluster:\n{start.stderr[-3000:]}"
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    yield state
    subprocess.run(["bash", str(REPO / "scripts/slurm-local.sh"), "stop", str(state)], timeout=60)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def test_two_slurm_nodes_train_like_one_node_with_two_ranks(slurm_two_nodes, stage_inputs, reference, tmp_path,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = params_for(stage_inputs, kind="slurm", nnodes=2, nproc_per_node=1, job_name="medrega-two-nodes",
                        time="00:20:00")
    summary = run_tune(stage_inputs, tmp_path / "tune", params)
    script = (tmp_path / "tune" / "train.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "srun --label" in script and "DS_ACCELERATOR=cpu" in script
    log = (tmp_path / "tune" / "train.log").read_text()
    assert "medrega: nodes medrega-node0 medrega-node1 rendezvous 127.0.0.1:" in log
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3
    assert (tmp_path / "tune" / "model" / "model.safetensors").exists()  # merged after the job
    assert_same_run(summary, tmp_path / "tune", reference)


def test_a_failed_slurm_job_fails_the_stage_with_the_jobs_error(slurm_two_nodes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    launcher = LauncherConfig(kind="slurm", nnodes=1, nproc_per_node=1, backend="gloo", time="00:05:00")
    with pytest.raises(BadInput, match="missing.yaml: params file not found"):  # bad input stays bad input
        run_slurm(launcher, ["-m", "model.recipes.tune", "--config", "missing.yaml", "--meta", "missing.json",
                             "--base", "nowhere", "--out", "o"],
                  tmp_path / "job.log", poll_s=0.5, on_line=lambda line: None)
    boom = tmp_path / "boom.py"
    boom.write_text("raise RuntimeError('CUDA error: out of memory')\n")
    with pytest.raises(LaunchFailed) as err:  # a job that dies of something else: its own error named
        run_slurm(launcher, [str(boom)], tmp_path / "job2.log", poll_s=0.5, on_line=lambda line: None)
    assert "FAILED" in str(err.value)
    assert "CUDA error: out of memory" in str(err.value)  # the job's own words, from its log


# -- failures end in a diagnosis, not a hang ----------------------------------------------------

@pytest.fixture
def rehearsal(tmp_path):
    launcher = LauncherConfig(nnodes=2, nproc_per_node=1, rdzv_timeout_s=10, comm_timeout_s=10)
    worker = tmp_path / "worker.py"
    worker.write_text("print('never reached: the rendezvous does not complete')\n")
    return launcher, local_nodes(launcher, [str(worker)])


def test_a_node_that_never_joins_is_named_with_its_address(rehearsal, tmp_path):
    launcher, nodes = rehearsal
    with pytest.raises(RendezvousFailed) as err:
        supervise(nodes[:1], tmp_path / "train.log", launcher)  # node 1 is never started
    message = str(err.value)
    assert message.startswith(f"node 0 (127.0.0.1): the rendezvous at {nodes[0].endpoint} did not complete within "
                              "10 s")
    assert "not all 2 nodes joined" in message and "same --rdzv-id and --nnodes=2" in message


def test_a_node_pointed_at_the_wrong_port_is_named_with_the_address_it_tried(rehearsal, tmp_path):
    launcher, nodes = rehearsal
    wrong = f"127.0.0.1:{free_port()}"
    lost = replace(nodes[1], endpoint=wrong, cmd=[a.replace(nodes[1].endpoint, wrong) for a in nodes[1].cmd])
    with pytest.raises(RendezvousFailed) as err:
        supervise([nodes[0], lost], tmp_path / "train.log", launcher)
    message = str(err.value)
    assert message.startswith(f"node 1 (127.0.0.2): could not reach the rendezvous store at {wrong}")
    assert "Check that node 0 is running" in message and "the port is right" in message
    assert "node 0: torchrun exited" in message  # node 0, left waiting for it, is named too


def test_the_node_that_could_not_join_is_blamed_even_when_the_waiting_node_ends_first(tmp_path):
    """The order the rehearsal above meets by chance: node 0, left waiting at the rendezvous,
    ends before node 1, which could not reach the store. Node 1 is the cause and is named first."""
    from model.launch import Node, failure_diagnosis

    launcher = LauncherConfig(nnodes=2, nproc_per_node=1, rdzv_timeout_s=10)
    waiting, lost = Node(0, "127.0.0.1", "127.0.0.1:29500", []), Node(1, "127.0.0.2", "127.0.0.1:29501", [])
    err = failure_diagnosis(
        [(waiting, "torchrun exited 1", "torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError"),
         (lost, "torchrun exited 1", "torch.distributed.elastic.rendezvous.api.RendezvousConnectionError: "
                                     "The connection to the C10d store has failed.")],
        2, tmp_path / "train.log", launcher)
    assert str(err).startswith("node 1 (127.0.0.2): could not reach the rendezvous store at 127.0.0.1:29501")
    assert "also failed, after node 1 or for the same cause: node 0: torchrun exited 1" in str(err)


def test_a_rank_that_stops_answering_fails_the_others_within_comm_timeout(tmp_path):
    launcher = LauncherConfig(nnodes=2, nproc_per_node=1, rdzv_timeout_s=60, comm_timeout_s=5)
    worker = tmp_path / "worker.py"
    # joins the process group through the trainer's own bounded setup, then rank 1 goes silent
    worker.write_text(
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "import time, torch\n"
        "from model.training import init_distributed, world\n"
        f"init_distributed('gloo', {launcher.comm_timeout_s})\n"
        "if world()[0] == 1:\n"
        "    time.sleep(600)\n"
        "torch.distributed.all_reduce(torch.ones(1))\n")
    nodes = local_nodes(launcher, [str(worker)])
    with pytest.raises(RendezvousFailed) as err:
        supervise(nodes, tmp_path / "train.log", launcher)
    message = str(err.value)
    assert message.startswith(f"node 0 (127.0.0.1): the nodes met at {nodes[0].endpoint} but the gloo backend failed")
    assert "tune.launcher.comm_timeout_s (5 s)" in message
    # the silent node does not linger: stopped here, or ended by its own agent once node 0's store went
    assert "stopped by the launcher after that: node 1" in message or "node 1: torchrun exited" in message
