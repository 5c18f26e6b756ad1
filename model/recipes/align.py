"""Alignment recipe (stage 1, SPEC §5): the MLP projector trains on captions; the vision
encoder and the language model stay frozen.

Runs in the stage's own process (the tiny profile), or on every rank like the tune recipe when
`align.launcher` is set: `python -m model.recipes.align --config RESOLVED --meta M --base B --out O`
(tasks/align.py launches it through torchrun or Slurm), under DeepSpeed ZeRO when `align.deepspeed`
is set, so a real checkpoint's frozen weights are sharded over the GPUs instead of held whole by one.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from medrega import config as config_mod
from medrega.config import Config, LauncherConfig
from model import training
from model.data import InstructionDataset, annotation_files
from model.processor import MedRegAProcessor


def run(cfg: Config, meta: Path, base_dir: Path, out_dir: Path) -> dict:
    align = cfg.align
    processor = MedRegAProcessor.from_pretrained(base_dir, max_length=cfg.model.max_length)
    dataset = InstructionDataset(meta, processor, tasks=["caption"], seed=cfg.seed,
                                 max_too_long_share=align.max_too_long_share)
    model = training.load_model(base_dir, cfg.model)
    training.train_only(model, [model.model.multi_modal_projector])
    # the launcher is left out of the run's identity: the same run resumes on another cluster shape
    run_id = ("align", align.model_dump(exclude={"launcher"}), cfg.model, cfg.seed, meta, *annotation_files(meta),
              base_dir)
    launcher = align.launcher or LauncherConfig()  # in one process only its defaults matter
    return training.train(model, dataset, processor, align, stage="align", mode="projector", run_id=run_id,
                          out_dir=out_dir, result="model", seed=cfg.seed,
                          deepspeed=training.deepspeed_config(align.deepspeed) if align.deepspeed else None,
                          ddp_backend=launcher.backend if align.launcher else None,
                          comm_timeout_s=launcher.comm_timeout_s, allow_inexact_resume=launcher.allow_inexact_resume)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The align recipe on one rank.")
    parser.add_argument("--config", type=Path, required=True, help="A resolved config (params.resolved.yaml).")
    parser.add_argument("--meta", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args(argv)
    run(config_mod.load_resolved(a.config), a.meta, a.base, a.out)
    training.leave_distributed()


if __name__ == "__main__":
    main()
