"""Import an InternVL checkpoint in its own ("remote code") layout into Hugging Face's InternVL format.

InternVL-Chat-V1-2, MedRegA's released weights and the InternVL 2.5 / 3 repositories ship
`InternVLChatModel` checkpoints that need `trust_remote_code`. The rest of the pipeline uses
transformers' own `InternVLForConditionalGeneration`; this module converts one into the other
without running any code from the checkpoint:

- config.json is translated (vision tower, projector, `downsample_ratio`, `select_layer`, image
  size, language model), defaults taken where the remote classes take them (a missing `norm_type`
  is RMSNorm, a missing `ps_version` is v1, a missing `qk_normalization` is on);
- weights are renamed and, where the layouts differ, split (the ViT's fused `qkv`, InternLM2's
  grouped `wqkv`);
- `ps_version: v1` models (InternVL 1.2, MedRegA) order image tokens column-first, where
  transformers shuffles row-first. The stock model reproduces v1 exactly on the TRANSPOSED image once
  the patch-embedding kernels and the position-embedding grid are transposed and the projector's
  input channel blocks permuted; the import does that and records `transpose_image` in the
  processor config, so every caller feeds transposed pixels (boxes stay on the original grid);
- the checkpoint's tokenizer and chat format (ChatML with its system message and separator) are
  carried over; `<img> </img> <IMG_CONTEXT> <ref> </ref> <box> </box>` are reused where the
  tokenizer has them and added (with embedding rows) only where it does not.

Tensors stream one at a time from one shard at a time into output shards (one per source shard)
whose headers are computed from the source headers before any data is read: what is resident is
the tensor being converted (and its outputs), never a whole shard or model. The destination
appears whole or not at all.
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from model.processor import CONFIG_NAME as PROCESSOR_CONFIG_NAME
from model.processor import ProcessorConfig
from medrega.errors import BadInput
from medrega.grammar import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START, REGION_TOKENS

REMOTE_ARCHITECTURE = "InternVLChatModel"
REMOTE_MODEL_TYPE = "internvl_chat"
HF_ARCHITECTURE = "InternVLForConditionalGeneration"
HF_MODEL_TYPE = "internvl"
IMPORT_RECORD = "medrega_import.json"
# Tokens the pipeline's prompts and answers need; reused when the tokenizer has them.
PIPELINE_TOKENS = (IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, *REGION_TOKENS)

# System message and turn separator of the ChatML templates InternVL registers in its
# conversation.py (OpenGVLab/InternVL, internvl_chat/internvl/conversation.py). Used only when the
# checkpoint does not ship its own conversation.py, which is read first.
KNOWN_TEMPLATES = {
    "Hermes-2": ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
                 IM_END),
    "internlm2-chat": ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
                       IM_END),
    "internvl2_5": ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
                    IM_END + "\n"),
}
CHATML_SYSTEM_TEMPLATE = IM_START + "system\n{system_message}"
CHATML_ROLES = (IM_START + "user\n", IM_START + "assistant\n")

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class CheckpointError(BadInput):
    """A checkpoint that cannot be imported; the message names the file and what was found.
    Bad input (exit 3, never retried): the same folder fails the same way every time."""


# -- layout detection --------------------------------------------------------------------------
def read_config(path: str | Path) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        found = sorted(p.name for p in Path(path).iterdir())[:12] if Path(path).is_dir() else "no such folder"
        raise CheckpointError(f"{config_file}: missing (found: {found})")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from None


def checkpoint_layout(path: str | Path) -> str:
    """'hf' for transformers' InternVL format, 'remote' for InternVL's own; anything else raises."""
    config = read_config(path)
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type == HF_MODEL_TYPE or HF_ARCHITECTURE in architectures:
        return "hf"
    if model_type == REMOTE_MODEL_TYPE or REMOTE_ARCHITECTURE in architectures:
        return "remote"
    raise CheckpointError(
        f"{Path(path) / 'config.json'}: neither an InternVL remote-layout checkpoint (model_type "
        f"{REMOTE_MODEL_TYPE!r}, {REMOTE_ARCHITECTURE}) nor a Hugging Face InternVL one (model_type "
        f"{HF_MODEL_TYPE!r}, {HF_ARCHITECTURE}); found model_type={model_type!r}, architectures={architectures}"
    )


def is_remote_layout(checkpoint: str | Path) -> bool:
    """True for a local folder in InternVL's own layout (hub ids and HF folders are False)."""
    path = Path(checkpoint)
    return path.is_dir() and checkpoint_layout(path) == "remote"


# -- config translation ------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionSpec:
    """What the weight conversion needs to know about the vision side."""
    hidden_size: int
    image_size: int            # the size images are fed at (force_image_size or the ViT's own)
    stored_grid: int           # side of the position-embedding grid stored in the checkpoint
    patch_size: int
    downsample_ratio: float
    ps_version: str
    transpose: bool            # ps_version v1: convert to the row-first model on transposed pixels

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        return int(self.grid ** 2 * self.downsample_ratio ** 2)


def vision_spec(remote: dict, source: Path) -> VisionSpec:
    vision = remote.get("vision_config") or {}
    for key in ("hidden_size", "patch_size", "image_size"):
        if key not in vision:
            raise CheckpointError(f"{source / 'config.json'}: vision_config has no {key!r}")
    ps_version = remote.get("ps_version", "v1")  # InternVLChatConfig's default; V1-2 configs omit it
    if ps_version not in ("v1", "v2"):
        raise CheckpointError(f"{source / 'config.json'}: ps_version {ps_version!r} is neither 'v1' nor 'v2'")
    ratio = float(remote.get("downsample_ratio", 0.5))
    factor = round(1 / ratio)
    if abs(factor * ratio - 1) > 1e-9:
        raise CheckpointError(f"{source / 'config.json'}: downsample_ratio {ratio} is not 1/n")
    image_size = int(remote.get("force_image_size") or vision["image_size"])
    patch = int(vision["patch_size"])
    if image_size % patch or (image_size // patch) % factor:
        raise CheckpointError(f"{source / 'config.json'}: image size {image_size} does not tile into "
                              f"{patch}-px patches in groups of {factor}")
    return VisionSpec(hidden_size=int(vision["hidden_size"]), image_size=image_size,
                      stored_grid=int(vision["image_size"]) // patch, patch_size=patch,
                      downsample_ratio=ratio, ps_version=ps_version, transpose=ps_version == "v1")


def vision_config(remote: dict, spec: VisionSpec, source: Path) -> dict:
    vision = remote["vision_config"]
    norm_type = vision.get("norm_type", "rms_norm")  # InternViT-6B: RMSNorm, and older configs omit the key
    if norm_type not in ("rms_norm", "layer_norm"):
        raise CheckpointError(f"{source / 'config.json'}: vision_config.norm_type {norm_type!r} is not supported")
    qk_norm = bool(vision.get("qk_normalization", True))  # InternVisionConfig's default
    eps = float(vision.get("layer_norm_eps", 1e-6))
    if qk_norm and eps != 1e-6:
        # transformers' InternVL builds its q/k RMSNorms with eps 1e-6 whatever the config says.
        raise CheckpointError(f"{source / 'config.json'}: qk-normalised ViT with layer_norm_eps {eps}; "
                              "transformers' InternVL can only represent 1e-6")
    if vision.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source / 'config.json'}: vision hidden_act {vision['hidden_act']!r} is not supported")
    return {
        "model_type": "internvl_vision",
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": int(vision["num_hidden_layers"]),
        "num_attention_heads": int(vision["num_attention_heads"]),
        "intermediate_size": int(vision["intermediate_size"]),
        "hidden_act": "gelu",
        "norm_type": norm_type,
        "layer_norm_eps": eps,
        "use_qk_norm": qk_norm,
        "attention_bias": bool(vision.get("qkv_bias", False)),
        "image_size": [spec.image_size, spec.image_size],
        "patch_size": [spec.patch_size, spec.patch_size],
        "num_channels": int(vision.get("num_channels", 3)),
        "layer_scale_init_value": float(vision.get("initializer_factor", 0.1)),
        "use_absolute_position_embeddings": True,
        "use_mean_pooling": True,  # InternViT has no final norm; this makes transformers' one an identity
        "use_mask_token": False,
        "attention_dropout": 0.0, "projection_dropout": 0.0, "hidden_dropout_prob": 0.0,
    }


LM_KINDS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "InternLM2ForCausalLM": "internlm2"}
_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "rope_scaling", "head_dim", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id")
_LLAMA_KEYS = ("attention_bias", "mlp_bias")
_QWEN2_KEYS = ("use_sliding_window", "sliding_window", "max_window_layers")


def lm_kind(remote: dict, source: Path) -> str:
    llm = remote.get("llm_config") or {}
    arch = (llm.get("architectures") or [None])[0]
    if arch not in LM_KINDS:
        raise CheckpointError(f"{source / 'config.json'}: llm_config architecture {arch!r} has no known key "
                              f"mapping (supported: {sorted(LM_KINDS)})")
    return LM_KINDS[arch]


def text_config(remote: dict, kind: str, vocab_size: int, eos_token_id: int, pad_token_id: int | None) -> dict:
    llm = remote["llm_config"]
    keys = _TEXT_KEYS + (_QWEN2_KEYS if kind == "qwen2" else _LLAMA_KEYS)
    out = {k: llm[k] for k in keys if llm.get(k) is not None}
    if kind == "internlm2":
        out["attention_bias"] = bool(llm.get("bias", False))  # InternLM2: bias on wqkv and wo only
        out["mlp_bias"] = False
    out.update(model_type="qwen2" if kind == "qwen2" else "llama", vocab_size=vocab_size,
               eos_token_id=eos_token_id, tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)))
    if pad_token_id is not None:
        out["pad_token_id"] = pad_token_id
    return out


# -- chat format -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatFormat:
    template: str
    system_message: str
    separator: str   # what follows <|im_end|> between turns: "" (Hermes-2, internlm2-chat) or "\n"
    source: str      # where the system message came from


def _conversation_templates(path: Path) -> dict[str, dict]:
    """Literal keyword arguments of every `...Conversation(name=...)` call, read without running the file."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except SyntaxError as err:
        raise CheckpointError(f"{path}: cannot be parsed ({err})") from None
    found = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if not func.endswith("Conversation"):
            continue
        kwargs = {}
        for kw in node.keywords:
            try:
                kwargs[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                continue  # e.g. sep_style=SeparatorStyle.MPT
        if isinstance(kwargs.get("name"), str):
            found[kwargs["name"]] = kwargs  # a later registration of the same name wins
    return found


def chat_format(source: Path, template: str | None, system_message: str | None = None) -> ChatFormat:
    """The checkpoint's ChatML format: its conversation.py first, then InternVL's published templates."""
    if not template:
        raise CheckpointError(f"{source / 'config.json'}: no 'template' (the chat template's name)")
    conversation = source / "conversation.py"
    entry, origin = None, None
    if conversation.is_file():
        entry = _conversation_templates(conversation).get(template)
        origin = str(conversation)
    if entry is not None:
        system_template = entry.get("system_template", CHATML_SYSTEM_TEMPLATE)
        roles, sep = tuple(entry.get("roles", CHATML_ROLES)), entry.get("sep")
        if system_template != CHATML_SYSTEM_TEMPLATE or roles != CHATML_ROLES or sep not in (IM_END, IM_END + "\n"):
            raise CheckpointError(f"{conversation}: template {template!r} is not ChatML (system_template="
                                  f"{system_template!r}, roles={roles}, sep={sep!r})")
        message = entry.get("system_message", "")
    elif template in KNOWN_TEMPLATES:
        message, sep = KNOWN_TEMPLATES[template]
        origin = "InternVL's published conversation.py"
    else:
        raise CheckpointError(f"{source / 'config.json'}: chat template {template!r} is not defined in "
                              f"{conversation if conversation.is_file() else 'a conversation.py (none shipped)'} "
                              f"nor among the known ChatML templates {sorted(KNOWN_TEMPLATES)}")
    if system_message is not None:
        message, origin = system_message, "given"
    return ChatFormat(template, message, sep[len(IM_END):], origin)


def chat_template_jinja(fmt: ChatFormat, prefix: str = "") -> str:
    """A Jinja chat template rendering the checkpoint's own chat format (the pipeline frames every
    prompt through it): `prefix` (a BOS the checkpoint's tokenizer prepends), the system turn (the
    checkpoint's message unless one is given), the turns, each closed by <|im_end|> + separator."""
    sep = IM_END + fmt.separator
    literal = json.dumps  # JSON string literals are valid Jinja string literals
    return (
        (f"{{{{ {literal(prefix)} }}}}" if prefix else "") +
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {literal(fmt.system_message, ensure_ascii=True)} -%}}"
        "{%- set turns = messages -%}{%- endif -%}"
        f"{{{{ {literal(IM_START + 'system' + chr(10))} + system + {literal(sep)} }}}}"
        "{%- for message in turns -%}"
        f"{{{{ {literal(IM_START)} + message['role'] + {literal(chr(10))} + message['content'] + {literal(sep)} }}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {literal(CHATML_ROLES[1])} }}}}{{%- endif -%}}"
    )


# -- tokenizer ---------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def load_source_tokenizer(source: Path):
    """The checkpoint's tokenizer as a fast tokenizer, without running any code from the checkpoint."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = source / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    custom = "AutoTokenizer" in (tok_config.get("auto_map") or {})
    has_json, has_spm = (source / "tokenizer.json").is_file(), (source / "tokenizer.model").is_file()
    if not (has_json or has_spm):
        raise CheckpointError(f"{source}: no tokenizer.json or tokenizer.model")
    if custom and has_json:
        # e.g. InternLM2Tokenizer: its fast form is the tokenizer.json; the class is remote code.
        specials = {k: v for k, v in tok_config.items()
                    if k in ("bos_token", "eos_token", "unk_token", "pad_token") and isinstance(v, str)}
        return PreTrainedTokenizerFast(tokenizer_file=str(source / "tokenizer.json"), **specials)
    if not has_json:
        try:
            import sentencepiece  # noqa: F401
        except ImportError:
            raise CheckpointError(
                f"{source / 'tokenizer.model'}: converting a SentencePiece tokenizer needs the `sentencepiece` "
                "package (not installed), or put a tokenizer.json beside it") from None
    if custom:
        # InternLM2's SentencePiece BPE read as a Llama tokenizer that never prepends a space.
        from transformers import LlamaTokenizer
        return LlamaTokenizer.from_pretrained(str(source), add_prefix_space=False, legacy=False)
    # Only the tokenizer's own files: the checkpoint's config.json names remote code (auto_map).
    with tempfile.TemporaryDirectory() as files:
        for path in source.iterdir():
            if path.is_file() and path.name in TOKENIZER_FILES:
                shutil.copy2(path, Path(files) / path.name)
        try:
            tok = AutoTokenizer.from_pretrained(files, trust_remote_code=False)
        except Exception as err:  # noqa: BLE001 (transformers raises many types for files it cannot read)
            raise CheckpointError(f"{source}: the tokenizer does not load without remote code "
                                  f"({type(err).__name__}: {err})") from None
    if not getattr(tok, "backend_tokenizer", None):
        raise CheckpointError(f"{source}: tokenizer {type(tok).__name__} has no fast (tokenizers) form")
    return tok


def carry_tokenizer(source: Path, fmt: ChatFormat):
    """(tokenizer for the imported model, tokens it had to add, prompt prefix its callers added)."""
    from transformers import PreTrainedTokenizerFast

    src = load_source_tokenizer(source)
    plain = src("x", add_special_tokens=False)["input_ids"]
    full = src("x")["input_ids"]
    prefix_ids = full[:len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []
    prefix = "".join(src.convert_ids_to_tokens(prefix_ids))
    vocab = src.get_vocab()
    missing = [t for t in PIPELINE_TOKENS if t not in vocab]
    backend = src.backend_tokenizer
    specials = {"eos_token": IM_END}  # generation ends at the template's separator token
    for name in ("bos_token", "unk_token", "pad_token"):
        value = getattr(src, name, None)
        if value:
            specials[name] = str(value)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    present = [t for t in PIPELINE_TOKENS if t in vocab and t not in (IM_END,)]
    tok.add_special_tokens({"extra_special_tokens": present + missing}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.pad_token = IM_END
    tok.padding_side = "left"
    tok.chat_template = chat_template_jinja(fmt, prefix)
    return tok, missing, prefix


# -- weight plan -------------------------------------------------------------------------------
@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[torch.Tensor], torch.Tensor]  # source tensor -> this output tensor
    source: str = ""                              # the source tensor's name


def _rows(start: int, stop: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t[start:stop]  # a view: written out before the next source tensor is read


def _block_permutation(factor: int, channels: int) -> torch.Tensor:
    """Index that reorders v1's projector input blocks (row offset, col offset) into transformers' order.

    v1 token (a, b) carries block k*f + m from patch (2b+m, 2a+k); on the transposed image the
    row-first shuffle puts that patch's features in block m'*f + k' with m' = k, k' = m.
    """
    order = [(b % factor) * factor + b // factor for b in range(factor * factor)]
    return torch.cat([torch.arange(o * channels, (o + 1) * channels) for o in order])


def _grid_positions(spec: VisionSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    def make(pos: torch.Tensor) -> torch.Tensor:
        cls, grid = pos[:, :1], pos[:, 1:]
        dim, side = grid.shape[-1], spec.stored_grid
        if side * side != grid.shape[1]:
            raise CheckpointError(f"position_embedding has {grid.shape[1]} grid entries, not {side}x{side}")
        grid = grid.reshape(1, side, side, dim)
        if side != spec.grid:  # what InternViT does on every forward, done once here
            resized = torch.nn.functional.interpolate(grid.permute(0, 3, 1, 2).float(), size=(spec.grid, spec.grid),
                                                      mode="bicubic", align_corners=False)
            grid = resized.permute(0, 2, 3, 1).to(pos.dtype)
        if spec.transpose:
            grid = grid.transpose(1, 2)
        return torch.cat([cls, grid.reshape(1, spec.grid * spec.grid, dim)], dim=1).contiguous()
    return make


def _vocab_rows(rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def make(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] >= rows:
            return t
        # New token rows start at the mean of the trained ones (a neutral, in-distribution start).
        extra = t.float().mean(dim=0, keepdim=True).to(t.dtype).expand(rows - t.shape[0], -1)
        return torch.cat([t, extra], dim=0)
    return make


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


_VISION_RENAMES = (
    ("attn.proj.", "attention.projection_layer."), ("attn.q_norm.", "attention.q_norm."),
    ("attn.k_norm.", "attention.k_norm."), ("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."),
    ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),
)
_INTERNLM2_RENAMES = (
    ("attention.wo.", "self_attn.o_proj."), ("feed_forward.w1.", "mlp.gate_proj."),
    ("feed_forward.w3.", "mlp.up_proj."), ("feed_forward.w2.", "mlp.down_proj."),
    ("attention_norm.", "input_layernorm."), ("ffn_norm.", "post_attention_layernorm."),
)


@dataclass
class PlanContext:
    spec: VisionSpec
    lm: str
    text: dict
    vocab_rows: int
    tied: bool
    source: Path
    skipped: list[str] = field(default_factory=list)


def plan_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, ctx: PlanContext, where: str) -> list[OutTensor]:
    """The output tensors one source tensor becomes (empty when it is dropped)."""
    spec = ctx.spec
    out = lambda new, new_shape=shape, make=_same: [OutTensor(new, tuple(new_shape), dtype, make)]
    if name.startswith("vision_model."):
        rest = name[len("vision_model."):]
        vt = "model.vision_tower."
        if rest == "embeddings.class_embedding":
            return out(vt + "embeddings.cls_token")
        if rest == "embeddings.position_embedding":
            return out(vt + "embeddings.position_embeddings", (1, spec.grid ** 2 + 1, shape[-1]), _grid_positions(spec))
        if rest in ("embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias"):
            make = (lambda t: t.transpose(2, 3).contiguous()) if spec.transpose and rest.endswith("weight") else _same
            return out(vt + "embeddings.patch_embeddings.projection." + rest.rsplit(".", 1)[1], shape, make)
        if rest.startswith("encoder.layers."):
            index, _, tail = rest[len("encoder.layers."):].partition(".")
            prefix = f"{vt}encoder.layer.{index}."
            if tail in ("ls1", "ls2"):
                return out(prefix + "lambda_" + tail[-1])
            if tail in ("attn.qkv.weight", "attn.qkv.bias"):
                dim, kind = shape[0] // 3, tail.rsplit(".", 1)[1]
                return [OutTensor(f"{prefix}attention.{p}_proj.{kind}", (dim, *shape[1:]), dtype, _rows(i * dim, (i + 1) * dim))
                        for i, p in enumerate("qkv")]
            for old, new in _VISION_RENAMES:
                if tail.startswith(old):
                    return out(prefix + new + tail[len(old):])
    elif name.startswith("mlp1."):
        proj = "model.multi_modal_projector."
        factor = round(1 / spec.downsample_ratio)
        permute = spec.transpose and factor > 1
        index = _block_permutation(factor, spec.hidden_size) if permute else None
        if name in ("mlp1.0.weight", "mlp1.0.bias"):
            return out(proj + "layer_norm." + name.rsplit(".", 1)[1], shape,
                       (lambda t: t[index].contiguous()) if permute else _same)
        if name == "mlp1.1.weight":
            return out(proj + "linear_1.weight", shape, (lambda t: t[:, index].contiguous()) if permute else _same)
        if name == "mlp1.1.bias":
            return out(proj + "linear_1.bias")
        if name in ("mlp1.3.weight", "mlp1.3.bias"):
            return out(proj + "linear_2." + name.rsplit(".", 1)[1])
    elif name.startswith("language_model."):
        return _plan_language(name[len("language_model."):], shape, dtype, ctx)
    raise CheckpointError(f"{where}: tensor {name!r} {list(shape)} has no known place in {HF_ARCHITECTURE}")


def _plan_language(rest: str, shape, dtype, ctx: PlanContext) -> list[OutTensor]:
    lm = "model.language_model."
    if rest.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved; recomputed from the config
        ctx.skipped.append("language_model." + rest)
        return []
    if ctx.lm == "internlm2":
        if rest == "model.tok_embeddings.weight":
            rest = "model.embed_tokens.weight"
        elif rest == "output.weight":
            rest = "lm_head.weight"
        elif ".attention.wqkv." in rest:
            return _split_wqkv(lm + rest[len("model."):], shape, dtype, ctx)
        else:
            for old, new in _INTERNLM2_RENAMES:
                rest = rest.replace("." + old, "." + new)
    if rest in ("model.embed_tokens.weight", "lm_head.weight"):
        if rest == "lm_head.weight" and ctx.tied:
            ctx.skipped.append("language_model.lm_head.weight (tied to the embeddings)")
            return []
        new = lm + "embed_tokens.weight" if rest.startswith("model.") else "lm_head.weight"
        return [OutTensor(new, (max(shape[0], ctx.vocab_rows), *shape[1:]), dtype, _vocab_rows(ctx.vocab_rows))]
    if rest.startswith("model."):
        return [OutTensor(lm + rest[len("model."):], tuple(shape), dtype, _same)]
    raise CheckpointError(f"{ctx.source}: language-model tensor 'language_model.{rest}' has no known place")


def _split_wqkv(name: str, shape, dtype, ctx: PlanContext) -> list[OutTensor]:
    """InternLM2's fused projection: per key/value head, its `groups` query heads, then the key, then the value."""
    heads, kv = ctx.text["num_attention_heads"], ctx.text.get("num_key_value_heads", ctx.text["num_attention_heads"])
    head_dim = ctx.text.get("head_dim") or ctx.text["hidden_size"] // heads
    groups = heads // kv
    kind = name.rsplit(".", 1)[1]
    if shape[0] != kv * (groups + 2) * head_dim:
        raise CheckpointError(f"{ctx.source}: {name} has {shape[0]} rows, expected {kv * (groups + 2) * head_dim}")
    base = name.replace("attention.wqkv." + kind, "self_attn.")

    def pick(slot_start: int, slot_stop: int):
        def make(t: torch.Tensor) -> torch.Tensor:
            blocks = t.reshape(kv, groups + 2, head_dim, *t.shape[1:])[:, slot_start:slot_stop]
            return blocks.reshape(-1, *t.shape[1:]).contiguous()
        return make

    rest = tuple(shape[1:])
    return [OutTensor(base + "q_proj." + kind, (heads * head_dim, *rest), dtype, pick(0, groups)),
            OutTensor(base + "k_proj." + kind, (kv * head_dim, *rest), dtype, pick(groups, groups + 1)),
            OutTensor(base + "v_proj." + kind, (kv * head_dim, *rest), dtype, pick(groups + 1, groups + 2))]


# -- reading and writing shards ----------------------------------------------------------------
def source_shards(source: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = source / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: no readable weight_map ({err})") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (source / s).is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists shard(s) not in the folder: {missing[:5]}")
            return [source / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (source / single).is_file():
            return [source / single]
    raise CheckpointError(f"{source}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


class ShardReader:
    """Tensor names, shapes and dtypes from a shard's header, and one tensor at a time on demand.

    safetensors shards are read with plain file reads into one freshly allocated tensor each (no
    memory map), so what is resident is the tensor being converted, not the shard.
    """

    def __init__(self, path: Path):
        self.path = path
        self._bin = None
        self._offsets: dict[str, tuple[int, int]] = {}
        if path.suffix == ".bin":
            self._bin = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            self.meta = {k: (tuple(v.shape), v.dtype) for k, v in self._bin.items()}
            return
        try:
            with open(path, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
        except (OSError, struct.error, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        self._data_start = 8 + length
        self.meta = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            if entry.get("dtype") not in DTYPES_BY_NAME:
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {entry.get('dtype')!r}, not one of "
                                      f"{sorted(DTYPES_BY_NAME)}")
            shape, dtype = tuple(entry["shape"]), DTYPES_BY_NAME[entry["dtype"]]
            begin, end = entry["data_offsets"]
            if end - begin != math.prod(shape) * torch.empty((), dtype=dtype).element_size():
                raise CheckpointError(f"{path}: tensor {key!r} {list(shape)} {entry['dtype']} spans {end - begin} bytes")
            self.meta[key] = (shape, dtype)
            self._offsets[key] = (begin, end)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._bin is not None:
            yield from self._bin.items()
            return
        with open(self.path, "rb") as fh:
            for key, (shape, dtype) in self.meta.items():
                begin, end = self._offsets[key]
                tensor = torch.empty(shape, dtype=dtype)
                fh.seek(self._data_start + begin)
                if end > begin and fh.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != end - begin:
                    raise CheckpointError(f"{self.path}: tensor {key!r} is cut short")
                yield key, tensor

    def close(self) -> None:
        self._bin = None


def _header(planned: list[OutTensor]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in planned:
        size = math.prod(t.shape) * torch.empty((), dtype=t.dtype).element_size()
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keeps the data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_shard(path: Path, planned: list[OutTensor], reader: ShardReader) -> int:
    """Convert one source shard into `path`, one source tensor in memory at a time; returns data bytes.

    The header comes first, computed from the plan; tensors follow in the plan's order, which is the
    order the reader yields its tensors in.
    """
    written, cursor = 0, 0
    with open(path, "wb") as fh:
        fh.write(_header(planned))
        for name, tensor in reader.tensors():
            while cursor < len(planned) and planned[cursor].source == name:
                t = planned[cursor]
                value = t.make(tensor).contiguous()
                if tuple(value.shape) != t.shape or value.dtype != t.dtype:
                    raise CheckpointError(f"{reader.path}: {name} -> {t.name} gave {list(value.shape)} {value.dtype}, "
                                          f"planned {list(t.shape)} {t.dtype}")
                if value.numel():
                    fh.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
                written += value.numel() * value.element_size()
                cursor += 1
                del value
            del tensor
        if cursor != len(planned):
            raise CheckpointError(f"{reader.path}: {planned[cursor].source} was planned but not read back")
        fh.flush()
        os.fsync(fh.fileno())
    return written


# -- the import --------------------------------------------------------------------------------
def _expected_state(config) -> dict[str, tuple[int, ...]]:
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _fingerprint(source: Path, shards: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in [source / "config.json", *shards]:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def translated_config(remote: dict, source: Path, spec, kind: str, tokenizer):
    """The Hugging Face InternVLConfig of a remote-layout config, and its text section."""
    from transformers import InternVLConfig

    vocab_rows = max(int(remote["llm_config"]["vocab_size"]), len(tokenizer))
    text = text_config(remote, kind, vocab_rows, tokenizer.convert_tokens_to_ids(IM_END), tokenizer.pad_token_id)
    config = InternVLConfig(
        vision_config=vision_config(remote, spec, source), text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT), image_seq_length=spec.num_image_tokens,
        downsample_ratio=spec.downsample_ratio, projector_hidden_act="gelu",
        vision_feature_layer=int(remote.get("select_layer", -1)), vision_feature_select_strategy="default",
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    config.architectures = [HF_ARCHITECTURE]
    return config, text, vocab_rows


def plan_shards(source: Path, shards: list[Path], ctx: "PlanContext", config) -> list[list]:
    """Every output tensor of every shard, planned from the headers before a byte is written: a
    tensor with no place, a missing or a misshapen one is an error now, not a broken folder later."""
    plans, dtypes = [], set()
    for shard in shards:
        reader = ShardReader(shard)
        planned = []
        for name, (shape, dtype) in reader.meta.items():
            for t in plan_tensor(name, shape, dtype, ctx, str(shard)):
                t.source = name
                planned.append(t)
                dtypes.add(dtype)
        reader.close()
        plans.append(planned)
    produced = {t.name: t.shape for planned in plans for t in planned}
    expected = _expected_state(config)
    missing = sorted(set(expected) - set(produced))
    extra = sorted(set(produced) - set(expected))
    wrong = sorted(k for k in set(expected) & set(produced) if expected[k] != produced[k])
    if missing or extra or wrong:
        raise CheckpointError(
            f"{source}: converted weights do not match the translated config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}, shape mismatch "
            f"{[(k, produced[k], expected[k]) for k in wrong[:5]]}")
    if len(dtypes) == 1:
        config.dtype = next(iter(dtypes))
    return plans


def write_import(tmp: Path, shards: list[Path], plans: list[list], config, tokenizer, processor) -> int:
    """The converted folder: shards written one tensor at a time, index, config, tokenizer,
    processor config. Returns the bytes of weights written."""
    written = [i for i, planned in enumerate(plans) if planned]
    names = ({written[0]: "model.safetensors"} if len(written) == 1 else
             {i: f"model-{n + 1:05d}-of-{len(written):05d}.safetensors" for n, i in enumerate(written)})
    weight_map, total = {}, 0
    for i in written:
        reader = ShardReader(shards[i])
        total += write_shard(tmp / names[i], plans[i], reader)
        reader.close()
        weight_map.update({t.name: names[i] for t in plans[i]})
    if len(written) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / PROCESSOR_CONFIG_NAME).write_text(json.dumps(asdict(processor), indent=2, ensure_ascii=False),
                                             encoding="utf-8")
    return total


def import_checkpoint(src: str | Path, dst: str | Path, *, max_length: int = 2048,
                      system_message: str | None = None, overwrite: bool = True) -> dict:
    """Convert the remote-layout checkpoint `src` into a Hugging Face InternVL folder `dst`.

    Returns (and writes to dst/medrega_import.json) what was done. An HF-format `src` is refused
    here: it loads directly. `system_message` overrides the checkpoint's own. `dst` appears whole
    or not at all (built beside it, then renamed; a failed re-import keeps the previous one).
    """
    from medrega import io

    source, target = Path(src), Path(dst)
    layout = checkpoint_layout(source)
    if layout != "remote":
        raise CheckpointError(f"{source}: already in Hugging Face InternVL format; load it directly")
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target}: exists (pass overwrite=True to replace it)")
    remote = read_config(source)
    spec, kind = vision_spec(remote, source), lm_kind(remote, source)
    fmt = chat_format(source, remote.get("template"), system_message)
    tokenizer, added, prefix = carry_tokenizer(source, fmt)
    config, text, vocab_rows = translated_config(remote, source, spec, kind, tokenizer)
    ctx = PlanContext(spec=spec, lm=kind, text=text, vocab_rows=vocab_rows, tied=text["tie_word_embeddings"],
                      source=source)
    shards = source_shards(source)
    plans = plan_shards(source, shards, ctx, config)
    summary = {
        "source": str(source.resolve()), "source_fingerprint": _fingerprint(source, shards),
        "layout": layout, "language_model": kind, "ps_version": spec.ps_version,
        "transpose_image": spec.transpose, "image_size": spec.image_size, "patch_size": spec.patch_size,
        "num_image_tokens": spec.num_image_tokens, "select_layer": config.vision_feature_layer,
        "template": fmt.template, "system_message": fmt.system_message, "system_message_from": fmt.source,
        "turn_separator": fmt.separator, "prompt_prefix": prefix, "added_tokens": added,
        "vocab_size": vocab_rows, "source_shards": len(shards), "shards": sum(1 for p in plans if p),
        "tensors": sum(len(p) for p in plans), "skipped": ctx.skipped, "warnings": [],
    }
    if remote.get("dynamic_image_size"):
        summary["warnings"].append("the source was trained with dynamic tiling; the pipeline feeds one "
                                   f"{spec.image_size}px tile per image")
    processor = ProcessorConfig(image_size=spec.image_size, num_image_tokens=spec.num_image_tokens,
                                max_length=max_length, system_prompt=fmt.system_message,
                                transpose_image=spec.transpose)
    with io.atomic_dir(target) as tmp:
        summary["bytes"] = write_import(tmp, shards, plans, config, tokenizer, processor)
        io.write_json(tmp / IMPORT_RECORD, summary)
    return summary


def ensure_hf_checkpoint(checkpoint: str, work_dir: str | Path, *, max_length: int = 2048) -> str:
    """`checkpoint` itself unless it is a local remote-layout folder; then its import under work_dir
    (reused while the source's config and shards are unchanged)."""
    if not is_remote_layout(checkpoint):
        return checkpoint
    source, target = Path(checkpoint), Path(work_dir) / "imported"
    record = target / IMPORT_RECORD
    if record.is_file():
        done = json.loads(record.read_text(encoding="utf-8"))
        if done.get("source_fingerprint") == _fingerprint(source, source_shards(source)):
            return str(target)
    import_checkpoint(source, target, max_length=max_length)
    return str(target)
