"""Stage 2, instruction tuning: LoRA (or the full LLM) on the region-centric tasks.

Launches the tune recipe on every rank (torchrun locally, or Slurm) with the resolved config this
stage was given, written beside its output (`out_dir/config.yaml`) so every rank, on any node,
reads exactly it. Then, in this single process, merges the LoRA adapter into the base so
`out_dir/model` loads with plain `from_pretrained`; `out_dir/adapter` keeps the adapter alone.
"""
from __future__ import annotations

import json
from pathlib import Path

from medrega import config as config_mod
from medrega import io, tracking
from medrega.config import Config
from model.launch import launch, worker_args
from model.processor import MedRegAProcessor


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    from peft import PeftModel
    from transformers import InternVLForConditionalGeneration

    # in the dtype the base was saved in (bf16 for a real checkpoint: 80 GB of host memory for
    # the 40B model instead of 160 GB in float32, and a merged copy no larger than the base)
    base = InternVLForConditionalGeneration.from_pretrained(str(base_dir), dtype="auto")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    with io.atomic_dir(out_dir) as partial:
        merged.save_pretrained(str(partial))
        MedRegAProcessor.from_pretrained(adapter_dir).save_pretrained(partial)


def check_memory(cfg: Config) -> None:
    """The tune plan against `tune.launcher.gpu_memory_gib` (nothing to check without GPUs)."""
    gib = cfg.tune.launcher.gpu_memory_gib
    if gib:
        from model.plan import GIB, check_fits, plans_for_config

        check_fits(plans_for_config(cfg, int(gib * GIB))["tune"])


def tune(instructions_dir: Path, align_dir: Path, out_dir: Path, cfg: Config) -> dict:
    meta = Path(instructions_dir) / "meta_file.json"
    base = Path(align_dir) / "model"
    out_dir = Path(out_dir)
    check_memory(cfg)  # before anything is submitted: a plan that cannot fit is refused with its levers
    run_config = config_mod.write_resolved(cfg, out_dir / "config.yaml")
    with tracking.stage_run("tune", {"tune": cfg.tune}):
        launch(cfg.tune.launcher, worker_args(run_config, meta, base, out_dir), out_dir / "train.log")
        if cfg.tune.mode == "lora":
            merge_adapter(base, out_dir / "adapter", out_dir / "model")
        summary = json.loads((out_dir / "train_summary.json").read_text())
        tracking.log_training(summary)
    return summary
