"""Evaluation data-parallel over ranks (evaluate.launcher): two torchrun CPU ranks, each a share
of the held-out batches, give answers byte-identical to one process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def random_model(stage_inputs, out: Path) -> Path:
    """A random-init tiny InternVL with the aligned model's tokenizer: its greedy answers vary
    with the item (the briefly trained one answers nearly everything alike), so identical answer
    files mean identical generation, not a constant."""
    from model.presets import build_model
    from model.processor import MedRegAProcessor

    processor = MedRegAProcessor.from_pretrained(stage_inputs["aligned"] / "model")
    model = build_model(stage_inputs["config"].model, processor.tokenizer, seed=1)
    model.resize_token_embeddings(len(processor.tokenizer))
    model.save_pretrained(str(out))
    processor.save_pretrained(out)
    return out


def test_answers_on_two_ranks_equal_one_process_byte_for_byte(stage_inputs, tmp_path):
    from tasks.evaluate import evaluate

    # three tasks, a few items each, in batches of two: rank 0 and rank 1 take alternate batches
    cfg = stage_inputs["config"].merged({"evaluate": {"tasks": ["r2t", "t2r", "caption"], "max_samples_per_task": 3,
                                                      "batch_size": 2, "max_new_tokens": 8},
                                         "register": {"gate": {"metrics": ["t2r.region_f1", "r2t.accuracy"]}}})
    model = random_model(stage_inputs, tmp_path / "model")
    one = evaluate(stage_inputs["instructions"], model, tmp_path / "one", cfg)
    ranks = cfg.merged({"evaluate": {"launcher": {"kind": "local", "nproc_per_node": 2, "backend": "gloo"}}})
    two = evaluate(stage_inputs["instructions"], model, tmp_path / "two", ranks)

    log = (tmp_path / "two" / "generate.log").read_text()
    assert "--nproc-per-node=2" in log and "-m model.recipes.generate" in log
    assert not (tmp_path / "two" / "ranks").exists()  # the ranks' files are merged, then gone
    answers = (tmp_path / "one" / "answers.jsonl").read_bytes()
    assert (tmp_path / "two" / "answers.jsonl").read_bytes() == answers
    assert two == one
    predictions = [json.loads(line)["prediction"] for line in answers.decode().splitlines()]
    assert len(predictions) >= 9 and len(set(predictions)) >= 3  # the answers depend on the item
