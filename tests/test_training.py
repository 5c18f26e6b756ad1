"""Training stages for real: projector-only alignment, LoRA under DeepSpeed ZeRO-3 on two
CPU ranks (torchrun, gloo), merging, and bad data failing loudly. Resuming after kill -9 is
tested against the uninterrupted run in tests/test_cluster.py."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medrega import config
from medrega.config import LoraConfig
from model.presets import build_model
from model.tokenizer import train_tokenizer
from model.training import apply_lora, train_only
from tests.conftest import BIN, isolated_env, tiny

pytestmark = pytest.mark.slow


def tiny_model():
    tok = train_tokenizer(["liver <ref>x</ref><box>[[1, 2, 3, 4]]</box>"] * 4, 400, 1)
    return build_model(tiny().model, tok)


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("modules,prefixes", [
    (lambda m: [m.model.multi_modal_projector], ("model.multi_modal_projector.",)),             # the align recipe
    (lambda m: [m.model.language_model, m.lm_head], ("model.language_model.", "lm_head.")),  # full tuning
])
def test_freezing_leaves_only_the_stage_trainable(modules, prefixes):
    model = tiny_model()
    train_only(model, modules(model))
    names = trainable(model)
    assert names and all(n.startswith(prefixes) for n in names)
    assert not any("vision_tower" in n for n in names)


def test_lora_touches_only_the_language_model():
    model = tiny_model()
    train_only(model, [model])  # even from a fully trainable model
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    names = trainable(peft_model)
    assert names and all("lora_" in n for n in names)
    assert all("language_model" in n for n in names), [n for n in names if "language_model" not in n]
    assert any("down_proj" in n for n in names) and not any("k_proj" in n for n in names)


def test_align_trains_the_projector_and_nothing_else(stage_inputs):
    aligned = stage_inputs["aligned"]
    last_phase = sorted((aligned / "pretrain").glob("phase-*"))[-1]
    start = load_file(str(last_phase / "model" / "model.safetensors"))
    end = load_file(str(aligned / "model" / "model.safetensors"))
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed and all("multi_modal_projector" in k for k in changed), changed
    summary = json.loads((aligned / "train_summary.json").read_text())
    assert summary["stage"] == "align" and summary["global_step"] == stage_inputs["config"].align.max_steps


def test_base_pretraining_runs_its_phases_in_order_with_their_prompt_share(stage_inputs):
    from model.data import InstructionDataset
    from model.processor import MedRegAProcessor

    pre = stage_inputs["aligned"] / "pretrain"
    phases = stage_inputs["config"].pretrain.phases
    assert sorted(p.name for p in pre.glob("phase-*")) == [f"phase-{i}" for i in range(1, len(phases) + 1)]
    for i, phase in enumerate(phases, start=1):
        summary = json.loads((pre / f"phase-{i}" / "train_summary.json").read_text())
        assert summary["stage"] == "pretrain" and summary["global_step"] == phase.max_steps
    # phase 2 trained from phase 1's weights, and changed them
    one, two = (load_file(str(pre / f"phase-{i}" / "model" / "model.safetensors")) for i in (1, 2))
    assert any(not torch.equal(one[k], two[k]) for k in one)

    processor = MedRegAProcessor.from_pretrained(pre / "phase-1" / "model")
    meta = stage_inputs["instructions"] / "meta_file.json"
    with_prompt, without, half = (InstructionDataset(meta, processor, tasks=["t2r"], base_prompt_share=share)
                                  for share in (1.0, 0.0, 0.5))
    lengths = [len(d.items[0].input_ids) for d in (with_prompt, without)]
    assert lengths[0] > lengths[1] + 50  # the T2R base prompt is long
    longer = sum(len(a.input_ids) > len(b.input_ids) for a, b in zip(half.items, without.items))
    assert 0 < longer < len(half.items)  # some records carry their prompt, some do not


def run_tune(stage_inputs, out: Path, params=None):
    from tasks.tune import tune

    return tune(stage_inputs["instructions"], stage_inputs["aligned"], out, params or stage_inputs["config"])


def test_tune_command_with_a_profile_trains_that_profile_on_every_rank(stage_inputs, tmp_path):
    """`medrega tune --profile X` resolves X once and every torchrun rank reads that resolution
    (never params.yaml): the ranks train X's step count, and the config they read is X's."""
    params = stage_inputs["config"].as_dict()
    params["profiles"] = {"longer": {"tune": {"max_steps": 5, "save_steps": 5}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    out = tmp_path / "tune"
    env = dict(isolated_env(tmp_path), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.run([str(BIN / "medrega"), "tune", "--params", str(tmp_path / "params.yaml"), "--profile", "longer",
                           "--instructions", str(stage_inputs["instructions"]), "--aligned", str(stage_inputs["aligned"]),
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert stage_inputs["config"].tune.max_steps != 5
    assert summary["global_step"] == 5 and summary["world_size"] == 2 and summary["zero_stage"] == 3
    ranks_read = config.load_resolved(out / "config.yaml")
    assert ranks_read.profile == "longer" and ranks_read.tune.max_steps == 5
    assert f"--config {out / 'config.yaml'}" in (out / "train.log").read_text()
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "model" / "model.safetensors").exists()


def test_records_longer_than_max_length_fail_loudly(stage_inputs, tmp_path):
    from model.data import DataError

    params = stage_inputs["config"].merged({"model": {"max_length": 40}})  # shorter than any prompt with its image tokens
    with pytest.raises(DataError, match="exceed max_length 40"):
        run_tune(stage_inputs, tmp_path / "tune", params)


def test_the_merged_model_keeps_the_dtype_its_base_was_saved_in(tmp_path):
    """A real base is saved in bf16: merging must not load it in float32 (twice the host memory,
    and a merged copy twice the size of its base). Only the adapted projections change."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from model.processor import MedRegAProcessor, ProcessorConfig
    from tasks.tune import merge_adapter

    model = tiny_model().to(torch.bfloat16)
    base, adapter, merged = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    model.save_pretrained(str(base))
    lora = get_peft_model(model, PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(str(adapter))
    MedRegAProcessor(train_tokenizer(["x"] * 4, 300, 1),
                     ProcessorConfig(image_size=56, num_image_tokens=4, max_length=64)).save_pretrained(adapter)
    merge_adapter(base, adapter, merged)
    out = load_file(str(merged / "model.safetensors"))
    before = load_file(str(base / "model.safetensors"))
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    moved = [k for k in before if not torch.equal(before[k], out[k])]
    assert moved and all("q_proj" in k for k in moved)
