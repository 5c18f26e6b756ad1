"""Pretraining recipe (tiny preset only): one phase of full training from `base_dir`.

A random-init tiny InternVL has nothing a real base model knows; a short full training on the
train split stands in for a pretrained checkpoint. Phases (params `pretrain.phases`) run one after
the other from tasks/align.py, each from the weights the last one wrote.
"""
from __future__ import annotations

from pathlib import Path

from medrega.config import Config, PretrainPhase
from model import training
from model.data import InstructionDataset, annotation_files
from model.processor import MedRegAProcessor


def run(cfg: Config, phase: PretrainPhase, meta: Path, base_dir: Path, out_dir: Path) -> dict:
    processor = MedRegAProcessor.from_pretrained(base_dir, max_length=cfg.model.max_length)
    # a share of records without their base prompt: the task formats as a generic VLM knows them
    dataset = InstructionDataset(meta, processor, tasks=phase.tasks, seed=cfg.seed,
                                 max_too_long_share=phase.max_too_long_share,
                                 base_prompt_share=phase.base_prompt_share)
    model = training.load_model(base_dir, cfg.model)
    training.train_only(model, [model])
    run_id = ("pretrain", phase, cfg.model, cfg.seed, meta, *annotation_files(meta), base_dir)
    return training.train(model, dataset, processor, phase, stage="pretrain", mode="full", run_id=run_id,
                          out_dir=out_dir, result="model", seed=cfg.seed)
