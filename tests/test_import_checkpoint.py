"""Importing InternVL remote-layout checkpoints (model/convert.py), proved on tiny replicas.

Each replica is built in a published layout (tests/internvl_replicas.py) and the imported model is
checked numerically against a reference forward written from InternVL's published architecture:
the language model as transformers' plain Llama/Qwen2 from the replica's `language_model.*`
weights (InternLM2: a decoder written in the test), the vision tower as InternViT, the projector
after InternVL's own pixel shuffle with the checkpoint's `ps_version`.
"""
from __future__ import annotations

import base64
import io
import json
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import InternVLForConditionalGeneration

from model import convert
from model.convert import (
    CheckpointError,
    checkpoint_layout,
    ensure_hf_checkpoint,
    import_checkpoint,
)
from model.processor import MedRegAProcessor
from tests.internvl_replicas import (
    HERMES2_SYSTEM,
    INTERNVL25_SYSTEM,
    LAYOUTS,
    RemoteReference,
    ReplicaSpec,
    build_replica,
    reference_pixels,
    source_tokenizer,
)

TOL = 1e-5
REPLICAS = LAYOUTS  # the published layouts, each as a tiny replica (tests/internvl_replicas.py)


def scan(width: int = 150, height: int = 90, seed: int = 0) -> Image.Image:
    """An asymmetric image: three coloured blocks of random sizes on a tinted, noisy background."""
    rng = np.random.RandomState(seed)
    image = np.zeros((height, width, 3)) + rng.rand(3) * 80
    for _ in range(3):
        y0, x0 = rng.randint(0, height - 20), rng.randint(0, width - 20)
        image[y0:y0 + rng.randint(10, height // 2), x0:x0 + rng.randint(10, width // 2)] = rng.rand(3) * 255
    return Image.fromarray(np.clip(image + rng.rand(height, width, 3) * 30, 0, 255).astype("uint8"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """name -> (replica folder, imported folder, import summary), built once for the module."""
    root = tmp_path_factory.mktemp("replicas")
    out = {}
    for name, spec in REPLICAS.items():
        src = build_replica(root / name, spec)
        dst = root / f"{name}-hf"
        out[name] = (src, dst, import_checkpoint(src, dst, max_length=1024))
    return out


def load(dst: Path):
    return InternVLForConditionalGeneration.from_pretrained(str(dst)).eval(), MedRegAProcessor.from_pretrained(dst)


# -- layouts -----------------------------------------------------------------------------------
def test_layouts_are_told_apart_and_other_folders_named(tmp_path, imported):
    src, dst, _ = imported["internvl-chat-v1-2"]
    assert checkpoint_layout(src) == "remote" and checkpoint_layout(dst) == "hf"
    other = tmp_path / "llava"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}))
    with pytest.raises(CheckpointError, match=r"llava.*config\.json.*model_type='llava'.*LlavaForConditionalGeneration"):
        checkpoint_layout(other)
    empty = tmp_path / "weights-only"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"weights-only/config\.json: missing \(found: \['model\.safetensors'\]\)"):
        import_checkpoint(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_checkpoints_keep_loading_directly(imported, tmp_path):
    _, dst, _ = imported["internvl3-qwen2"]
    assert ensure_hf_checkpoint(str(dst), tmp_path) == str(dst)
    assert ensure_hf_checkpoint("OpenGVLab/InternVL3-1B-hf", tmp_path) == "OpenGVLab/InternVL3-1B-hf"
    with pytest.raises(CheckpointError, match="already in Hugging Face InternVL format"):
        import_checkpoint(dst, tmp_path / "again")
    assert not (tmp_path / "imported").exists()


# -- the numerical proof -----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(REPLICAS))
def test_imported_model_equals_the_remote_forward(imported, name):
    src, dst, summary = imported[name]
    spec = REPLICAS[name]
    model, processor = load(dst)
    ref = RemoteReference(src)
    ref_tok = source_tokenizer(src)
    image_token = ref_tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    vision = model.config.vision_config
    # Config translation: the remote classes' defaults where the config is silent.
    assert vision.norm_type == (spec.norm_type or "rms_norm")
    assert vision.use_qk_norm is spec.qk_norm and vision.attention_bias is spec.qkv_bias
    assert list(vision.image_size) == [56, 56] and model.config.downsample_ratio == 0.5
    assert model.config.vision_feature_layer == spec.select_layer
    assert model.config.image_seq_length == processor.config.num_image_tokens == 16
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == image_token
    assert processor.config.transpose_image is (spec.ps_version in (None, "v1"))
    assert summary["shards"] == spec.shards

    # Text only: the prompt the pipeline builds is the token sequence the remote chat() builds.
    question = "What can be visualized in the region of this medical scan?"
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    text_ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert text_ids == ref_tok(ref.chat_prompt(question))["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([text_ids])).logits
    theirs = ref.logits(torch.tensor([text_ids]))
    vocab = theirs.shape[-1]
    assert (ours[..., :vocab] - theirs).abs().max().item() < TOL

    # A prompt with image tokens, on a non-square image.
    image = scan()
    ids = processor.encode_prompt("<image>\n" + question, None)
    assert ids == ref_tok(ref.chat_prompt("<image>\n" + question))["input_ids"]
    assert ids.count(image_token) == 16
    pixels = processor.pixel_values(image)[None]
    ref_pixels = reference_pixels(image, 56)[None]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels).pooler_output
        ours = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
    assert (features - ref.image_features(ref_pixels)).abs().max().item() < TOL
    theirs = ref.logits(torch.tensor([ids]), ref_pixels, image_token)
    assert (ours[..., :vocab] - theirs).abs().max().item() < TOL
    if processor.config.transpose_image:
        # The trap: the same weights on untransposed pixels (what a plain rename would feed) see
        # another image. The agreement above is the transposition's doing, not the image's symmetry.
        with torch.no_grad():
            plain = model.get_image_features(pixel_values=ref_pixels).pooler_output
        assert (plain - ref.image_features(ref_pixels)).abs().max().item() > 1e-2


def test_chat_format_and_system_message_are_the_checkpoints(imported):
    expected = {"internvl-chat-v1-2": (HERMES2_SYSTEM, "", ""), "medrega": (HERMES2_SYSTEM, "", ""),
                "internvl3-qwen2": (INTERNVL25_SYSTEM, "\n", ""), "internvl2_5-internlm2": (INTERNVL25_SYSTEM, "\n", "<s>")}
    for name, (system, separator, prefix) in expected.items():
        src, dst, summary = imported[name]
        processor = MedRegAProcessor.from_pretrained(dst)
        assert processor.config.system_prompt == system, name
        # the prompt the pipeline frames through the imported template, written out by hand
        image = "<img>" + "<IMG_CONTEXT>" * 16 + "</img>"
        assert processor.prompt("Where?", None) == (f"{prefix}<|im_start|>system\n{system}<|im_end|>{separator}"
                                                    f"<|im_start|>user\n{image}\nWhere?<|im_end|>{separator}"
                                                    "<|im_start|>assistant\n"), name
        assert summary["system_message_from"] == (str(src / "conversation.py") if REPLICAS[name].conversation_py
                                                  else "InternVL's published conversation.py")
        # The tokenizer's chat template renders what the pipeline's prompt builder writes.
        rendered = processor.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nWhere?"}],
                                                           tokenize=False, add_generation_prompt=True)
        assert rendered == processor.prompt("Where?", None).replace(
            "<img>" + "<IMG_CONTEXT>" * 16 + "</img>", "<image>")
        assert processor.tokenizer.eos_token == "<|im_end|>"


def test_missing_region_tokens_are_added_with_embedding_rows(imported):
    src, dst, summary = imported["internvl3-qwen2"]
    before = source_tokenizer(src)
    assert summary["added_tokens"] == ["<ref>", "</ref>", "<box>", "</box>"]
    model, processor = load(dst)
    tok = processor.tokenizer
    old_rows = json.loads((src / "config.json").read_text())["llm_config"]["vocab_size"]
    assert old_rows == len(before)
    assert [tok.convert_tokens_to_ids(t) for t in summary["added_tokens"]] == list(range(old_rows, old_rows + 4))
    embed = model.get_input_embeddings().weight
    assert embed.shape[0] == model.config.text_config.vocab_size == len(tok) == old_rows + 4
    assert torch.allclose(embed[old_rows:], embed[:old_rows].mean(0).expand(4, -1), atol=1e-6)
    # Tokens the tokenizer already had keep their ids.
    for t in ("<img>", "</img>", "<IMG_CONTEXT>", "<|im_end|>"):
        assert tok.convert_tokens_to_ids(t) == before.convert_tokens_to_ids(t)
    assert imported["internvl-chat-v1-2"][2]["added_tokens"] == []


# -- Text-to-Region through predict --------------------------------------------------------------
def box_tokens(n: int = 16) -> list[str]:
    rng = np.random.RandomState(7)
    out = []
    for _ in range(n):
        x1, y1 = rng.randint(0, 600, 2)
        x2, y2 = x1 + rng.randint(50, 399), y1 + rng.randint(50, 399)
        out.append(f"<ref>liver</ref><box>[[{x1}, {y1}, {x2}, {y2}]]</box>")
    return out


def test_text_to_region_box_through_predict_lands_where_the_remote_forward_puts_it(tmp_path):
    """A v1 replica whose vocabulary holds whole grounded answers, whose output head can only choose
    among them and whose token embeddings are silent, so the one greedy step of `predict` is a box
    the image chooses (random weights cannot learn the box grammar; this lets them answer in it)."""
    from model.pyfunc import MedRegAModel

    answers = box_tokens()
    spec = ReplicaSpec(ps_version="v1", answer_tokens=tuple(answers), head_rows={a: 1.0 for a in answers},
                       text_scale=0.0, seed=11)
    src = build_replica(tmp_path / "medrega-boxes", spec)
    dst = tmp_path / "medrega-boxes-hf"
    import_checkpoint(src, dst)
    ref, ref_tok = RemoteReference(src), source_tokenizer(src)
    base = "You are a helpful medical assistant. Answer with the bounding box."
    question = "Could you specify the corner points for a bounding box surrounding <ref>liver</ref>?"
    ids = ref_tok(ref.chat_prompt(f"<image>\n{base} {question}"))["input_ids"]
    image_token = ref_tok.convert_tokens_to_ids("<IMG_CONTEXT>")

    def remote_answer(image: Image.Image) -> str:
        logits = ref.logits(torch.tensor([ids]), reference_pixels(image, 56)[None], image_token)[0, -1]
        top = logits.topk(2).values
        assert top[0] - top[1] > 1e-3  # a clear choice, not a tie float rounding could break
        return ref_tok.convert_ids_to_tokens(int(logits.argmax()))

    # An image on which orientation decides the answer, so a transposition error could not pass.
    for seed in range(20):
        image = scan(160, 96, seed)
        answer = remote_answer(image)
        if answer != remote_answer(image.transpose(Image.Transpose.TRANSPOSE)):
            break
    else:
        pytest.fail("no test image whose remote answer depends on its orientation")
    assert answer in answers

    prompts = tmp_path / "base_prompts.json"
    prompts.write_text(json.dumps({"t2r": {"en": base}, "_max_new_tokens": 1}))
    served = MedRegAModel()
    served.load_context(SimpleNamespace(artifacts={"model": str(dst), "base_prompts": str(prompts)}))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    result = served.predict(None, pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()],
                                                "question": [question], "task": ["t2r"]}))
    assert result["answer"][0] == answer
    x1, y1, x2, y2 = (int(v) for v in answer.split("[[")[1].split("]]")[0].split(", "))
    width, height = image.size
    expected = [round(x1 / 999 * width, 1), round(y1 / 999 * height, 1),
                round(x2 / 999 * width, 1), round(y2 / 999 * height, 1)]
    assert json.loads(result["regions"][0]) == [{"name": "liver", "box": expected}]


# -- streaming, atomicity, other source formats -----------------------------------------------
def test_import_streams_one_source_tensor_and_one_shard_at_a_time(tmp_path, monkeypatch):
    src = build_replica(tmp_path / "v12", ReplicaSpec(shards=6))
    live, peak, open_now, peak_open = [0], [0], [0], [0]
    real_tensors = convert.ShardReader.tensors

    def counting(self):
        open_now[0] += 1
        peak_open[0] = max(peak_open[0], open_now[0])
        try:
            for name, tensor in real_tensors(self):
                live[0] += 1
                peak[0] = max(peak[0], live[0])
                weakref.finalize(tensor, lambda: live.__setitem__(0, live[0] - 1))
                yield name, tensor
        finally:
            open_now[0] -= 1

    monkeypatch.setattr(convert.ShardReader, "tensors", counting)
    summary = import_checkpoint(src, tmp_path / "out")
    assert summary["shards"] == 6
    assert peak_open[0] == 1 and peak[0] == 1 and live[0] == 0


def test_a_tensor_with_no_place_fails_naming_it_and_leaves_nothing(tmp_path):
    src = build_replica(tmp_path / "v12", ReplicaSpec())
    shard = sorted(src.glob("model-*.safetensors"))[1]
    weights = load_file(str(shard))
    weights["vision_model.encoder.layers.0.attn.rotary.weight"] = torch.zeros(2)
    save_file(weights, str(shard))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["vision_model.encoder.layers.0.attn.rotary.weight"] = shard.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor 'vision_model.encoder.layers.0.attn.rotary.weight'"):
        import_checkpoint(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v12"]


def test_a_failed_reimport_keeps_the_previous_import(tmp_path):
    src = build_replica(tmp_path / "v12", ReplicaSpec())
    dst = tmp_path / "out"
    import_checkpoint(src, dst)
    before = {p.name: p.stat().st_size for p in dst.iterdir()}
    (src / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json or tokenizer.model"):
        import_checkpoint(src, dst)
    assert {p.name: p.stat().st_size for p in dst.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "v12"]


def test_pytorch_bin_shards_import_like_safetensors(tmp_path, imported):
    src, dst, _ = imported["medrega"]
    bin_src = tmp_path / "medrega-bin"
    bin_src.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(src.glob("model-*.safetensors")):
        name = shard.name.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        tensors = load_file(str(shard))
        torch.save(tensors, bin_src / name)
        weight_map.update({k: name for k in tensors})
    (bin_src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": index["metadata"], "weight_map": weight_map}))
    for other in src.iterdir():
        if other.suffix != ".safetensors" and other.name != "model.safetensors.index.json":
            (bin_src / other.name).write_bytes(other.read_bytes())
    import_checkpoint(bin_src, tmp_path / "out")
    for shard in sorted(dst.glob("model-*.safetensors")):
        expected, got = load_file(str(shard)), load_file(str(tmp_path / "out" / shard.name))
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_ensure_hf_checkpoint_imports_once_and_again_when_the_source_changes(tmp_path):
    src = build_replica(tmp_path / "v12", ReplicaSpec(shards=2))
    work = tmp_path / "align"
    first = ensure_hf_checkpoint(str(src), work, max_length=512)
    assert first == str(work / "imported")
    assert MedRegAProcessor.from_pretrained(first).config.max_length == 512
    stamp = (work / "imported" / "medrega_import.json").stat().st_mtime_ns
    assert ensure_hf_checkpoint(str(src), work) == first
    assert (work / "imported" / "medrega_import.json").stat().st_mtime_ns == stamp
    shard = min(src.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes())  # same bytes, new mtime: the source changed on disk
    ensure_hf_checkpoint(str(src), work)
    assert (work / "imported" / "medrega_import.json").stat().st_mtime_ns != stamp


def test_unsupported_language_model_is_named(tmp_path):
    src = build_replica(tmp_path / "v12", ReplicaSpec(shards=1))
    config = json.loads((src / "config.json").read_text())
    config["llm_config"]["architectures"] = ["Phi3ForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: llm_config architecture 'Phi3ForCausalLM'"):
        import_checkpoint(src, tmp_path / "out")


def test_align_imports_a_remote_layout_checkpoint_as_its_base(tmp_path):
    from tasks.align import build_base

    src = build_replica(tmp_path / "v12", ReplicaSpec(shards=2))
    from tests.conftest import tiny

    cfg = tiny({"model": {"preset": "internvl-34b", "checkpoint": str(src), "image_size": 448, "max_length": 512}})
    base = tmp_path / "align" / "base"
    with pytest.raises(ValueError, match=r"v12/config\.json: the checkpoint takes 56px images, model\.image_size is 448"):
        build_base(cfg, tmp_path / "meta_file.json", base)
    assert not base.exists()
    cfg = cfg.merged({"model": {"image_size": 56, "system_prompt": "You are a helpful medical assistant."}})
    processor = build_base(cfg, tmp_path / "meta_file.json", base)
    saved = MedRegAProcessor.from_pretrained(base).config
    assert saved == processor.config
    assert (saved.transpose_image, saved.max_length, saved.system_prompt) == \
        (True, 512, "You are a helpful medical assistant.")
    assert processor.prompt("Where?", None).startswith("<|im_start|>system\nYou are a helpful medical assistant.<|im_end|>")
    model = InternVLForConditionalGeneration.from_pretrained(str(base))
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
