"""The memory plan (model/plan.py): against measured H200 peaks, autograd's saved tensors, the
parameter counts transformers builds, and the h800-cluster profile's 40B settings."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from medrega import config
from medrega.config import ModelConfig

from model.plan import (
    GIB,
    GPU_80GB,
    KNOWN_ARCHITECTURES,
    PlanDoesNotFit,
    TextArch,
    TrainingSetup,
    architecture_from_config,
    check_fits,
    format_plan,
    llm_layer_saved,
    make_plan,
    resolve_architecture,
    setups_from_config,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


@pytest.fixture(scope="module", autouse=True)
def _cpu_deepspeed():
    # DeepSpeed picks its accelerator at import; the estimators need no GPU.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        yield


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# Against the H200 measurements (BENCHMARKS.md, GPU training path)
# --------------------------------------------------------------------------------------------

def test_plan_within_20_percent_of_every_measured_h200_peak():
    rows = _load_script("plan_vs_measured").rows(RESULTS)
    measured = [(p.name, r) for p in sorted(RESULTS.glob("gpu_train_h200_*.json"))
                for r in json.loads(p.read_text())["runs"] if "error" not in r]
    assert len(rows) == len(measured) == 7
    for row, (name, run) in zip(rows, measured):
        assert row["measured_gib"] == run["peak_memory_gib"]  # read from the JSON, not a copy
        assert row["arch_params"] == row["json_params"], "the planned model is not the one measured"
        assert abs(row["ratio"] - 1) <= 0.20, f"{name} {run['mode']}/{run['attention']}: {row['ratio']:.3f}"


def test_plan_reproduces_the_measured_differences_between_rows():
    """Each lever the measurements isolate moves the plan by what it moved the GPU (within 10 %)."""
    rows = {(r["file"], r["mode"], r["attention"], r["gradient_checkpointing"]): r
            for r in _load_script("plan_vs_measured").rows(RESULTS)}
    b16, nodrop = "gpu_train_h200_b16.json", "gpu_train_h200_b16_nodropout.json"
    pairs = [  # (a, b): what a - b measures
        ((b16, "lora", "eager", False), (b16, "lora", "sdpa", False)),      # the attention matrices
        ((b16, "lora", "sdpa", False), (nodrop, "lora", "sdpa", False)),    # LoRA dropout masks
        ((b16, "lora", "sdpa", False), (b16, "lora", "sdpa", True)),        # gradient checkpointing
        ((b16, "full", "sdpa", True), (b16, "lora", "sdpa", True)),         # AdamW states of the LLM
    ]
    for a, b in pairs:
        planned = rows[a]["planned_gib"] - rows[b]["planned_gib"]
        measured = rows[a]["measured_gib"] - rows[b]["measured_gib"]
        assert planned == pytest.approx(measured, rel=0.10), (a, b)


# --------------------------------------------------------------------------------------------
# Parameter counts and config.json
# --------------------------------------------------------------------------------------------

def _internvl_config(vision: dict, text: dict, **top):
    from transformers import InternVLConfig, LlamaConfig, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    text_cls = LlamaConfig if text.pop("llama", False) else Qwen2Config
    return InternVLConfig(vision_config=InternVLVisionConfig(**vision).to_dict(),
                          text_config=text_cls(**text).to_dict(), **top)


CONFIGS = {
    # InternViT-300M-like + Qwen2, tied (InternVLConfig's default)
    "qwen2-tied": ({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
                        "image_size": [112, 112], "patch_size": [14, 14], "attention_bias": True},
                   {"vocab_size": 500, "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 6,
                        "num_key_value_heads": 2, "intermediate_size": 160}, {}),
    # InternViT-6B-like (RMSNorm, qk norm, no qkv bias) + Llama (no bias), untied
    "llama-untied": ({"hidden_size": 80, "num_hidden_layers": 3, "num_attention_heads": 5, "intermediate_size": 320,
                          "image_size": [56, 56], "patch_size": [14, 14], "use_qk_norm": True, "norm_type": "rms_norm"},
                     {"llama": True, "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "num_key_value_heads": 1, "intermediate_size": 192}, {"tie_word_embeddings": False}),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_counts_match_the_model_transformers_builds(name, tmp_path):
    from transformers import InternVLForConditionalGeneration

    vision, text, top = copy.deepcopy(CONFIGS[name])
    config = _internvl_config(vision, text, **top)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    arch = architecture_from_config(tmp_path)  # a checkpoint directory on disk
    parts = arch.parts()
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert parts["vision"] == count(model.model.vision_tower)
    assert parts["projector"] == count(model.model.multi_modal_projector)
    assert parts["llm"] == count(model.model.language_model)
    assert arch.total_params == count(model)  # tied weights counted once
    assert arch.image_tokens == config.image_seq_length or arch.image_tokens == (vision["image_size"][0] // 14) ** 2 // 4
    # resolve_architecture prefers a local checkpoint's config.json over the preset table
    model = ModelConfig(preset="internvl3-2b", checkpoint=str(tmp_path), image_size=arch.vision.image_size,
                        patch_size=arch.vision.patch_size)
    assert resolve_architecture(model).total_params == arch.total_params


def test_original_internvl_chat_config_format():
    """InternVL-Chat-V1-2's own config layout (vision_config + llm_config) gives the table's architecture."""
    raw = {"model_type": "internvl_chat", "downsample_ratio": 0.5, "force_image_size": 448,
           "vision_config": {"hidden_size": 3200, "num_hidden_layers": 45, "num_attention_heads": 25,
                             "intermediate_size": 12800, "image_size": 448, "patch_size": 14,
                             "qk_normalization": True, "qkv_bias": False},
           "llm_config": {"model_type": "llama", "hidden_size": 7168, "num_hidden_layers": 60,
                          "num_attention_heads": 56, "num_key_value_heads": 8, "intermediate_size": 20480,
                          "vocab_size": 64000, "attention_bias": False, "tie_word_embeddings": False}}
    arch = architecture_from_config(raw)
    known = KNOWN_ARCHITECTURES["internvl-34b"]
    assert (arch.vision, arch.text, arch.total_params) == (known.vision, known.text, known.total_params)


def test_published_architectures_have_their_advertised_sizes():
    sizes = {k: a.total_params / 1e9 for k, a in KNOWN_ARCHITECTURES.items()}
    assert 0.8 < sizes["internvl3-1b"] < 1.2
    assert 1.8 < sizes["internvl3-2b"] < 2.4
    assert 7.5 < sizes["internvl3-8b"] < 8.5
    assert 39.5 < sizes["internvl-34b"] < 40.5  # "a total of 40 billion parameters" (model card)
    assert all(a.image_tokens == 256 for a in KNOWN_ARCHITECTURES.values())


# --------------------------------------------------------------------------------------------
# Per-layer activations against what autograd saves (CPU, small shapes)
# --------------------------------------------------------------------------------------------

def _saved_bytes(num_layers: int, mode: str, attn: str) -> tuple[int, TextArch, int, int]:
    """Bytes of the distinct tensors autograd saves in one forward of a small Qwen2 (bf16 + autocast)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    t = TextArch(hidden_size=64, num_layers=num_layers, num_heads=4, num_kv_heads=2, intermediate_size=160,
                 vocab_size=300, qkv_bias=True)
    cfg = Qwen2Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                      num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, num_hidden_layers=num_layers)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.config._attn_implementation = attn
    for p in model.parameters():
        p.requires_grad = mode == "full"
    if mode == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=list(TrainingSetup().lora_targets)))
    model.train()
    batch, length = 2, 40
    ids = torch.randint(0, t.vocab_size, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 30:] = 0  # padding, as in training batches
    kwargs = {"attention_mask": mask, "labels": ids}
    if mode == "frozen":  # align: the LLM frozen, the gradient flowing through it to the inputs
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        kwargs["inputs_embeds"] = emb
    else:
        kwargs["input_ids"] = ids
    seen: dict[int, int] = {}

    def pack(x):
        seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**kwargs)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    return sum(v for k, v in seen.items() if k not in weights), t, batch, length


@pytest.mark.parametrize("mode,attn", [("lora", "sdpa"), ("lora", "eager"), ("full", "sdpa"), ("frozen", "sdpa")])
def test_one_decoder_layer_saves_what_the_plan_counts(mode, attn):
    """One more layer adds exactly the plan's per-layer bytes (CPU kernels save what CUDA's do, except
    that CPU dropout keeps a float mask where CUDA keeps a bool one, so dropout is 0 here)."""
    three, t, batch, length = _saved_bytes(3, mode, attn)
    two, *_ = _saved_bytes(2, mode, attn)
    setup = TrainingSetup(stage="align" if mode == "frozen" else "tune", mode="lora" if mode == "frozen" else mode,
                          lora_r=4, lora_dropout=0.0, zero_stage=None, dtype="bfloat16", amp=True,
                          attn_implementation=attn, gradient_checkpointing=False)
    assert three - two == llm_layer_saved(t, setup, batch, length)


# --------------------------------------------------------------------------------------------
# Refusal and levers
# --------------------------------------------------------------------------------------------

def _bench_arch():
    return _load_script("plan_vs_measured").benchmark_architecture("internvl3-2b")


def test_a_plan_that_cannot_fit_names_levers_that_do():
    arch = _bench_arch()
    setup = TrainingSetup(stage="tune", mode="lora", zero_stage=None, per_device_batch=64, tokens_per_sample=553,
                          gradient_checkpointing=False, attn_implementation="eager", gpu_memory_bytes=GPU_80GB)
    plan = make_plan(arch, setup)
    assert not plan.fits and plan.total_bytes > plan.usable_bytes
    fitting = [lv for lv in plan.levers if lv.fits]
    assert {"smaller batch"} <= {lv.name for lv in fitting}
    for lever in plan.levers:  # every lever's figure is the plan of its settings
        again = make_plan(arch, replace(setup, **lever.changes), with_levers=False)
        assert again.total_bytes == lever.total_bytes and again.fits == lever.fits
        assert lever.total_bytes < plan.total_bytes or lever.name in ("offload optimizer", "offload parameters")
    with pytest.raises(PlanDoesNotFit) as err:
        check_fits(plan)
    assert isinstance(err.value, ValueError)
    for lever in fitting:
        assert lever.name in str(err.value)
    assert "DOES NOT FIT" in format_plan(plan)
    check_fits(make_plan(arch, replace(setup, **fitting[0].changes)))  # the lever's settings pass


def test_no_single_lever_then_a_combination():
    arch = KNOWN_ARCHITECTURES["internvl-34b"]
    setup = TrainingSetup(stage="align", mode="projector", zero_stage=None, per_device_batch=4, tokens_per_sample=2048,
                          gradient_checkpointing=False, attn_implementation="flash_attention_2", amp=False)
    plan = make_plan(arch, setup)
    singles = [lv for lv in plan.levers if "+" not in lv.name]
    assert not plan.fits and not any(lv.fits for lv in singles)
    combined = [lv for lv in plan.levers if "+" in lv.name]
    assert combined and combined[-1].fits
    assert make_plan(arch, replace(setup, **combined[-1].changes)).fits


# --------------------------------------------------------------------------------------------
# The h800-cluster profile: InternVL-Chat-V1-2 (40B) on 4 nodes x 4 GPUs of 80 GB
# --------------------------------------------------------------------------------------------

def test_h800_cluster_40b_plan_on_16_gpus():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    params = config.resolve(REPO / "params.yaml", "h800-cluster")
    setups = setups_from_config(params, gpu_memory_bytes=GPU_80GB)
    tune = setups["tune"]
    assert (tune.nodes, tune.gpus_per_node, tune.zero_stage, tune.per_device_batch, tune.tokens_per_sample) == \
        (4, 4, 3, 4, 2048)
    arch = resolve_architecture(params.model)
    assert arch is KNOWN_ARCHITECTURES["internvl-34b"]
    plan = make_plan(arch, tune)
    names = [c.name for c in plan.components]
    assert names[:4] == ["parameters", "gradients", "optimizer states", "ZeRO-3 gathered layer"]
    assert plan.total_bytes == sum(c.bytes for c in plan.components)
    states = plan.details["states"]
    # ZeRO-3 shards the frozen 16-bit weights over all 16 GPUs
    assert states["frozen"] == math.ceil(2 * plan.frozen_params / 16)
    # the trainable part is DeepSpeed's own estimate, split into rows without loss
    _, gpu, largest = estimate_zero3_model_states_mem_needs(
        total_params=plan.trainable_params, largest_layer_params=arch.largest_layer_params(), num_gpus_per_node=4,
        num_nodes=4, cpu_offload=False, cpu_offload_params=False, zero_init=False)
    assert states["trainable16"] + states["grads"] + states["optimizer"] + states["gathered"] == gpu
    assert states["gathered"] == largest
    # twice the nodes: the sharded weights halve, the activations do not move
    wider = make_plan(arch, replace(tune, nodes=8), with_levers=False)
    assert wider.component("parameters") == pytest.approx(plan.component("parameters") / 2, rel=0.01)
    assert wider.component("activations: LLM layers") == plan.component("activations: LLM layers")
    assert plan.fits and plan.min_nodes is not None and plan.min_nodes <= tune.nodes
    assert plan.trainable_params == arch.lora_params(16, tune.lora_targets)
    text = format_plan(plan)
    assert "fits" in text and "ZeRO-3" in text and f"{plan.total_bytes / GIB:.2f}" in text
    # align in one process without DeepSpeed (the tiny profile's way) cannot hold 40B weights on one GPU...
    one_process = params.merged({"align": {"launcher": None, "deepspeed": None}})
    alone = make_plan(arch, setups_from_config(one_process, gpu_memory_bytes=GPU_80GB)["align"])
    assert (alone.setup.world, alone.setup.zero_stage) == (1, None)
    assert not alone.fits and alone.component("parameters") > GPU_80GB * 0.9
    assert any(lv.fits for lv in alone.levers)
    # ...so the profile launches it like tune, under ZeRO-3 on the 16 GPUs, where it fits
    align = make_plan(arch, setups["align"])
    assert (align.setup.nodes, align.setup.gpus_per_node, align.setup.zero_stage) == (4, 4, 3)
    assert align.fits and align.component("parameters") < alone.component("parameters") / 10
    assert align.trainable_params == arch.parts()["projector"]


@pytest.mark.parametrize("changes", [
    {},                                                            # the activation peak
    {"mode": "full", "per_device_batch": 1, "tokens_per_sample": 300},  # the end of the backward: all gradients
    {"mode": "full", "gradient_accumulation": 4},                  # accumulated gradients stay resident
    {"zero_stage": 2, "gpus_per_node": 4},
    {"zero_stage": 3, "gpus_per_node": 4, "offload_optimizer": True},
])
def test_total_is_the_sum_of_the_printed_components(changes):
    base = TrainingSetup(stage="tune", mode="lora", zero_stage=None, per_device_batch=8, tokens_per_sample=553)
    plan = make_plan(_bench_arch(), replace(base, **changes), with_levers=False)
    assert plan.total_bytes == sum(c.bytes for c in plan.components)
    assert all(c.bytes >= 0 for c in plan.components)
    if changes.get("tokens_per_sample") == 300:
        assert plan.component("gradients") == plan.trainable_params * 2  # bf16 gradients of the LLM


def test_align_refuses_a_plan_that_cannot_fit_before_anything_is_built(tmp_path):
    from tasks.align import align

    params = config.resolve(REPO / "params.yaml", "h800-cluster")
    # the 40B model's align on one 80 GB GPU without ZeRO: refused, with the levers that fit
    alone = params.merged({"align": {"deepspeed": None, "launcher": {"nnodes": 1, "nproc_per_node": 1}}})
    with pytest.raises(PlanDoesNotFit, match=r"(?s)align: .* GiB per GPU needed.*Levers that would make it fit"):
        align(tmp_path / "instructions", tmp_path / "align", alone)
    assert not (tmp_path / "align").exists()
