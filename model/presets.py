"""Model presets: one place that says how each named model is built or loaded.

`tiny` is a randomly initialised InternVL (ViT + MLP projector + Qwen2 LM) built from
params, for CPU runs. Real presets load an InternVL checkpoint in Hugging Face format
(`InternVLForConditionalGeneration`) from a local path or the hub; `trust_remote_code` stays off.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast, Qwen2Config
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

from model.tokenizer import IMG_CONTEXT

# Hugging Face-format InternVL checkpoints a user can point `model.checkpoint` at.
CHECKPOINT_PRESETS = {
    "internvl3-1b": "OpenGVLab/InternVL3-1B-hf",
    "internvl3-2b": "OpenGVLab/InternVL3-2B-hf",
    "internvl3-8b": "OpenGVLab/InternVL3-8B-hf",
    "internvl-34b": "OpenGVLab/InternVL-Chat-V1-2",
}


def num_image_tokens(cfg: dict[str, Any]) -> int:
    per_side = cfg["image_size"] // cfg["patch_size"]
    return int(per_side * per_side * cfg["downsample_ratio"] ** 2)


def tiny_config(cfg: dict[str, Any], tokenizer: PreTrainedTokenizerFast) -> InternVLConfig:
    vision = InternVLVisionConfig(
        hidden_size=cfg["vision_hidden_size"],
        num_hidden_layers=cfg["vision_layers"],
        num_attention_heads=cfg["vision_heads"],
        intermediate_size=cfg["vision_hidden_size"] * 4,
        image_size=[cfg["image_size"], cfg["image_size"]],
        patch_size=[cfg["patch_size"], cfg["patch_size"]],
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg["text_hidden_size"],
        num_hidden_layers=cfg["text_layers"],
        num_attention_heads=cfg["text_heads"],
        num_key_value_heads=cfg["text_kv_heads"],
        intermediate_size=cfg["text_intermediate_size"],
        max_position_embeddings=max(512, cfg["max_length"]),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
        image_seq_length=num_image_tokens(cfg),
        downsample_ratio=cfg["downsample_ratio"],
    )


def build_model(cfg: dict[str, Any], tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> InternVLForConditionalGeneration:
    """A fresh model for stage 1 (alignment)."""
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    if cfg["preset"] == "tiny":
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(tiny_config(cfg, tokenizer))
        model.config._attn_implementation = cfg.get("attn_implementation", "sdpa")
        return model.to(dtype)
    checkpoint = cfg.get("checkpoint") or CHECKPOINT_PRESETS[cfg["preset"]]
    model = InternVLForConditionalGeneration.from_pretrained(
        checkpoint, dtype=dtype, attn_implementation=cfg.get("attn_implementation", "sdpa")
    )
    if model.config.image_token_id != tokenizer.convert_tokens_to_ids(IMG_CONTEXT):
        raise ValueError(f"{checkpoint}: image token id does not match the tokenizer's {IMG_CONTEXT}")
    return model
