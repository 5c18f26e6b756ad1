"""Memory plan before launch: what one GPU holds while training align or tune, and whether it fits.

Pure functions of explicit arguments: an `Architecture` (vision tower, projector, LLM, vocabulary)
and a `TrainingSetup` (stage and mode, LoRA, ZeRO stage and offload, dtype, per-device batch, padded
tokens per sample, gradient checkpointing, attention implementation, GPUs, GPU memory). `make_plan`
returns a `Plan`: per-GPU components in bytes, their total, whether it fits, and the levers that
would make it fit, each with the total it gives. `format_plan` renders it as a plain table;
`check_fits` raises `PlanDoesNotFit` naming the levers, for a launcher to call before it submits.

Where each figure comes from
----------------------------
Model states (parameters, gradients, optimizer states). Under ZeRO-2/3 these are DeepSpeed's own
estimators (`estimate_zero3_model_states_mem_needs`, `estimate_zero2_model_states_mem_needs`, the
functions DeepSpeed's `*_all_cold` helpers print). They assume every parameter trains with
mixed-precision Adam: 18 bytes per parameter spread over the GPUs (16-bit weights, fp32 master
weights, Adam moments, gradients) plus, for ZeRO-3, 4 bytes x the largest layer gathered whole. So
they are called with the *trainable* parameters only (LoRA adapters; the LLM for full tuning; the
projector for align), with the largest layer of the whole model (as DeepSpeed's own
`model_to_params` would find it, frozen layers included, since ZeRO-3 gathers those as well); the
frozen weights are added at 2 bytes each, sharded over all GPUs under ZeRO-3 and replicated under
ZeRO-1/2, and nothing else (no gradient, no optimizer state). The split of DeepSpeed's 18 bytes into
rows uses the estimator itself: with the optimizer offloaded it leaves the 16-bit weights (2 bytes),
with both offloaded only the gathered layer; the other 16 are shown as 4 of gradients and 12 of
optimizer states (fp32 master weights + two Adam moments), as DeepSpeed's ZeRO-2 note itemises them.
Without DeepSpeed (one GPU, or DDP) it is the Hugging Face Trainer's own layout: weights in the load
dtype, PEFT's adapters in fp32 (`autocast_adapter_dtype`), gradients in the parameter dtype (freed
before each forward unless accumulated or held by DDP) and torch AdamW's two moments in the
parameter dtype.

Activations are counted from the layer shapes: what autograd saves for the backward of one decoder
layer (RMSNorm keeps an fp32 copy of its input; sdpa keeps q, the repeated k and v, and its output;
eager keeps the fp32 softmax and its 16-bit copy, B x heads x L^2 each; SwiGLU keeps the gate, its
activation and the up projection; a LoRA projection keeps its dropout mask and the 16-bit input its
A matrix reads: under the Trainer's autocast that is a cast copy per projection, since the fp32
adapters make PEFT cast the input to fp32 first), times layers, or with gradient checkpointing the
layer inputs plus one layer recomputed in the backward. The loss holds 12 bytes per logit at the
start of the backward (fp32 log-probabilities saved by log_softmax, the incoming and the outgoing
fp32 gradient). The frozen vision tower saves nothing unless its output needs a gradient: with
gradient checkpointing `model/train.py` calls `enable_input_require_grads()`, which (transformers 5)
hooks every sub-model's input embeddings, the vision tower's patch embedding included, so the
frozen tower then keeps its checkpointed layer inputs and is back-propagated through.
The per-layer counts equal the bytes autograd actually saves (tests/test_plan.py, CPU, small shapes),
and the totals match the seven peaks measured on an H200 (benchmarks/plan_vs_measured.py) within
0.5 %, with no fitted constant.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medrega.config import Config, ModelConfig
from medrega.errors import BadInput

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Bytes per logit (tokens x vocabulary) alive when the backward starts: the fp32 log-probabilities
# log_softmax saved, nll_loss's fp32 gradient and log_softmax's fp32 gradient (ATen's cross_entropy
# = log_softmax + nll_loss on the logits transformers' ForCausalLMLoss upcast to fp32).
LOSS_BYTES_PER_LOGIT = 12
# Not planned, kept free: the CUDA context and cuBLAS workspaces (outside PyTorch's allocator), NCCL
# buffers, and the caching allocator's fragmentation (reserved above allocated). A safety margin
# for the fit decision, not fitted to any measurement; the totals themselves are allocated bytes.
RESERVE_FRACTION = 0.08
# 80 GB cards (H800, H100, A100-80GB) carry 80 GiB of HBM; CUDA sees slightly less, RESERVE_FRACTION covers it.
GPU_80GB = 80 * GIB
MAX_NODES_SEARCHED = 64


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VisionArch:
    """An InternViT tower (HF `InternVLVisionConfig` semantics)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int = 448
    patch_size: int = 14
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_type: str = "layer_norm"   # layer_norm | rms_norm
    layer_scale: bool = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        return self.num_patches + 1  # + CLS

    def _norm(self, dim: int) -> int:
        return dim if self.norm_type == "rms_norm" else 2 * dim

    def layer_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        attn = 3 * h * h + (3 * h if self.qkv_bias else 0) + h * h + h
        qk = 2 * h if self.qk_norm else 0
        mlp = h * i + i + i * h + h
        return attn + qk + mlp + 2 * self._norm(h) + (2 * h if self.layer_scale else 0)

    def params(self) -> int:
        h, p = self.hidden_size, self.patch_size
        embeddings = h + 3 * p * p * h + h + self.tokens * h  # CLS, patch conv (+bias), positions
        return embeddings + self.num_layers * self.layer_params()

    def largest_module_params(self) -> int:
        return max(self.hidden_size * self.intermediate_size + self.intermediate_size,
                   self.tokens * self.hidden_size)


@dataclass(frozen=True)
class TextArch:
    """A decoder-only LLM with grouped-query attention and a SwiGLU MLP (Qwen2, Llama)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int | None = None            # None: hidden_size // num_heads
    qkv_bias: bool = True

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @property
    def hd(self) -> int:
        return self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.hd

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of every linear a LoRA target name can select."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        weights = sum(a * b for a, b in self.projections().values())
        bias = self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0
        return weights + bias + 2 * self.hidden_size  # two RMSNorms

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size


@dataclass(frozen=True)
class Architecture:
    name: str
    vision: VisionArch
    text: TextArch
    downsample_ratio: float = 0.5
    tie_word_embeddings: bool = False
    source: str = ""

    @property
    def image_tokens(self) -> int:
        return int(self.vision.num_patches * self.downsample_ratio**2)

    @property
    def projector_in(self) -> int:
        return self.vision.hidden_size * round(1 / self.downsample_ratio) ** 2

    def parts(self) -> dict[str, int]:
        t = self.text
        llm = t.embedding_params() + t.num_layers * t.layer_params() + t.hidden_size
        projector = 2 * self.projector_in + self.projector_in * t.hidden_size + t.hidden_size \
            + t.hidden_size * t.hidden_size + t.hidden_size
        return {"vision": self.vision.params(), "projector": projector, "llm": llm,
                "lm_head": 0 if self.tie_word_embeddings else t.embedding_params()}

    @property
    def total_params(self) -> int:
        return sum(self.parts().values())

    def largest_layer_params(self) -> int:
        """The largest single module's parameters, as DeepSpeed's `model_to_params` finds it."""
        t = self.text
        return max(t.embedding_params(), *(a * b for a, b in t.projections().values()),
                   self.projector_in * t.hidden_size + t.hidden_size, self.vision.largest_module_params())

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        proj = self.text.projections()
        unknown = set(targets) - set(proj)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)} (known: {sorted(proj)})")
        return self.text.num_layers * sum(r * (proj[n][0] + proj[n][1]) for n in targets)


def _vision_from_internvit(v: Mapping[str, Any]) -> VisionArch:
    """Original InternViT keys (`intern_vit_6b` configs: qkv_bias, qk_normalization, norm_type)."""
    image = v.get("image_size", 448)
    patch = v.get("patch_size", 14)
    return VisionArch(hidden_size=v.get("hidden_size", 3200), num_layers=v.get("num_hidden_layers", 48),
                      num_heads=v.get("num_attention_heads", 25), intermediate_size=v.get("intermediate_size", 12800),
                      image_size=image[0] if isinstance(image, (list, tuple)) else image,
                      patch_size=patch[0] if isinstance(patch, (list, tuple)) else patch,
                      qkv_bias=bool(v.get("qkv_bias", False)), qk_norm=bool(v.get("qk_normalization", True)),
                      norm_type=v.get("norm_type", "rms_norm"))


def _text_from_config(cfg: Any) -> TextArch:
    model_type = getattr(cfg, "model_type", "")
    qkv_bias = True if model_type == "qwen2" else bool(getattr(cfg, "attention_bias", False))
    heads = cfg.num_attention_heads
    return TextArch(hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_heads=heads,
                    num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                    intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                    head_dim=getattr(cfg, "head_dim", None), qkv_bias=qkv_bias)


def architecture_from_config(config: str | Path | Mapping[str, Any], name: str | None = None) -> Architecture:
    """Dimensions from an InternVL `config.json` (a path, its directory, or the parsed dict).

    Hugging Face format (`model_type: internvl`, `vision_config` + `text_config`) is read through
    transformers' own `InternVLConfig`, so absent keys take its defaults; the original InternVL
    chat format (`internvl_chat`, `vision_config` + `llm_config`) through the LLM's config class.
    """
    from transformers import AutoConfig, InternVLConfig

    source = "config dict"
    if not isinstance(config, Mapping):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        source = str(path)
        config = json.loads(path.read_text())
    raw = dict(config)
    if "llm_config" in raw:  # original InternVL chat format
        llm = dict(raw["llm_config"])
        text_cfg = AutoConfig.for_model(llm.pop("model_type", "llama"), **llm)
        vision = _vision_from_internvit(raw.get("vision_config") or {})
        if raw.get("force_image_size"):
            vision = replace(vision, image_size=int(raw["force_image_size"]))
        tie = raw.get("tie_word_embeddings", getattr(text_cfg, "tie_word_embeddings", False))
        return Architecture(name or raw.get("_name_or_path") or "internvl_chat", vision, _text_from_config(text_cfg),
                            downsample_ratio=raw.get("downsample_ratio", 0.5), tie_word_embeddings=bool(tie),
                            source=source)
    cfg = InternVLConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    v = cfg.vision_config
    image = v.image_size if isinstance(v.image_size, (list, tuple)) else (v.image_size, v.image_size)
    patch = v.patch_size if isinstance(v.patch_size, (list, tuple)) else (v.patch_size, v.patch_size)
    vision = VisionArch(hidden_size=v.hidden_size, num_layers=v.num_hidden_layers, num_heads=v.num_attention_heads,
                        intermediate_size=v.intermediate_size, image_size=image[0], patch_size=patch[0],
                        qkv_bias=bool(v.attention_bias), qk_norm=bool(v.use_qk_norm), norm_type=v.norm_type)
    return Architecture(name or raw.get("_name_or_path") or "internvl", vision, _text_from_config(cfg.text_config),
                        downsample_ratio=cfg.downsample_ratio, tie_word_embeddings=bool(cfg.tie_word_embeddings),
                        source=source)


# Published architectures for the presets that have no local checkpoint (keys as model/presets.py).
# Values from the hub config.json files; see the module's tests for the sources.
_INTERNVIT_300M = VisionArch(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                             qkv_bias=True, qk_norm=False, norm_type="layer_norm")
KNOWN_ARCHITECTURES: dict[str, Architecture] = {
    # InternViT-300M-448px-V2_5 + MLP + Qwen2.5-0.5B (vocabulary with InternVL's added tokens)
    "internvl3-1b": Architecture("InternVL3-1B", _INTERNVIT_300M,
                                 TextArch(896, 24, 14, 2, 4864, 151674, qkv_bias=True), source="published"),
    # InternViT-300M-448px-V2_5 + MLP + Qwen2.5-1.5B
    "internvl3-2b": Architecture("InternVL3-2B", _INTERNVIT_300M,
                                 TextArch(1536, 28, 12, 2, 8960, 151674, qkv_bias=True), source="published"),
    # InternViT-300M-448px-V2_5 + MLP + Qwen2.5-7B
    "internvl3-8b": Architecture("InternVL3-8B", _INTERNVIT_300M,
                                 TextArch(3584, 28, 28, 4, 18944, 151674, qkv_bias=True), source="published"),
    # InternVL-Chat-V1-2: InternViT-6B-448px-V1-2 (45 layers) + MLP + Nous-Hermes-2-Yi-34B (Llama)
    "internvl-34b": Architecture("InternVL-Chat-V1-2",
                                 VisionArch(hidden_size=3200, num_layers=45, num_heads=25, intermediate_size=12800,
                                            qkv_bias=False, qk_norm=True, norm_type="rms_norm"),
                                 TextArch(7168, 60, 56, 8, 20480, 64000, qkv_bias=False), source="published"),
}


def tiny_architecture(model: ModelConfig, vocab_size: int) -> Architecture:
    """The `tiny` preset, from the model section (model/presets.py builds it the same way)."""
    vision = VisionArch(hidden_size=model.vision_hidden_size, num_layers=model.vision_layers,
                        num_heads=model.vision_heads, intermediate_size=4 * model.vision_hidden_size,
                        image_size=model.image_size, patch_size=model.patch_size)
    text = TextArch(model.text_hidden_size, model.text_layers, model.text_heads, model.text_kv_heads,
                    model.text_intermediate_size, vocab_size)
    return Architecture("tiny", vision, text, downsample_ratio=model.downsample_ratio, tie_word_embeddings=True,
                        source="params")


def resolve_architecture(model: ModelConfig, vocab_size: int | None = None) -> Architecture:
    """A local checkpoint's config.json if there is one, else the preset's published architecture."""
    checkpoint = model.checkpoint
    if checkpoint and (Path(checkpoint) / "config.json").is_file():
        arch = architecture_from_config(Path(checkpoint), name=model.preset)
    elif model.preset == "tiny":
        arch = tiny_architecture(model, vocab_size or 2000)
    elif model.preset in KNOWN_ARCHITECTURES:
        arch = KNOWN_ARCHITECTURES[model.preset]
    else:
        raise BadInput(f"no architecture for preset {model.preset!r}: give model.checkpoint as a local "
                       f"directory with config.json, or one of {sorted(KNOWN_ARCHITECTURES)}")
    if model.image_size != arch.vision.image_size and model.preset != "tiny":
        arch = replace(arch, vision=replace(arch.vision, image_size=model.image_size))
    return arch


# --------------------------------------------------------------------------------------------
# Training setup
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingSetup:
    stage: str = "tune"                    # align (projector trains) | tune
    mode: str = "lora"                     # tune: lora | full (the LLM and lm_head)
    lora_r: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_dropout: float = 0.05
    zero_stage: int | None = 3             # None or 0: no DeepSpeed
    offload_optimizer: bool = False
    offload_params: bool = False
    dtype: str = "bfloat16"                # the weights' load dtype
    amp: bool = True                       # the Trainer's bf16 autocast (only without DeepSpeed)
    per_device_batch: int = 4
    tokens_per_sample: int = 2048          # padded length of the longest batch; max_length is the worst case
    images_per_sample: int = 1
    gradient_checkpointing: bool = True
    attn_implementation: str = "sdpa"      # sdpa | eager | flash_attention_2
    gradient_accumulation: int = 1
    gpus_per_node: int = 1
    nodes: int = 1
    gpu_memory_bytes: int = GPU_80GB
    reserve_fraction: float = RESERVE_FRACTION
    padded: bool = True                    # batches carry padding (an attention mask reaches sdpa)
    vision_in_graph: bool | None = None    # None: as model/train.py (= gradient_checkpointing)
    zero_init: bool = False                # model/train.py loads the model before DeepSpeed exists

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def deepspeed(self) -> bool:
        return bool(self.zero_stage)

    @property
    def autocast(self) -> bool:
        return self.amp and not self.deepspeed

    @property
    def weight_bytes(self) -> int:
        """Bytes per weight on the GPU: DeepSpeed with bf16 enabled casts the module to 16-bit."""
        return 2 if self.deepspeed and self.amp else DTYPE_BYTES[self.dtype]

    @property
    def act_bytes(self) -> int:
        """Element size of activations: 16-bit under autocast or with 16-bit weights, else fp32."""
        return 2 if self.autocast or self.weight_bytes == 2 else 4

    def describe(self) -> str:
        what = {"align": "projector", "tune": f"LoRA r{self.lora_r}" if self.mode == "lora" else "full LLM"}[self.stage]
        zero = f"ZeRO-{self.zero_stage}" if self.deepspeed else "no DeepSpeed"
        off = [n for n, on in (("optimizer", self.offload_optimizer), ("parameters", self.offload_params)) if on]
        if off:
            zero += f" (offload {' + '.join(off)} to CPU)"
        return (f"{self.stage} ({what}, {zero}), {self.dtype}{' + autocast' if self.autocast else ''}, "
                f"batch {self.per_device_batch} x {self.tokens_per_sample} tokens per GPU"
                f"{', gradient checkpointing' if self.gradient_checkpointing else ''}, {self.attn_implementation}")


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class Lever:
    name: str
    changes: dict
    total_bytes: int
    fits: bool
    note: str = ""


@dataclass(frozen=True)
class Plan:
    architecture: Architecture
    setup: TrainingSetup
    components: tuple[Component, ...]
    total_bytes: int
    usable_bytes: int
    fits: bool
    trainable_params: int
    frozen_params: int
    min_nodes: int | None                  # fewest nodes (same GPUs per node) on which it fits
    levers: tuple[Lever, ...] = ()
    notes: tuple[str, ...] = ()
    details: dict = field(default_factory=dict)

    def component(self, name: str) -> int:
        return sum(c.bytes for c in self.components if c.name == name)


class PlanDoesNotFit(BadInput):
    """A training configuration needs more GPU memory than there is; the message names the levers."""

    def __init__(self, plan: Plan):
        self.plan = plan
        super().__init__(refusal(plan))


def trainable_params(arch: Architecture, setup: TrainingSetup) -> int:
    parts = arch.parts()
    if setup.stage == "align":
        return parts["projector"]
    if setup.mode == "full":
        return parts["llm"] + parts["lm_head"]
    if setup.mode == "lora":
        return arch.lora_params(setup.lora_r, tuple(setup.lora_targets))
    raise ValueError(f"unknown tune mode {setup.mode!r}")


def _ds_model_states(arch: Architecture, setup: TrainingSetup, trainable: int, frozen: int) -> tuple[dict, dict]:
    """Per-GPU bytes from DeepSpeed's estimators (trainable part) plus the frozen 16-bit weights."""
    gpn, nodes, world = setup.gpus_per_node, setup.nodes, setup.world
    largest = arch.largest_layer_params()
    info: dict[str, Any] = {"largest_layer_params": largest}
    if setup.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import (
            estimate_zero3_model_states_mem_needs as est,
        )

        def gpu(opt: bool, par: bool) -> int:
            return est(total_params=trainable, largest_layer_params=largest, num_gpus_per_node=gpn, num_nodes=nodes,
                       cpu_offload=opt, cpu_offload_params=par, zero_init=setup.zero_init)[1]
        all_on, opt_off, both_off = gpu(False, False), gpu(True, False), gpu(True, True)
        cpu = est(total_params=trainable, largest_layer_params=largest, num_gpus_per_node=gpn, num_nodes=nodes,
                  cpu_offload=setup.offload_optimizer or setup.offload_params, cpu_offload_params=setup.offload_params,
                  zero_init=setup.zero_init)[0]
        gathered = both_off
        params16 = 0 if setup.offload_params else opt_off - both_off
        rest = 0 if (setup.offload_optimizer or setup.offload_params) else all_on - opt_off
        frozen_bytes = 0 if setup.offload_params else math.ceil(frozen * setup.weight_bytes / world)
        info.update(estimator="estimate_zero3_model_states_mem_needs", estimator_gpu_bytes=gpu(
            setup.offload_optimizer or setup.offload_params, setup.offload_params), estimator_cpu_bytes_per_node=cpu)
        return ({"params": params16 + frozen_bytes, "grads": rest * 4 // 16, "optimizer": rest - rest * 4 // 16,
                 "gathered": gathered, "frozen": frozen_bytes, "trainable16": params16}, info)
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs as est2,
    )

    all_on = est2(total_params=trainable, num_gpus_per_node=gpn, num_nodes=nodes, cpu_offload=False)[1]
    off = est2(total_params=trainable, num_gpus_per_node=gpn, num_nodes=nodes, cpu_offload=True)[1]
    cpu = est2(total_params=trainable, num_gpus_per_node=gpn, num_nodes=nodes, cpu_offload=setup.offload_optimizer)[0]
    rest = 0 if setup.offload_optimizer else all_on - off
    grads = rest * 6 // 18
    if setup.zero_stage == 1:  # ZeRO-1 does not partition gradients: a full 16-bit copy per GPU
        grads += 2 * trainable
    info.update(estimator="estimate_zero2_model_states_mem_needs", estimator_gpu_bytes=off if setup.offload_optimizer
                else all_on, estimator_cpu_bytes_per_node=cpu)
    frozen_bytes = frozen * setup.weight_bytes
    return ({"params": off + frozen_bytes, "grads": grads, "optimizer": rest - rest * 6 // 18, "gathered": 0,
             "frozen": frozen_bytes, "trainable16": off}, info)


def _trainer_model_states(arch: Architecture, setup: TrainingSetup, trainable: int, frozen: int) -> dict:
    """The HF Trainer without DeepSpeed: weights in the load dtype, PEFT adapters in fp32, torch AdamW."""
    w = DTYPE_BYTES[setup.dtype]
    tw = 4 if (setup.stage == "tune" and setup.mode == "lora") else w
    grads = trainable * tw
    # Gradients exist from the backward to the optimizer step; they overlap the activation peak
    # (the start of the backward) only when accumulated over micro-batches or held in DDP's buckets.
    resident = setup.gradient_accumulation > 1 or setup.world > 1
    return {"params": frozen * w + trainable * tw, "grads": grads if resident else 0, "grads_full": grads,
            "optimizer": 2 * trainable * tw, "gathered": 0}


def _lora_saved_per_token(t: TextArch, setup: TrainingSetup) -> int:
    """Bytes per token one decoder layer's LoRA projections save (dropout masks, A's inputs, B's inputs)."""
    a = setup.act_bytes
    proj = t.projections()
    targets = [n for n in LORA_TARGETS if n in setup.lora_targets]
    saved = 2 * setup.lora_r * len(targets)  # lora_A's output, which lora_B saves
    cast_copy = setup.autocast  # fp32 adapters under autocast: PEFT casts to fp32, autocast back: a copy each
    shared_groups = set()
    for n in targets:
        d = proj[n][0]
        if setup.lora_dropout > 0:
            saved += d * (1 + a)  # bool mask + the dropped-out input (a copy per projection)
        elif cast_copy:
            saved += d * a
        else:  # lora_A saves the projection's own input, shared with its siblings
            group = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}.get(n, n)
            shared_groups.add((group, d))
    for group, d in shared_groups:
        # o_proj's input is the attention output, which sdpa and flash-attn already keep
        if group == "o_proj" and setup.attn_implementation != "eager":
            continue
        saved += d * a
    return saved


def llm_layer_saved(t: TextArch, setup: TrainingSetup, batch: int, length: int) -> int:
    """Bytes one decoder layer saves for the backward, at `batch` sequences of `length` tokens."""
    a = setup.act_bytes
    n = batch * length
    h, q, kv, i = t.hidden_size, t.q_dim, t.kv_dim, t.intermediate_size
    full = setup.stage == "tune" and setup.mode == "full"
    per_token = 2 * (4 * h + 4)  # two RMSNorms: fp32 copy of the input + 1/rms
    if full:
        per_token += 2 * h * a   # the normalised input, for the norm weights' gradient
    attn = setup.attn_implementation
    if attn == "flash_attention_2":
        per_token += a * (2 * q + 2 * kv) + 4 * t.num_heads  # q, k, v (kv heads), output, lse
        pairwise = 0
    elif attn == "eager":
        per_token += a * 3 * q  # q, k and v repeated to all heads
        pairwise = batch * t.num_heads * length * length * (4 + (2 if a == 2 else 0))  # fp32 softmax + 16-bit copy
    else:  # sdpa (memory-efficient kernel): q, k and v repeated (a padding mask rules out enable_gqa), output, lse
        gqa_native = not setup.padded
        per_token += a * (2 * q + (2 * kv if gqa_native else 2 * q)) + 4 * t.num_heads
        pairwise = batch * length * length * a if setup.padded else 0  # the boolean mask as an additive bias
    per_token += 3 * i * a  # SwiGLU: gate (for SiLU), SiLU(gate) and up (for the product)
    if full:
        per_token += a * (h + h + i + (q if attn == "eager" else 0))  # inputs of qkv, gate/up, down (and o)
    elif setup.stage == "tune" and setup.mode == "lora":
        per_token += _lora_saved_per_token(t, setup)
        if setup.autocast:  # autocast's 16-bit copies of the fp32 adapter weights, kept for the input gradient
            proj = t.projections()
            pairwise += 2 * setup.lora_r * sum(sum(proj[p]) for p in setup.lora_targets)
    return n * per_token + pairwise


def vision_saved(arch: Architecture, setup: TrainingSetup, images: int) -> int:
    """What the vision tower and projector keep for the backward (0 unless their output needs a gradient)."""
    a = setup.act_bytes
    v = arch.vision
    in_graph = setup.gradient_checkpointing if setup.vision_in_graph is None else setup.vision_in_graph
    tokens = images * arch.image_tokens
    projector_trains = setup.stage == "align"
    saved = 0
    if in_graph or projector_trains:
        ln = 4 if setup.autocast else a  # LayerNorm runs in fp32 under autocast
        saved += tokens * (ln * arch.projector_in + a * arch.text.hidden_size)  # LayerNorm input, GELU input
        if projector_trains:
            saved += tokens * a * (arch.projector_in + arch.text.hidden_size)  # the two linears' inputs
    if in_graph:
        if setup.gradient_checkpointing:
            saved += images * v.num_layers * v.tokens * v.hidden_size * a  # checkpointed layer inputs
        else:
            saved += images * v.num_layers * vision_layer_working(arch, setup, 1)
    return saved


def vision_layer_working(arch: Architecture, setup: TrainingSetup, images: int) -> int:
    """A vision layer's forward working set (and roughly what it would save)."""
    a = setup.act_bytes
    v = arch.vision
    t = v.tokens
    per_image = t * (a * (8 * v.hidden_size + 2 * v.intermediate_size) + 4 * v.hidden_size)
    if setup.attn_implementation == "eager":
        per_image += v.num_heads * t * t * (4 + a)
    return images * per_image


def activations(arch: Architecture, setup: TrainingSetup) -> dict[str, int]:
    """Activation bytes per GPU by phase of the step; the peak is the largest phase."""
    t = arch.text
    b, length = setup.per_device_batch, setup.tokens_per_sample
    if length < setup.images_per_sample * arch.image_tokens:
        raise ValueError(f"tokens_per_sample {length} is below the {arch.image_tokens} image tokens per image")
    n = b * length
    a = setup.act_bytes
    layer = llm_layer_saved(t, setup, b, length)
    full = setup.stage == "tune" and setup.mode == "full"
    head = n * (4 * t.hidden_size + 4) + (n * t.hidden_size * a * 2 if full else 0)  # final norm (+ lm_head input)
    if setup.gradient_checkpointing:
        llm = t.num_layers * n * t.hidden_size * a  # each layer's input
        # one layer recomputed in the backward, plus the gradients of its MLP intermediates
        recompute = layer + 3 * n * t.intermediate_size * a
    else:
        llm = t.num_layers * layer
        recompute = 0
    vis = vision_saved(arch, setup, b * setup.images_per_sample)
    loss = LOSS_BYTES_PER_LOGIT * n * t.vocab_size
    phases = {
        "loss": llm + head + vis + loss,
        "recompute": llm + vis + recompute,
        "vision_forward": vis + vision_layer_working(arch, setup, b * setup.images_per_sample),
    }
    peak_phase = max(phases, key=phases.get)
    return {"llm_saved": llm, "head_saved": head, "vision_saved": vis, "loss": loss, "recompute": recompute,
            "layer_saved": layer, "peak": phases[peak_phase], "peak_phase": peak_phase, "tokens": n, **{
                f"phase_{k}": v for k, v in phases.items()}}


def _states(arch: Architecture, setup: TrainingSetup) -> tuple[dict, dict, int, int]:
    trainable = trainable_params(arch, setup)
    frozen = arch.total_params - (trainable if setup.stage == "align" or setup.mode == "full" else 0)
    if setup.deepspeed:
        states, info = _ds_model_states(arch, setup, trainable, frozen)
    else:
        if setup.offload_optimizer or setup.offload_params:
            raise ValueError("offload needs DeepSpeed (zero_stage 2 or 3)")
        states, info = _trainer_model_states(arch, setup, trainable, frozen), {}
    return states, info, trainable, frozen


def _total(arch: Architecture, setup: TrainingSetup) -> tuple[int, list[Component], dict]:
    states, info, trainable, frozen = _states(arch, setup)
    act = activations(arch, setup)
    g = act["tokens"]
    comps = [
        Component("parameters", states["params"], _params_note(setup, trainable, frozen, states)),
        Component("gradients", states["grads"], _grads_note(setup, states)),
        Component("optimizer states", states["optimizer"], _optimizer_note(setup)),
    ]
    if states.get("gathered"):
        comps.append(Component("ZeRO-3 gathered layer", states["gathered"],
                               f"DeepSpeed: 4 B x largest layer ({_n(info['largest_layer_params'])} params)"))
    phase = act["peak_phase"]
    if phase == "vision_forward":
        comps.append(Component("activations: vision forward", act["peak"],
                               "the vision tower's forward working set (before the LLM runs)"))
    else:
        saved_note = (f"{arch.text.num_layers} layer inputs (checkpointed)" if setup.gradient_checkpointing
                      else f"{arch.text.num_layers} layers x {act['layer_saved'] / GIB:.2f} GiB saved for backward")
        comps.append(Component("activations: LLM layers", act["llm_saved"] + (act["head_saved"] if phase == "loss" else 0),
                               f"{saved_note}; {g} tokens"))
        if act["vision_saved"]:
            comps.append(Component("activations: vision + projector", act["vision_saved"], _vision_note(setup)))
        if phase == "loss":
            comps.append(Component("loss over logits", act["loss"],
                                   f"{LOSS_BYTES_PER_LOGIT} B x {g} tokens x {arch.text.vocab_size} vocab (fp32)"))
        else:
            comps.append(Component("recompute of one layer", act["recompute"],
                                   "a checkpointed layer re-run in the backward, with its MLP gradients"))
    total = sum(c.bytes for c in comps)
    if "grads_full" in states and not states["grads"]:
        end = states["params"] + states["optimizer"] + states["grads_full"]
        if end > total:  # the peak is the end of the backward: every gradient, the activations gone
            comps = [comps[0], Component("gradients", states["grads_full"], "all of them, at the end of the backward"),
                     comps[2]]
            total = end
    details = {"states": states, "estimator": info, "activations": act, "trainable": trainable, "frozen": frozen}
    return total, comps, details


def _params_note(setup: TrainingSetup, trainable: int, frozen: int, states: dict) -> str:
    if setup.deepspeed:
        if setup.offload_params:
            return "offloaded to CPU (ZeRO-3 offload_param)"
        where = f"/ {setup.world} GPUs" if setup.zero_stage == 3 else "replicated"
        return f"{8 * setup.weight_bytes}-bit: {_n(frozen)} frozen + {_n(trainable)} trainable, {where}"
    if setup.stage == "tune" and setup.mode == "lora":
        return f"{_n(frozen)} in {setup.dtype} + {_n(trainable)} LoRA in fp32"
    return f"{_n(frozen + trainable)} in {setup.dtype}, {_n(trainable)} of them trainable"


def _grads_note(setup: TrainingSetup, states: dict) -> str:
    if setup.deepspeed:
        return "offloaded" if setup.offload_optimizer or setup.offload_params else "DeepSpeed estimate (trainable only)"
    if states["grads"]:
        return "resident: accumulated or held by DDP"
    return f"freed before each forward ({states['grads_full'] / GIB:.2f} GiB at the end of the backward)"


def _optimizer_note(setup: TrainingSetup) -> str:
    if setup.deepspeed:
        return ("offloaded to CPU" if setup.offload_optimizer or setup.offload_params
                else "fp32 master + Adam moments (DeepSpeed estimate)")
    return "torch AdamW: 2 moments in the parameter dtype"


def _vision_note(setup: TrainingSetup) -> str:
    if setup.stage == "align":
        return "the trainable projector's inputs" + (" and the tower's checkpointed layer inputs"
                                                     if setup.gradient_checkpointing else "")
    return "frozen tower in the graph: enable_input_require_grads hooks its patch embedding (checkpointed inputs)"


def _n(count: int) -> str:
    """A parameter count for people: 40.07 B, 122.9 M, 12.3 k."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.{2 if unit == 'B' else 1}f} {unit}"
    return str(count)


def _fits(total: int, setup: TrainingSetup) -> tuple[bool, int]:
    usable = int(setup.gpu_memory_bytes * (1 - setup.reserve_fraction))
    return total <= usable, usable


def _min_nodes(arch: Architecture, setup: TrainingSetup) -> int | None:
    for nodes in range(1, MAX_NODES_SEARCHED + 1):
        trial = replace(setup, nodes=nodes)
        if _fits(_total(arch, trial)[0], trial)[0]:
            return nodes
        if setup.zero_stage != 3:  # only ZeRO-3 shards the weights: more nodes do not help
            return None
    return None


def _candidate_levers(arch: Architecture, setup: TrainingSetup) -> list[tuple[str, dict, str]]:
    """(name, changes, note) for each single lever that changes something."""
    out: list[tuple[str, dict, str]] = []
    if not setup.gradient_checkpointing:
        out.append(("gradient checkpointing", {"gradient_checkpointing": True}, "recomputes each layer in the backward"))
    if setup.attn_implementation == "eager":
        out.append(("sdpa attention", {"attn_implementation": "sdpa"}, "no B x heads x L^2 attention matrices"))
    if setup.zero_stage != 3 and setup.world > 1:
        out.append(("ZeRO-3", {"zero_stage": 3}, f"shards weights, gradients and optimizer over {setup.world} GPUs"))
    if not setup.offload_optimizer:
        ch = {"offload_optimizer": True}
        if not setup.deepspeed:
            ch["zero_stage"] = 3
        out.append(("offload optimizer", ch, "DeepSpeed offload_optimizer: cpu (fp32 master + Adam on the host)"))
    if not setup.offload_params:
        ch = {"offload_params": True, "offload_optimizer": True, "zero_stage": 3}
        out.append(("offload parameters", ch, "ZeRO-3 offload_param + offload_optimizer: cpu (slow)"))
    return out


def _with(setup: TrainingSetup, changes: Mapping[str, Any]) -> TrainingSetup:
    return replace(setup, **changes)


def _more_nodes(arch: Architecture, setup: TrainingSetup) -> dict | None:
    """The fewest nodes (same GPUs per node) on which the setup fits under ZeRO-3, as changes."""
    base = {} if setup.zero_stage == 3 else {"zero_stage": 3}
    for nodes in range(setup.nodes + 1, MAX_NODES_SEARCHED + 1):
        trial = _with(setup, {**base, "nodes": nodes})
        if _fits(_total(arch, trial)[0], trial)[0]:
            return {**base, "nodes": nodes}
    return None


def _smaller_batch(arch: Architecture, setup: TrainingSetup) -> dict | None:
    """The largest smaller per-device batch that fits, the global batch kept by accumulation."""
    for b in range(setup.per_device_batch - 1, 0, -1):
        if setup.per_device_batch % b:
            continue
        changes = {"per_device_batch": b,
                   "gradient_accumulation": setup.gradient_accumulation * (setup.per_device_batch // b)}
        if b == 1 or _fits(_total(arch, _with(setup, changes))[0], _with(setup, changes))[0]:
            return changes
    return None


def _levers(arch: Architecture, setup: TrainingSetup) -> list[Lever]:
    levers: list[Lever] = []

    def lever(name: str, changes: dict, note: str) -> Lever:
        trial = _with(setup, changes)
        total = _total(arch, trial)[0]
        return Lever(name, changes, total, _fits(total, trial)[0], note)

    for name, changes, note in _candidate_levers(arch, setup):
        levers.append(lever(name, changes, note))
    nodes = _more_nodes(arch, setup)
    if nodes:
        levers.append(lever("more nodes", nodes, f"{nodes['nodes']} x {setup.gpus_per_node} GPUs under ZeRO-3"))
    batch = _smaller_batch(arch, setup)
    if batch:
        levers.append(lever("smaller batch", batch, "same global batch through gradient accumulation"))
    if any(lv.fits for lv in levers):
        return levers
    # No single lever suffices: apply them one after another, cheapest first, each only if it
    # lowers the total, until the plan fits (more nodes and the batch are searched afresh each time).
    changes: dict[str, Any] = {}
    names: list[str] = []
    current = _total(arch, setup)[0]
    steps = [(name, ch) for name, ch, _ in _candidate_levers(arch, setup) if name != "offload parameters"]
    steps += [("more nodes", None), ("smaller batch", None), ("offload parameters", {
        "offload_params": True, "offload_optimizer": True, "zero_stage": 3})]
    for name, ch in steps:
        trial_setup = _with(setup, changes)
        if name == "more nodes":
            ch = _more_nodes(arch, trial_setup)
        elif name == "smaller batch":
            ch = _smaller_batch(arch, trial_setup)
        if not ch:
            continue
        trial = _with(setup, {**changes, **ch})
        total = _total(arch, trial)[0]
        if total >= current:
            continue
        changes, current = {**changes, **ch}, total
        names.append(name)
        if _fits(total, trial)[0]:
            break
    if names:
        levers.append(lever(" + ".join(names), changes, "combined"))
    return levers


def make_plan(arch: Architecture, setup: TrainingSetup, *, with_levers: bool = True) -> Plan:
    if setup.stage not in ("align", "tune"):
        raise ValueError(f"unknown stage {setup.stage!r}")
    total, comps, details = _total(arch, setup)
    fits, usable = _fits(total, setup)
    notes = []
    if setup.deepspeed and not setup.zero_init:
        load = arch.total_params * DTYPE_BYTES[setup.dtype]
        notes.append(f"host RAM while loading: each rank loads the whole model ({load / GIB:.0f} GiB in {setup.dtype}) "
                     f"before DeepSpeed partitions it (model/train.py builds TrainingArguments after from_pretrained, "
                     f"so no zero.Init): {setup.gpus_per_node * load / GIB:.0f} GiB per node")
    if setup.offload_optimizer or setup.offload_params:
        notes.append(f"host RAM for the offloaded states (DeepSpeed's estimate, per node): "
                     f"{details['estimator']['estimator_cpu_bytes_per_node'] / GIB:.0f} GiB")
    if setup.stage == "align" and not fits and not setup.deepspeed:
        notes.append("align runs in one process without DeepSpeed unless launched: levers with ZeRO-3, offload or "
                     "more GPUs need `align.launcher` (and `align.deepspeed`), as tune is launched")
    if setup.zero_stage == 3:
        notes.append("ZeRO-3 may hold up to stage3_max_live_parameters (DeepSpeed default 1e9, 2 GB in 16-bit) "
                     "gathered at once; the estimator allows 4 B x the largest layer")
    act = details["activations"]
    if setup.stage == "tune" and setup.gradient_checkpointing and act["vision_saved"]:
        notes.append("the frozen vision tower is back-propagated through: enable_input_require_grads() also hooks "
                     f"its patch embedding ({act['vision_saved'] / GIB:.2f} GiB kept, and a wasted vision backward)")
    plan = Plan(arch, setup, tuple(comps), total, usable, fits, details["trainable"], details["frozen"],
                _min_nodes(arch, setup) if with_levers else None, notes=tuple(notes), details=details)
    if with_levers and not fits:
        plan = replace(plan, levers=tuple(_levers(arch, setup)))
    return plan


def check_fits(plan: Plan) -> None:
    """Raise PlanDoesNotFit (a ValueError naming the levers that would fit) if the plan does not fit."""
    if not plan.fits:
        raise PlanDoesNotFit(plan)


def refusal(plan: Plan) -> str:
    s = plan.setup
    lines = [(f"{s.stage}: {plan.total_bytes / GIB:.1f} GiB per GPU needed, {plan.usable_bytes / GIB:.1f} GiB usable "
             f"on {s.gpu_memory_bytes / GIB:.0f} GiB GPUs ({s.describe()}).")]
    fitting = [lv for lv in plan.levers if lv.fits]
    if fitting:
        lines.append("Levers that would make it fit:")
        lines += [f"  - {lv.name}: {lv.total_bytes / GIB:.1f} GiB ({_changes(lv.changes)}; {lv.note})" for lv in fitting]
    else:
        lines.append("No lever found that makes it fit; closest:")
        best = min(plan.levers, key=lambda lv: lv.total_bytes, default=None)
        if best is not None:
            lines.append(f"  - {best.name}: {best.total_bytes / GIB:.1f} GiB ({_changes(best.changes)})")
    return "\n".join(lines)


def _changes(changes: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in changes.items())


def format_plan(plan: Plan) -> str:
    a, s = plan.architecture, plan.setup
    parts = a.parts()
    lines = [
        f"Memory plan: {s.describe()}",
        (f"Model: {a.name}: {_n(a.total_params)} parameters (vision {_n(parts['vision'])}, "
        f"projector {_n(parts['projector'])}, LLM {_n(parts['llm'] + parts['lm_head'])}); "
        f"{a.image_tokens} image tokens per image; trainable {_n(plan.trainable_params)}"),
        (f"GPUs: {s.nodes} node(s) x {s.gpus_per_node} = {s.world} x {s.gpu_memory_bytes / GIB:.0f} GiB, "
        f"{(1 - s.reserve_fraction):.0%} usable ({plan.usable_bytes / GIB:.1f} GiB)"),
        "",
        f"{'per GPU':<34}{'GiB':>8}  note",
    ]
    for c in plan.components:
        lines.append(f"{c.name:<34}{c.bytes / GIB:>8.2f}  {c.note}")
    lines.append("-" * 42)
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"{'total':<34}{plan.total_bytes / GIB:>8.2f}  {verdict} "
                 f"({plan.total_bytes / plan.usable_bytes:.0%} of usable)")
    if plan.min_nodes is not None:
        lines.append(f"Needs: {plan.min_nodes} node(s) x {s.gpus_per_node} GPU(s) "
                     f"({plan.min_nodes * s.gpus_per_node} GPUs; the setup has {s.world})")
    elif not plan.fits:
        lines.append(f"Needs: no number of nodes fits with these settings (up to {MAX_NODES_SEARCHED}"
                     f"{'' if s.zero_stage == 3 else '; only ZeRO-3 shards the weights'}); see the levers")
    for lv in plan.levers:
        lines.append(f"  lever {lv.name}: {lv.total_bytes / GIB:.1f} GiB, {'fits' if lv.fits else 'still too much'}"
                     f" ({_changes(lv.changes)})")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# From params (the pipeline's sections as load_params returns them)
# --------------------------------------------------------------------------------------------

def setups_from_config(cfg: Config, gpu_memory_bytes: int = GPU_80GB,
                       tokens_per_sample: int | None = None) -> dict[str, TrainingSetup]:
    """The align and tune setups a config describes, as the recipes run them.

    align runs in one process without DeepSpeed (tasks/align.py calls its recipe directly) unless
    `align.launcher` is set: then, like tune, under that launcher with `align.deepspeed` over
    nnodes x nproc_per_node ranks.
    """
    model, align, tune = cfg.model, cfg.align, cfg.tune
    common = {"dtype": model.dtype, "tokens_per_sample": tokens_per_sample or model.max_length,
              "attn_implementation": model.attn_implementation, "gpu_memory_bytes": gpu_memory_bytes}
    ads, alaunch = align.deepspeed, align.launcher
    align_setup = TrainingSetup(stage="align", mode="projector", zero_stage=ads.zero_stage if ads else None,
                                offload_optimizer=bool(ads and ads.offload_optimizer),
                                offload_params=bool(ads and ads.offload_params), amp=align.bf16,
                                per_device_batch=align.per_device_batch_size,
                                gradient_checkpointing=align.gradient_checkpointing,
                                gradient_accumulation=align.gradient_accumulation_steps,
                                gpus_per_node=alaunch.nproc_per_node if alaunch else 1,
                                nodes=alaunch.nnodes if alaunch else 1, **common)
    ds, launcher = tune.deepspeed, tune.launcher
    tune_setup = TrainingSetup(stage="tune", mode=tune.mode, lora_r=tune.lora.r,
                               lora_targets=tuple(tune.lora.target_modules), lora_dropout=tune.lora.dropout,
                               zero_stage=ds.zero_stage if ds else None,
                               offload_optimizer=bool(ds and ds.offload_optimizer),
                               offload_params=bool(ds and ds.offload_params),
                               amp=tune.bf16, per_device_batch=tune.per_device_batch_size,
                               gradient_checkpointing=tune.gradient_checkpointing,
                               gradient_accumulation=tune.gradient_accumulation_steps,
                               gpus_per_node=launcher.nproc_per_node, nodes=launcher.nnodes, **common)
    return {"align": align_setup, "tune": tune_setup}


def plans_for_config(cfg: Config, gpu_memory_bytes: int = GPU_80GB, arch: Architecture | None = None,
                     tokens_per_sample: int | None = None) -> dict[str, Plan]:
    """`medrega plan`: the align and tune plans of a resolved config."""
    arch = arch or resolve_architecture(cfg.model, cfg.tokenizer.vocab_size)
    return {stage: make_plan(arch, setup)
            for stage, setup in setups_from_config(cfg, gpu_memory_bytes, tokens_per_sample).items()}
