"""Stage 1, alignment: build the base model, then train only its MLP projector on captions.

For the `tiny` preset the base is made here: a bilingual BPE tokenizer trained on the
instruction corpus and a randomly initialised InternVL, pretrained briefly (model/recipes/
pretrain.py) to stand in for a downloaded checkpoint. Real presets load their checkpoint and its
tokenizer. Output: `out_dir/model` (HF format, with tokenizer and processor config).

The align recipe runs in this process, or, when `align.launcher` is set, on every rank of that
launcher as tune does (torchrun or Slurm, DeepSpeed ZeRO per `align.deepspeed`), reading the
resolved config written beside the output (`out_dir/config.yaml`). A plan that cannot fit
`align.launcher.gpu_memory_gib` is refused before anything is launched.
"""
from __future__ import annotations

import json
from pathlib import Path

from medrega import config as config_mod
from medrega import tracking
from medrega.config import Config, ModelConfig
from medrega.errors import BadInput
from medrega.grammar import SPECIAL_TOKENS
from model.data import iter_records
from model.presets import build_model
from model.processor import MedRegAProcessor, ProcessorConfig
from model.recipes import align as align_recipe
from model.recipes import pretrain as pretrain_recipe
from model.tokenizer import train_tokenizer


def corpus(meta_file: Path):
    """Every text the model will read or write, for training the tokenizer."""
    seen_prompts = set()
    for record, entry in iter_records(meta_file):
        prompt = entry.get("base_prompt")
        if prompt and prompt not in seen_prompts:
            seen_prompts.add(prompt)
            yield prompt
        for turn in record["conversations"]:
            yield turn["value"]


def load_tokenizer(cfg: Config, meta_file: Path):
    if cfg.model.preset == "tiny":
        return train_tokenizer(corpus(meta_file), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model.checkpoint)
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    return tok


def import_base(m: ModelConfig, base_dir: Path) -> MedRegAProcessor:
    """`model.checkpoint` is a local InternVL remote-layout folder: import it as the base model,
    with the checkpoint's own tokenizer, chat format and image orientation (model/convert.py)."""
    from model.convert import import_checkpoint, read_config, vision_spec

    size = vision_spec(read_config(m.checkpoint), Path(m.checkpoint)).image_size
    if m.image_size != size:
        raise BadInput(f"{m.checkpoint}/config.json: the checkpoint takes {size}px images, "
                       f"model.image_size is {m.image_size}")
    import_checkpoint(m.checkpoint, base_dir, max_length=m.max_length)
    processor = MedRegAProcessor.from_pretrained(base_dir)
    if m.system_prompt:
        processor.config.system_prompt = m.system_prompt
        processor.save_pretrained(base_dir)
    return processor


def build_base(cfg: Config, meta_file: Path, base_dir: Path) -> MedRegAProcessor:
    m = cfg.model
    if m.preset != "tiny" and m.checkpoint:
        from model.convert import is_remote_layout

        if is_remote_layout(m.checkpoint):
            return import_base(m, base_dir)
    tokenizer = load_tokenizer(cfg, meta_file)
    processor = MedRegAProcessor(tokenizer, ProcessorConfig(image_size=m.image_size, num_image_tokens=m.num_image_tokens,
                                                            max_length=m.max_length, system_prompt=m.system_prompt))
    model = build_model(m, tokenizer, seed=cfg.seed)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(str(base_dir))
    processor.save_pretrained(base_dir)
    return processor


def pretrain(cfg: Config, meta_file: Path, base_dir: Path, out_dir: Path) -> Path:
    """The phases of `pretrain.phases`, each from the weights the one before it wrote."""
    for i, phase in enumerate(cfg.pretrain.phases, start=1):
        phase_dir = out_dir / f"phase-{i}"
        summary = pretrain_recipe.run(cfg, phase, meta_file, base_dir, phase_dir)
        tracking.log_training(summary, prefix=f"pretrain-{i}")
        base_dir = phase_dir / "model"
    return base_dir


def check_memory(cfg: Config) -> None:
    """The align plan against `align.launcher.gpu_memory_gib` (nothing to check without GPUs)."""
    gib = cfg.align.launcher.gpu_memory_gib if cfg.align.launcher else None
    if gib:
        from model.plan import GIB, check_fits, plans_for_config

        check_fits(plans_for_config(cfg, int(gib * GIB))["align"])


def run_recipe(cfg: Config, meta_file: Path, base_dir: Path, out_dir: Path) -> dict:
    """The align recipe here, or on every rank of `align.launcher`, reading the config this stage
    was given (written beside the output, so ranks on any node read exactly it)."""
    launcher = cfg.align.launcher
    if launcher is None:
        return align_recipe.run(cfg, meta_file, base_dir, out_dir)
    from model.launch import launch, worker_args

    run_config = config_mod.write_resolved(cfg, out_dir / "config.yaml")
    launch(launcher, worker_args(run_config, meta_file, base_dir, out_dir, recipe="align"), out_dir / "train.log",
           stage="align")
    return json.loads((out_dir / "train_summary.json").read_text())


def align(instructions_dir: Path, out_dir: Path, cfg: Config) -> dict:
    meta_file = Path(instructions_dir) / "meta_file.json"
    out_dir = Path(out_dir)
    base_dir = out_dir / "base"
    check_memory(cfg)  # before anything is built or submitted
    with tracking.stage_run("align", {"align": cfg.align, "model": cfg.model, "pretrain": cfg.pretrain}):
        build_base(cfg, meta_file, base_dir)
        if cfg.model.preset == "tiny":
            base_dir = pretrain(cfg, meta_file, base_dir, out_dir / "pretrain")
        summary = run_recipe(cfg, meta_file, base_dir, out_dir)
        tracking.log_training(summary)
    return summary
