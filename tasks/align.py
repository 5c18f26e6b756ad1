"""Stage 1, alignment: build the base model and train only its MLP projector on captions.

For the `tiny` preset the base is made here: a bilingual BPE tokenizer trained on the
instruction corpus and a randomly initialised InternVL. Real presets load their checkpoint
and its tokenizer. Output: `out_dir/model` (HF format, with tokenizer and processor config).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medrega import tracking
from model.data import iter_records
from model.presets import build_model, num_image_tokens
from model.processor import MedRegAProcessor, ProcessorConfig
from model.tokenizer import SPECIAL_TOKENS, train_tokenizer
from model.train import train_stage


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


def load_tokenizer(params: dict[str, Any], meta_file: Path):
    cfg = params["model"]
    if cfg["preset"] == "tiny":
        return train_tokenizer(corpus(meta_file), params["tokenizer"]["vocab_size"], params["tokenizer"]["min_frequency"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg["checkpoint"])
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    return tok


def import_base(cfg: dict[str, Any], base_dir: Path) -> MedRegAProcessor:
    """`model.checkpoint` is a local InternVL remote-layout folder: import it as the base model,
    with the checkpoint's own tokenizer, chat format and image orientation (model/convert.py)."""
    from model.convert import import_checkpoint, read_config, vision_spec

    size = vision_spec(read_config(cfg["checkpoint"]), Path(cfg["checkpoint"])).image_size
    if cfg["image_size"] != size:
        raise ValueError(f"{cfg['checkpoint']}/config.json: the checkpoint takes {size}px images, "
                         f"model.image_size is {cfg['image_size']}")
    import_checkpoint(cfg["checkpoint"], base_dir, max_length=cfg["max_length"])
    processor = MedRegAProcessor.from_pretrained(base_dir)
    if cfg.get("system_prompt"):
        processor.config.system_prompt = cfg["system_prompt"]
        processor.save_pretrained(base_dir)
    return processor


def build_base(params: dict[str, Any], meta_file: Path, base_dir: Path) -> MedRegAProcessor:
    cfg = params["model"]
    if cfg["preset"] != "tiny" and cfg.get("checkpoint"):
        from model.convert import is_remote_layout

        if is_remote_layout(cfg["checkpoint"]):
            return import_base(cfg, base_dir)
    tokenizer = load_tokenizer(params, meta_file)
    processor = MedRegAProcessor(
        tokenizer,
        ProcessorConfig(image_size=cfg["image_size"], num_image_tokens=num_image_tokens(cfg),
                        max_length=cfg["max_length"], system_prompt=cfg.get("system_prompt")),
    )
    model = build_model(cfg, tokenizer, seed=params["seed"])
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(str(base_dir))
    processor.save_pretrained(base_dir)
    return processor


def pretrain(params: dict[str, Any], meta_file: Path, base_dir: Path, out_dir: Path) -> Path:
    """The phases of `model.base_pretrain`, each from the weights the one before it wrote."""
    cfg = params["model"].get("base_pretrain") or {}
    common = {k: v for k, v in cfg.items() if k != "phases"}
    for i, phase in enumerate(cfg.get("phases") or [], start=1):
        phase_cfg = {**common, **phase}
        if phase_cfg.get("max_steps", 0) <= 0:
            continue
        phase_dir = out_dir / f"phase-{i}"
        tracking.log_training(train_stage("base", params, meta_file, base_dir, phase_dir, cfg=phase_cfg),
                              prefix=f"pretrain-{i}")
        base_dir = phase_dir / "model"
    return base_dir


def align(instructions_dir: Path, out_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
    meta_file = Path(instructions_dir) / "meta_file.json"
    out_dir = Path(out_dir)
    base_dir = out_dir / "base"
    with tracking.stage_run("align", {"align": params["align"], "model": params["model"]}):
        build_base(params, meta_file, base_dir)
        if params["model"]["preset"] == "tiny":
            # Real presets start from a pretrained InternVL; the tiny preset has nothing to
            # download, so a short full pretraining on the train split stands in for one.
            base_dir = pretrain(params, meta_file, base_dir, out_dir / "pretrain")
        summary = train_stage("align", params, meta_file, base_dir, out_dir)
        tracking.log_training(summary)
    return summary
