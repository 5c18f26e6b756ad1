"""Alignment recipe (stage 1, SPEC §5): the MLP projector trains on captions; the vision
encoder and the language model stay frozen."""
from __future__ import annotations

from pathlib import Path

from medrega.config import Config
from model import training
from model.data import InstructionDataset, annotation_files
from model.processor import MedRegAProcessor


def run(cfg: Config, meta: Path, base_dir: Path, out_dir: Path) -> dict:
    processor = MedRegAProcessor.from_pretrained(base_dir, max_length=cfg.model.max_length)
    dataset = InstructionDataset(meta, processor, tasks=["caption"], seed=cfg.seed,
                                 max_too_long_share=cfg.align.max_too_long_share)
    model = training.load_model(base_dir, cfg.model)
    training.train_only(model, [model.model.multi_modal_projector])
    run_id = ("align", cfg.align, cfg.model, cfg.seed, meta, *annotation_files(meta), base_dir)
    return training.train(model, dataset, processor, cfg.align, stage="align", mode="projector", run_id=run_id,
                          out_dir=out_dir, result="model", seed=cfg.seed)
