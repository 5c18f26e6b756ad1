"""Model presets: one place that says how each named model is built or loaded.

`tiny` is a randomly initialised InternVL (ViT + MLP projector + Qwen2 LM) built from
params, for CPU runs. Real presets load an InternVL checkpoint in Hugging Face format
(`InternVLForConditionalGeneration`) from a local path or the hub; `trust_remote_code` stays off.
"""
from __future__ import annotations

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast, Qwen2Config
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

from medrega.config import CHECKPOINT_PRESETS, ModelConfig
from medrega.errors import BadInput
from medrega.grammar import IMG_CONTEXT


def tiny_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> InternVLConfig:
    vision = InternVLVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        intermediate_size=cfg.vision_hidden_size * 4,
        image_size=[cfg.image_size, cfg.image_size],
        patch_size=[cfg.patch_size, cfg.patch_size],
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        intermediate_size=cfg.text_intermediate_size,
        max_position_embeddings=max(512, cfg.max_length),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
        image_seq_length=cfg.num_image_tokens,
        downsample_ratio=cfg.downsample_ratio,
    )


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> InternVLForConditionalGeneration:
    """A fresh model for stage 1 (alignment)."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.preset == "tiny":
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(tiny_config(cfg, tokenizer))
        model.config._attn_implementation = cfg.attn_implementation
        return model.to(dtype)
    checkpoint = cfg.checkpoint or CHECKPOINT_PRESETS[cfg.preset]
    model = InternVLForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype,
                                                             attn_implementation=cfg.attn_implementation)
    if model.config.image_token_id != tokenizer.convert_tokens_to_ids(IMG_CONTEXT):
        raise BadInput(f"{checkpoint}: image token id does not match the tokenizer's {IMG_CONTEXT}")
    return model
