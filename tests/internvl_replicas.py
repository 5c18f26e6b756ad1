"""Tiny replicas of InternVL checkpoints in their published ("remote code") layouts, and a reference
forward pass written from the published architecture, for proving model/convert.py without downloads.

A replica has what a hub repository has: config.json with the published keys and nesting
(`InternVLChatConfig` with `vision_config` / `llm_config`), weights named as InternVL's own classes
name them (`vision_model.encoder.layers.N.attn.qkv.weight`, `mlp1.1.weight`,
`language_model.model.layers.N...`, InternLM2's `attention.wqkv`), several safetensors shards with a
`model.safetensors.index.json`, and a tokenizer with the real special tokens.

The reference never touches model/convert.py: the vision tower is InternViT as published (fused
qkv, optional qk RMSNorm, layer scales, RMSNorm or LayerNorm, class token + interpolated position
grid), the projector is `mlp1` after InternVL's `pixel_shuffle` with its `ps_version`, and the
language model is transformers' plain `LlamaForCausalLM` / `Qwen2ForCausalLM` loaded from the
replica's `language_model.*` weights (InternLM2: a small decoder written here from its published
modeling code, which reads `wqkv` as `(kv_heads, groups + 2, head_dim)`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# InternVL's conversation.py, Hermes-2 and internvl2_5 (what a replica's own conversation.py defines).
HERMES2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
INTERNVL25_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
TEMPLATES = {"Hermes-2": (HERMES2_SYSTEM, "<|im_end|>"), "internlm2-chat": (HERMES2_SYSTEM, "<|im_end|>"),
             "internvl2_5": (INTERNVL25_SYSTEM, "<|im_end|>\n")}
CORPUS = [
    "Could you specify the corner points for a bounding box surrounding the liver in this CT scan?",
    "What can be visualized in the region of this medical scan? left kidney right lung heart spleen",
    "Please locate the region and describe the condition of the lungs. 0 1 2 3 4 5 6 7 8 9 [ ] , .",
    "You are a helpful medical assistant. Answer the question using a single word or phrase.",
]


@dataclass
class ReplicaSpec:
    lm: str = "llama"                   # llama (InternVL-Chat-V1-2 / MedRegA) | qwen2 | internlm2
    ps_version: str | None = None       # None: key omitted, as in InternVL-Chat-V1-2's config
    norm_type: str | None = None        # None: key omitted (InternViT-6B: RMSNorm)
    qk_norm: bool = True
    qkv_bias: bool = False
    template: str = "Hermes-2"
    conversation_py: bool = True
    vit_image_size: int = 56            # the ViT's own size (its position grid)
    force_image_size: int | None = 56
    patch_size: int = 7
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_layers: int = 2
    select_layer: int = -1
    lm_hidden: int = 48
    lm_heads: int = 4
    lm_kv_heads: int = 2
    lm_layers: int = 2
    tie: bool = False
    vocab_pad: int = 3                  # llm_config.vocab_size beyond the tokenizer (padded vocabularies)
    missing_tokens: tuple[str, ...] = ()
    answer_tokens: tuple[str, ...] = ()  # extra (non-special) tokens appended to the vocabulary
    bos: bool = False                   # the tokenizer prepends <s> (InternLM2)
    shards: int = 3
    dynamic_image_size: bool = False
    seed: int = 0
    head_rows: dict = field(default_factory=dict)  # token -> lm_head row scale; other rows zero (predict test)
    text_scale: float = 1.0             # scales the token embeddings (0: the LM hears only the image)


# The published layouts, each as a replica (tests/test_import_checkpoint.py proves the import of
# every one; the `replica-*` profiles in params.yaml run the pipeline on two of them).
LAYOUTS = {
    # InternVL-Chat-V1-2: Nous-Hermes-2-Yi-34B (Llama), InternViT-6B with qk-norm and RMSNorm; its
    # config has neither ps_version nor norm_type, and the repo ships conversation.py.
    "internvl-chat-v1-2": ReplicaSpec(),
    # MedRegA's released weights: the same architecture, ps_version "v1" written out by the 1.2
    # fine-tune script, no conversation.py beside the weights.
    "medrega": ReplicaSpec(ps_version="v1", conversation_py=False, seed=1, shards=4),
    # InternVL 2.5 / 3 with a Qwen2 LM: InternViT-300M (LayerNorm, qkv bias, no qk-norm), ps v2, a
    # tied output head; a ViT pretrained at a smaller size (position grid interpolated), a deeper
    # feature layer, and a tokenizer without the region tokens (they are added).
    "internvl3-qwen2": ReplicaSpec(lm="qwen2", ps_version="v2", norm_type="layer_norm", qk_norm=False, qkv_bias=True,
                                   template="internvl2_5", tie=True, vit_image_size=42, select_layer=-2,
                                   missing_tokens=("<ref>", "</ref>", "<box>", "</box>"), vocab_pad=0,
                                   dynamic_image_size=True, seed=2),
    # InternVL 2.5 with an InternLM2 LM: grouped wqkv, a tokenizer that is remote code and prepends <s>.
    "internvl2_5-internlm2": ReplicaSpec(lm="internlm2", ps_version="v2", norm_type="layer_norm", qk_norm=False,
                                         qkv_bias=True, template="internvl2_5", bos=True, conversation_py=False,
                                         seed=3, shards=5),
}


def grounded_answers(n: int = 16, seed: int = 7) -> list[str]:
    """Whole grounded answers (`<ref>liver</ref><box>[[x1, y1, x2, y2]]</box>`), to be single tokens."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        x1, y1 = rng.randint(0, 600, 2)
        x2, y2 = x1 + rng.randint(50, 399), y1 + rng.randint(50, 399)
        out.append(f"<ref>liver</ref><box>[[{x1}, {y1}, {x2}, {y2}]]</box>")
    return out


def answering_in_boxes(spec: ReplicaSpec) -> ReplicaSpec:
    """`spec` whose vocabulary holds whole grounded answers, whose output head can choose only among
    them and whose token embeddings are silent: random weights cannot learn the box grammar, so this
    replica answers in it from the first token, and the image decides which box (serving tests)."""
    answers = grounded_answers()
    # an output head of its own (untied): silent embeddings would otherwise silence the head too
    return replace(spec, answer_tokens=tuple(answers), head_rows={a: 1.0 for a in answers}, text_scale=0.0, tie=False)


# -- tokenizer ---------------------------------------------------------------------------------
def build_tokenizer(folder: Path, spec: ReplicaSpec) -> Tokenizer:
    front = {"llama": ["<unk>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
             "qwen2": [], "internlm2": ["<unk>", "<s>", "</s>"]}[spec.lm]
    tail = {"llama": [], "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "internlm2": ["<|im_start|>", "<|im_end|>"]}[spec.lm]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=front, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS * 4, trainer=trainer)
    from tokenizers import AddedToken
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tail])
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in INTERNVL_TOKENS
                            if t not in spec.missing_tokens])
    if spec.answer_tokens:
        bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.answer_tokens])
    if spec.bos:
        bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    bpe.save(str(folder / "tokenizer.json"))
    config = {"llama": {"tokenizer_class": "LlamaTokenizer", "bos_token": "<|startoftext|>",
                        "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<unk>"},
              "qwen2": {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
              "internlm2": {"tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
                            "unk_token": "<unk>", "pad_token": "</s>",
                            "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}}}[spec.lm]
    config["model_max_length"] = 4096
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return bpe


def source_tokenizer(folder: Path):
    """The tokenizer as the remote code's `chat()` would use it (remote classes stood in for by tokenizer.json)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = json.loads((folder / "tokenizer_config.json").read_text())
    if "auto_map" in config:
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                       **{k: config[k] for k in ("bos_token", "eos_token", "unk_token")})
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


# -- config and weights --------------------------------------------------------------------------
def llm_config(spec: ReplicaSpec, vocab: int) -> dict:
    common = {"hidden_size": spec.lm_hidden, "intermediate_size": spec.lm_hidden * 2,
              "num_hidden_layers": spec.lm_layers, "num_attention_heads": spec.lm_heads,
              "num_key_value_heads": spec.lm_kv_heads, "max_position_embeddings": 4096, "hidden_act": "silu",
              "vocab_size": vocab, "tie_word_embeddings": spec.tie, "torch_dtype": "float32",
              "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, "use_cache": True}
    if spec.lm == "llama":  # Nous-Hermes-2-Yi-34B's shape of config
        return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
                "rope_theta": 5000000.0, "rope_scaling": None, "attention_bias": False, "pretraining_tp": 1,
                "_name_or_path": "NousResearch/Nous-Hermes-2-Yi-34B"}
    if spec.lm == "qwen2":
        return {**common, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "rope_scaling": None, "use_sliding_window": False, "sliding_window": 4096,
                "max_window_layers": spec.lm_layers, "_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}
    return {**common, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "rms_norm_eps": 1e-5,
            "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bias": False,
            "attn_implementation": "eager", "_name_or_path": "internlm/internlm2_5-7b-chat",
            "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                         "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                         "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}}


def remote_config(spec: ReplicaSpec, vocab: int) -> dict:
    vision = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "attention_dropout": 0.0,
              "drop_path_rate": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": spec.vision_hidden,
              "image_size": spec.vit_image_size, "initializer_factor": 0.1, "initializer_range": 1e-10,
              "intermediate_size": spec.vision_hidden * 2, "layer_norm_eps": 1e-6, "num_attention_heads": spec.vision_heads,
              "num_channels": 3, "num_hidden_layers": spec.vision_layers, "patch_size": spec.patch_size,
              "qk_normalization": spec.qk_norm, "qkv_bias": spec.qkv_bias, "torch_dtype": "float32",
              "use_flash_attn": True}
    if spec.norm_type is not None:
        vision["norm_type"] = spec.norm_type
    config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
              "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                           "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                           "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
              "downsample_ratio": 0.5, "dynamic_image_size": spec.dynamic_image_size,
              "force_image_size": spec.force_image_size, "llm_config": llm_config(spec, vocab),
              "max_dynamic_patch": 12, "min_dynamic_patch": 1, "pad2square": False,
              "select_layer": spec.select_layer, "template": spec.template, "torch_dtype": "float32",
              "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": spec.dynamic_image_size,
              "vision_config": vision}
    if spec.ps_version is not None:
        config["ps_version"] = spec.ps_version
    return config


def _vision_weights(spec: ReplicaSpec, g: torch.Generator) -> dict[str, torch.Tensor]:
    c, p, grid = spec.vision_hidden, spec.patch_size, spec.vit_image_size // spec.patch_size
    rnd = lambda *shape, std=0.1: torch.randn(*shape, generator=g) * std
    w = {"vision_model.embeddings.class_embedding": rnd(1, 1, c, std=0.5),
         "vision_model.embeddings.position_embedding": rnd(1, grid * grid + 1, c, std=0.5),
         "vision_model.embeddings.patch_embedding.weight": rnd(c, 3, p, p),
         "vision_model.embeddings.patch_embedding.bias": rnd(c)}
    layer_norm = spec.norm_type == "layer_norm"
    for i in range(spec.vision_layers):
        pre = f"vision_model.encoder.layers.{i}."
        w[pre + "attn.qkv.weight"] = rnd(3 * c, c, std=0.2)
        if spec.qkv_bias:
            w[pre + "attn.qkv.bias"] = rnd(3 * c)
        if spec.qk_norm:
            w[pre + "attn.q_norm.weight"] = 1 + rnd(c)
            w[pre + "attn.k_norm.weight"] = 1 + rnd(c)
        w[pre + "attn.proj.weight"], w[pre + "attn.proj.bias"] = rnd(c, c, std=0.2), rnd(c)
        w[pre + "ls1"] = 0.2 + torch.rand(c, generator=g)
        w[pre + "ls2"] = 0.2 + torch.rand(c, generator=g)
        for norm in ("norm1", "norm2"):
            w[f"{pre}{norm}.weight"] = 1 + rnd(c)
            if layer_norm:
                w[f"{pre}{norm}.bias"] = rnd(c)
        w[pre + "mlp.fc1.weight"], w[pre + "mlp.fc1.bias"] = rnd(2 * c, c, std=0.2), rnd(2 * c)
        w[pre + "mlp.fc2.weight"], w[pre + "mlp.fc2.bias"] = rnd(c, 2 * c, std=0.2), rnd(c)
    d, h = 4 * c, spec.lm_hidden
    w.update({"mlp1.0.weight": 1 + rnd(d), "mlp1.0.bias": rnd(d), "mlp1.1.weight": rnd(h, d), "mlp1.1.bias": rnd(h),
              "mlp1.3.weight": rnd(h, h, std=0.2), "mlp1.3.bias": rnd(h)})
    return w


def _language_weights(spec: ReplicaSpec, llm: dict, g: torch.Generator) -> dict[str, torch.Tensor]:
    rnd = lambda *shape, std=0.1: torch.randn(*shape, generator=g) * std
    if spec.lm == "internlm2":
        h, heads, kv = spec.lm_hidden, spec.lm_heads, spec.lm_kv_heads
        d, vocab = h // heads, llm["vocab_size"]
        w = {"language_model.model.tok_embeddings.weight": rnd(vocab, h, std=0.5),
             "language_model.model.norm.weight": 1 + rnd(h), "language_model.output.weight": rnd(vocab, h, std=0.05)}
        for i in range(spec.lm_layers):
            pre = f"language_model.model.layers.{i}."
            w[pre + "attention.wqkv.weight"] = rnd((heads + 2 * kv) * d, h, std=0.2)
            w[pre + "attention.wo.weight"] = rnd(h, heads * d, std=0.2)
            w[pre + "feed_forward.w1.weight"] = rnd(2 * h, h, std=0.2)
            w[pre + "feed_forward.w3.weight"] = rnd(2 * h, h, std=0.2)
            w[pre + "feed_forward.w2.weight"] = rnd(h, 2 * h, std=0.2)
            w[pre + "attention_norm.weight"] = 1 + rnd(h)
            w[pre + "ffn_norm.weight"] = 1 + rnd(h)
        return w
    model = plain_lm(llm)
    w = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and spec.tie:
            continue
        if key.endswith(("norm.weight", "layernorm.weight")):
            w["language_model." + key] = 1 + rnd(*value.shape)
        elif key.endswith("bias"):
            w["language_model." + key] = rnd(*value.shape)
        elif "embed_tokens" in key:  # tied: also the output head, so kept small
            w["language_model." + key] = rnd(*value.shape, std=0.1 if spec.tie else 0.5)
        elif key == "lm_head.weight":
            w["language_model." + key] = rnd(*value.shape, std=0.05)
        else:
            w["language_model." + key] = rnd(*value.shape, std=0.2)
    return w


def plain_lm(llm: dict):
    """transformers' own LlamaForCausalLM / Qwen2ForCausalLM built from an llm_config dict."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    keys = {k: v for k, v in llm.items() if k not in ("architectures", "model_type", "_name_or_path", "torch_dtype", "auto_map")}
    if llm["architectures"][0] == "Qwen2ForCausalLM":
        return Qwen2ForCausalLM(Qwen2Config(**keys)).eval()
    return LlamaForCausalLM(LlamaConfig(**keys)).eval()


def write_shards(folder: Path, weights: dict[str, torch.Tensor], shards: int) -> None:
    """Round-robin over the keys, so a layer's tensors straddle shards as they do in big checkpoints."""
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    buckets = [{} for _ in range(shards)]
    weight_map = {}
    for n, (key, value) in enumerate(sorted(weights.items())):
        buckets[n % shards][key] = value.contiguous()
        weight_map[key] = names[n % shards]
    for name, bucket in zip(names, buckets):
        save_file(bucket, str(folder / name), metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in weights.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}, indent=2))


CONVERSATION_PY = '''# the chat templates this checkpoint was trained with (InternVL's conversation.py, abridged)
import dataclasses
from enum import IntEnum, auto


class SeparatorStyle(IntEnum):
    MPT = auto()


@dataclasses.dataclass
class Conversation:
    name: str
    system_template: str = '{system_message}'
    system_message: str = ''
    roles: tuple = ('USER', 'ASSISTANT')
    sep_style: SeparatorStyle = SeparatorStyle.MPT
    sep: str = '\\n'


conv_templates = {}


def register_conv_template(template, override=False):
    conv_templates[template.name] = template


register_conv_template(
    Conversation(
        name=%(name)r,
        system_template='<|im_start|>system\\n{system_message}',
        system_message=%(system)r,
        roles=('<|im_start|>user\\n', '<|im_start|>assistant\\n'),
        sep_style=SeparatorStyle.MPT,
        sep=%(sep)r,
    )
)
'''


def build_replica(folder: Path, spec: ReplicaSpec) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder, spec)
    vocab = tok.get_vocab_size() + spec.vocab_pad
    config = remote_config(spec, vocab)
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    if spec.conversation_py:
        system, sep = TEMPLATES[spec.template]
        (folder / "conversation.py").write_text(CONVERSATION_PY % {"name": spec.template, "system": system, "sep": sep},
                                                encoding="utf-8")
    g = torch.Generator().manual_seed(spec.seed)
    weights = {**_vision_weights(spec, g), **_language_weights(spec, config["llm_config"], g)}
    if spec.head_rows:
        head = "language_model.output.weight" if spec.lm == "internlm2" else "language_model.lm_head.weight"
        rows = torch.zeros_like(weights[head])
        for token, scale in spec.head_rows.items():
            rows[tok.token_to_id(token)] = torch.randn(rows.shape[1], generator=g) * scale
        weights[head] = rows
    embed = "language_model.model.tok_embeddings.weight" if spec.lm == "internlm2" else "language_model.model.embed_tokens.weight"
    weights[embed] = weights[embed] * spec.text_scale
    write_shards(folder, weights, spec.shards)
    return folder


# -- the reference forward ---------------------------------------------------------------------
def reference_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """InternVL's build_transform: RGB, bicubic resize to size x size, ToTensor, ImageNet normalise."""
    array = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(array).permute(2, 0, 1)
    return (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RemoteReference:
    """InternVLChatModel's forward on a replica folder, from its published architecture."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.config = json.loads((folder / "config.json").read_text())
        self.w: dict[str, torch.Tensor] = {}
        for shard in sorted(folder.glob("model-*.safetensors")):
            self.w.update(load_file(str(shard)))
        self.vision = self.config["vision_config"]
        self.llm = self.config["llm_config"]
        self.ps_version = self.config.get("ps_version", "v1")
        self.image_size = self.config.get("force_image_size") or self.vision["image_size"]
        self._lm = None

    # InternViT ------------------------------------------------------------------------------
    def _norm(self, x, prefix):
        eps = self.vision["layer_norm_eps"]
        if self.vision.get("norm_type", "rms_norm") == "layer_norm":
            return F.layer_norm(x, (x.shape[-1],), self.w[prefix + ".weight"], self.w[prefix + ".bias"], eps)
        return _rms(x, self.w[prefix + ".weight"], eps)

    def vit(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states: the embeddings, then each layer's output."""
        w, v = self.w, self.vision
        p, c = v["patch_size"], v["hidden_size"]
        patches = F.conv2d(pixels, w["vision_model.embeddings.patch_embedding.weight"],
                           w["vision_model.embeddings.patch_embedding.bias"], stride=p)
        b, _, gh, gw = patches.shape
        x = torch.cat([w["vision_model.embeddings.class_embedding"].expand(b, 1, c), patches.flatten(2).transpose(1, 2)], 1)
        pos = w["vision_model.embeddings.position_embedding"]
        side = v["image_size"] // p
        grid = pos[:, 1:].float().reshape(1, side, side, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False).reshape(1, c, gh * gw).permute(0, 2, 1)
        x = x + torch.cat([pos[:, :1], grid.to(pos.dtype)], dim=1)
        heads, eps = v["num_attention_heads"], v["layer_norm_eps"]
        states = [x]
        for i in range(v["num_hidden_layers"]):
            pre = f"vision_model.encoder.layers.{i}."
            y = self._norm(x, pre + "norm1")
            n = y.shape[1]
            qkv = F.linear(y, w[pre + "attn.qkv.weight"], w.get(pre + "attn.qkv.bias"))
            q, k, val = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
            if v.get("qk_normalization", True):
                q = _rms(q.transpose(1, 2).flatten(-2), w[pre + "attn.q_norm.weight"], eps).view(b, n, heads, -1).transpose(1, 2)
                k = _rms(k.transpose(1, 2).flatten(-2), w[pre + "attn.k_norm.weight"], eps).view(b, n, heads, -1).transpose(1, 2)
            attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
            y = F.linear((attn @ val).transpose(1, 2).reshape(b, n, c), w[pre + "attn.proj.weight"], w[pre + "attn.proj.bias"])
            x = x + y * w[pre + "ls1"]
            y = self._norm(x, pre + "norm2")
            y = F.linear(F.gelu(F.linear(y, w[pre + "mlp.fc1.weight"], w[pre + "mlp.fc1.bias"])),
                         w[pre + "mlp.fc2.weight"], w[pre + "mlp.fc2.bias"])
            x = x + y * w[pre + "ls2"]
            states.append(x)
        return states

    def pixel_shuffle(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        n, w, h, c = x.shape
        x = x.reshape(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3)
        x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
        return x if self.ps_version == "v1" else x.permute(0, 2, 1, 3)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        states = self.vit(pixels)
        x = states[self.config.get("select_layer", -1)][:, 1:]
        side = math.isqrt(x.shape[1])
        x = self.pixel_shuffle(x.reshape(x.shape[0], side, side, -1), self.config["downsample_ratio"])
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        w = self.w
        x = F.layer_norm(x, (x.shape[-1],), w["mlp1.0.weight"], w["mlp1.0.bias"], 1e-5)
        x = F.gelu(F.linear(x, w["mlp1.1.weight"], w["mlp1.1.bias"]))
        return F.linear(x, w["mlp1.3.weight"], w["mlp1.3.bias"])

    # language model ------------------------------------------------------------------------
    def language_model(self):
        if self._lm is None and self.llm["architectures"][0] != "InternLM2ForCausalLM":
            lm = plain_lm(self.llm)
            state = {k[len("language_model."):]: v for k, v in self.w.items() if k.startswith("language_model.")}
            lm.load_state_dict(state, strict=not self.llm.get("tie_word_embeddings"))
            if self.llm.get("tie_word_embeddings"):
                lm.tie_weights()
            self._lm = lm
        return self._lm

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.llm["architectures"][0] == "InternLM2ForCausalLM":
            return F.embedding(ids, self.w["language_model.model.tok_embeddings.weight"])
        return self.language_model().get_input_embeddings()(ids)

    def logits_from_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        if self.llm["architectures"][0] == "InternLM2ForCausalLM":
            return self._internlm2(embeds)
        return self.language_model()(inputs_embeds=embeds).logits

    def _internlm2(self, h: torch.Tensor) -> torch.Tensor:
        w, cfg = self.w, self.llm
        heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        d, groups, eps = cfg["hidden_size"] // heads, heads // kv, cfg["rms_norm_eps"]
        b, t, _ = h.shape
        inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        angles = torch.outer(torch.arange(t, dtype=torch.float32), inv)
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        rot = lambda x: torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
        mask = torch.full((t, t), float("-inf")).triu(1)
        for i in range(cfg["num_hidden_layers"]):
            pre = f"language_model.model.layers.{i}."
            x = _rms(h, w[pre + "attention_norm.weight"], eps)
            qkv = F.linear(x, w[pre + "attention.wqkv.weight"]).reshape(b, t, kv, groups + 2, d)
            q = qkv[..., :groups, :].reshape(b, t, heads, d).transpose(1, 2)
            k, v = qkv[..., -2, :].transpose(1, 2), qkv[..., -1, :].transpose(1, 2)
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            attn = ((q @ k.transpose(-2, -1)) / math.sqrt(d) + mask).softmax(-1)
            h = h + F.linear((attn @ v).transpose(1, 2).reshape(b, t, heads * d), w[pre + "attention.wo.weight"])
            x = _rms(h, w[pre + "ffn_norm.weight"], eps)
            h = h + F.linear(F.silu(F.linear(x, w[pre + "feed_forward.w1.weight"])) * F.linear(x, w[pre + "feed_forward.w3.weight"]),
                             w[pre + "feed_forward.w2.weight"])
        return F.linear(_rms(h, w["language_model.model.norm.weight"], eps), w["language_model.output.weight"])

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, pixels: torch.Tensor | None = None, image_token_id: int | None = None) -> torch.Tensor:
        """InternVLChatModel.forward: image features written over the <IMG_CONTEXT> embeddings."""
        embeds = self.embed(ids).clone()
        if pixels is not None:
            selected = ids == image_token_id
            embeds[selected] = self.image_features(pixels).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return self.logits_from_embeds(embeds)

    # chat() --------------------------------------------------------------------------------
    def chat_prompt(self, question: str, num_patches: int = 1) -> str:
        """The query `chat()` builds with the checkpoint's template (InternVL's MPT separator style)."""
        system, sep = TEMPLATES[self.config["template"]]
        query = "<|im_start|>system\n" + system + sep
        query += "<|im_start|>user\n" + question + sep + "<|im_start|>assistant\n"
        grid = self.image_size // self.vision["patch_size"]
        tokens = int(grid * grid * self.config["downsample_ratio"] ** 2)
        return query.replace("<image>", "<img>" + "<IMG_CONTEXT>" * tokens * num_patches + "</img>", 1)


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.internvl_replicas LAYOUT DIR [--boxes]`: a replica for a `replica-*` profile."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("layout", choices=sorted(LAYOUTS))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--boxes", action="store_true", help="answer in grounded boxes (answering_in_boxes)")
    a = parser.parse_args(argv)
    spec = answering_in_boxes(LAYOUTS[a.layout]) if a.boxes else LAYOUTS[a.layout]
    print(build_replica(a.folder, spec))


if __name__ == "__main__":
    main()
