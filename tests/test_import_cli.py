"""`medrega import-checkpoint`, and checkpoints whose tokenizer is only a SentencePiece
`tokenizer.model` (InternVL-Chat-V1-2's Yi tokenizer, MedRegA's released weights, InternLM2)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from model.convert import import_checkpoint
from model.processor import MedRegAProcessor
from tests.internvl_replicas import CORPUS, INTERNVL_TOKENS, LAYOUTS, ReplicaSpec, build_replica


def test_import_checkpoint_command_converts_refuses_to_overwrite_and_names_bad_input(tmp_path):
    src = build_replica(tmp_path / "v12", ReplicaSpec(shards=2))
    dst = tmp_path / "hf"
    first = CliRunner().invoke(app, ["import-checkpoint", str(src), str(dst), "--max-length", "512"])
    assert first.exit_code == 0, first.output
    summary = json.loads(first.output)
    assert summary["layout"] == "remote" and summary["language_model"] == "llama" and summary["shards"] == 2
    assert json.loads((dst / "medrega_import.json").read_text()) == summary
    assert MedRegAProcessor.from_pretrained(dst).config.max_length == 512

    stamp = (dst / "medrega_import.json").stat().st_mtime_ns
    again = CliRunner().invoke(app, ["import-checkpoint", str(src), str(dst)])
    assert again.exit_code == 3 and "exists" in again.output
    assert (dst / "medrega_import.json").stat().st_mtime_ns == stamp  # untouched
    assert CliRunner().invoke(app, ["import-checkpoint", str(src), str(dst), "--overwrite"]).exit_code == 0

    other = tmp_path / "llava"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llava"}))
    refused = CliRunner().invoke(app, ["import-checkpoint", str(other), str(tmp_path / "x")])
    assert refused.exit_code == 3, refused.output  # bad input: exit 3, not a traceback
    assert "llava" in refused.output and "config.json" in refused.output and not (tmp_path / "x").exists()


def sentencepiece_tokenizer(folder: Path) -> "spm.SentencePieceProcessor":  # noqa: F821
    """Replace a replica's tokenizer.json by a SentencePiece BPE model trained here, in the shape
    Yi's tokenizer ships in InternVL-Chat-V1-2: ChatML turn tokens inside the SentencePiece
    vocabulary, InternVL's tokens as added tokens after it (tokenizer_config.json), no tokenizer.json."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=400, model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<|startoftext|>",
        eos_piece="<|endoftext|>", minloglevel=2)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    added = {str(400 + i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                            "single_word": False} for i, t in enumerate(INTERNVL_TOKENS)}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<unk>", "pad_token": "<unk>", "add_bos_token": False, "add_eos_token": False,
        "added_tokens_decoder": added, "model_max_length": 4096}))
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def test_a_sentencepiece_only_tokenizer_is_converted_and_encodes_as_sentencepiece_does(tmp_path):
    src = build_replica(tmp_path / "v12", LAYOUTS["internvl-chat-v1-2"])
    sp = sentencepiece_tokenizer(src)
    rows = json.loads((src / "config.json").read_text())["llm_config"]["vocab_size"]
    assert rows >= 400 + len(INTERNVL_TOKENS)  # the replica's embedding rows cover the new vocabulary
    dst = tmp_path / "hf"
    summary = import_checkpoint(src, dst, max_length=1024)
    assert summary["added_tokens"] == [] and summary["prompt_prefix"] == ""
    processor = MedRegAProcessor.from_pretrained(dst)
    tok = processor.tokenizer
    # every piece keeps its SentencePiece id; InternVL's tokens keep the ids the checkpoint gave them
    for piece in ("<unk>", "<|im_start|>", "<|im_end|>", "▁the", "iv"):
        assert tok.convert_tokens_to_ids(piece) == sp.piece_to_id(piece), piece
    for i, token in enumerate(INTERNVL_TOKENS):
        assert tok.convert_tokens_to_ids(token) == 400 + i
    for text in ("What can be visualized in the region of this medical scan?", "left kidney, 0 1 2 [ ]",
                 "肝脏 in a CT scan"):  # Chinese: no pieces for it, byte fallback as SentencePiece does
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == text
    # the pipeline's prompt frames the image and the question with the checkpoint's tokens
    ids = processor.encode_prompt("<image>\nWhere is the <ref>liver</ref>?", None)
    assert ids.count(tok.convert_tokens_to_ids("<IMG_CONTEXT>")) == processor.config.num_image_tokens
    assert ids[0] == sp.piece_to_id("<|im_start|>") and tok.convert_tokens_to_ids("<ref>") in ids
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(str(dst))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]),
                       pixel_values=torch.zeros(1, 3, processor.config.image_size, processor.config.image_size)).logits
    assert logits.shape[-1] >= len(tok) and torch.isfinite(logits).all()


@pytest.mark.parametrize("layout", ["internvl-chat-v1-2", "internvl3-qwen2"])
def test_the_replica_command_line_builds_what_the_profiles_point_at(layout, tmp_path):
    from medrega import config
    from tests.conftest import REPO
    from tests.internvl_replicas import main

    main([layout, str(tmp_path / layout), "--boxes"])
    profile = {"internvl-chat-v1-2": "replica-internvl-chat-v1-2", "internvl3-qwen2": "replica-internvl3"}[layout]
    cfg = config.resolve(REPO / "params.yaml", profile)
    assert Path(cfg.model.checkpoint).name == layout
    from model.convert import read_config, vision_spec

    assert vision_spec(read_config(tmp_path / layout), tmp_path / layout).image_size == cfg.model.image_size
