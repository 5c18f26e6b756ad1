"""The Slurm launcher against a real one-node cluster on loopback (scripts/slurm-local.sh)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from medrega import config
from medrega.config import LauncherConfig
from medrega.errors import BadInput
from model.launch import LaunchFailed, run_slurm, sbatch_script, worker_args

REPO = Path(__file__).resolve().parent.parent


def test_cluster_profile_sbatch_matches_the_papers_layout():
    launcher = config.resolve(REPO / "params.yaml", "h800-cluster").tune.launcher
    args = worker_args(Path("out/config.yaml"), Path("m.json"), Path("base"), Path("out"))
    script = sbatch_script(launcher, args, Path("/work"), Path("/work/tune.log"))
    lines = script.splitlines()
    assert "#SBATCH --nodes=4" in lines and "#SBATCH --ntasks-per-node=1" in lines
    assert "#SBATCH --gpus-per-node=4" in lines
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--nnodes=4" in srun and "--nproc-per-node=4" in srun
    assert "--rdzv-backend=c10d" in srun and '--rdzv-endpoint="$head_addr:$MASTER_PORT"' in srun
    # every rank reads the resolved config the stage wrote, never params.yaml
    assert srun.endswith("-m model.recipes.tune --config out/config.yaml --meta m.json --base base --out out")
    assert "DS_ACCELERATOR=cpu" not in script  # GPUs: DeepSpeed picks CUDA itself


def test_cluster_profile_launches_align_and_evaluation_like_tune():
    cfg = config.resolve(REPO / "params.yaml", "h800-cluster")
    args = worker_args(Path("a/config.yaml"), Path("m.json"), Path("a/base"), Path("a"), recipe="align")
    align = sbatch_script(cfg.align.launcher, args, Path("/work"), Path("/work/align.log"), stage="align").splitlines()
    assert {"#SBATCH --job-name=medrega-align", "#SBATCH --nodes=4", "#SBATCH --gpus-per-node=4"} <= set(align)
    assert next(line for line in align if line.startswith("srun ")).endswith(
        "-m model.recipes.align --config a/config.yaml --meta m.json --base a/base --out a")
    # evaluation: two ranks per node, each spreading the 40B model over two of the node's four GPUs
    args = ["-m", "model.recipes.generate", "--config", "e/config.yaml", "--model", "t/model", "--work", "e/ranks"]
    ev = sbatch_script(cfg.evaluate.launcher, args, Path("/work"), Path("/work/e.log"), stage="evaluate").splitlines()
    assert {"#SBATCH --job-name=medrega-evaluate", "#SBATCH --gpus-per-node=4"} <= set(ev)
    assert "--nproc-per-node=2" in next(line for line in ev if line.startswith("srun "))
    assert cfg.model.device_map == "auto"


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", str(REPO / "scripts/slurm-local.sh"), "start", str(state)],
                           capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, f"could not start the local Slurm cluster:\n{start.stderr[-3000:]}"
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    yield state
    subprocess.run(["bash", str(REPO / "scripts/slurm-local.sh"), "stop", str(state)], timeout=60)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


@pytest.mark.slow
def test_tiny_tune_runs_through_slurm(slurm_cluster, stage_inputs, tmp_path, monkeypatch):
    from tasks.tune import tune

    params = stage_inputs["config"].merged({"tune": {"launcher": {
        "kind": "slurm", "nnodes": 1, "nproc_per_node": 2, "backend": "gloo", "job_name": "medrega-test",
        "time": "00:20:00"}}})
    monkeypatch.chdir(tmp_path)
    summary = tune(stage_inputs["instructions"], stage_inputs["aligned"], tmp_path / "tune", params)
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3
    assert (tmp_path / "tune" / "model" / "model.safetensors").exists()
    script = (tmp_path / "tune" / "train.sbatch").read_text()
    assert "srun" in script and "DS_ACCELERATOR=cpu" in script


@pytest.mark.slow
def test_failed_job_fails_the_task_with_the_jobs_error(slurm_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    launcher = LauncherConfig(kind="slurm", nnodes=1, nproc_per_node=1, backend="gloo", time="00:05:00")
    with pytest.raises(BadInput, match="missing.yaml: params file not found"):  # bad input stays bad input
        run_slurm(launcher, ["-m", "model.recipes.tune", "--config", "missing.yaml", "--meta", "missing.json",
                             "--base", "nowhere", "--out", "o"],
                  tmp_path / "job.log", poll_s=0.5, on_line=lambda line: None)
    boom = tmp_path / "boom.py"
    boom.write_text("raise RuntimeError('CUDA error: out of memory')\n")
    with pytest.raises(LaunchFailed) as err:  # a job that dies of something else: its own error named
        run_slurm(launcher, [str(boom)],
                  tmp_path / "job2.log", poll_s=0.5, on_line=lambda line: None)
    assert "FAILED" in str(err.value)
    assert "CUDA error: out of memory" in str(err.value)  # the job's own words, from its log
