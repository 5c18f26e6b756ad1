"""Instruction-tuning recipe (stage 2, SPEC §5): LoRA on the language model (the paper) or the
full LLM (the authors' released script) on the instruction mix, vision encoder and projector
frozen, under DeepSpeed ZeRO-3 when configured.

Runs on every rank: `python -m model.recipes.tune --config RESOLVED --meta M --base B --out O`
(tasks/tune.py launches it through torchrun or Slurm with the resolved config the stage was
given, so every rank trains exactly that). LoRA writes `out/adapter`; merging it into the base is
the caller's single-process step.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from transformers import set_seed

from medrega import config as config_mod
from medrega.config import Config
from model import training
from model.data import InstructionDataset, annotation_files
from model.processor import MedRegAProcessor


def instruction_mix(cfg: Config) -> list[str]:
    """tune.tasks, or every materialized task but the stage-1 captions (as the paper trains)."""
    return list(cfg.tune.tasks or [t for t in cfg.materialize.tasks if t != "caption"])


def run(cfg: Config, meta: Path, base_dir: Path, out_dir: Path, callbacks: list | None = None) -> dict:
    tune = cfg.tune
    processor = MedRegAProcessor.from_pretrained(base_dir, max_length=cfg.model.max_length)
    dataset = InstructionDataset(meta, processor, tasks=instruction_mix(cfg), seed=cfg.seed,
                                 max_too_long_share=tune.max_too_long_share)
    model = training.load_model(base_dir, cfg.model)
    if tune.mode == "lora":
        # LoRA's A matrices are drawn here, before the Trainer seeds anything: without this, two
        # runs with the same inputs (or a killed run and the one it resumes towards) would start
        # from different adapters and drift apart once B leaves zero.
        set_seed(cfg.seed)
        model = training.apply_lora(model, tune.lora)
    else:
        training.train_only(model, [model.model.language_model, model.lm_head])
    if tune.gradient_checkpointing:
        model.enable_input_require_grads()
    run_id = ("tune", tune.model_dump(exclude={"launcher"}), cfg.model, cfg.seed, meta, *annotation_files(meta),
              base_dir)
    return training.train(model, dataset, processor, tune, stage="tune", mode=tune.mode, run_id=run_id,
                          out_dir=out_dir, result="adapter" if tune.mode == "lora" else "model", seed=cfg.seed,
                          deepspeed=training.deepspeed_config(tune.deepspeed) if tune.deepspeed else None,
                          ddp_backend=tune.launcher.backend, comm_timeout_s=tune.launcher.comm_timeout_s,
                          allow_inexact_resume=tune.launcher.allow_inexact_resume, callbacks=callbacks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The tune recipe on one rank.")
    parser.add_argument("--config", type=Path, required=True, help="A resolved config (params.resolved.yaml).")
    parser.add_argument("--meta", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args(argv)
    run(config_mod.load_resolved(a.config), a.meta, a.base, a.out)
    training.leave_distributed()


if __name__ == "__main__":
    main()
