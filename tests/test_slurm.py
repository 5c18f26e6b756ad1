"""The sbatch scripts the Slurm launcher writes for the cluster profile. Jobs on a real Slurm
cluster (two slurmd on loopback, scripts/slurm-local.sh) are run in tests/test_cluster.py."""
from __future__ import annotations

from pathlib import Path

from medrega import config
from model.launch import sbatch_script, worker_args

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
