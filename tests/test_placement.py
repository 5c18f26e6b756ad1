"""Where a model is put for evaluation, serving and `medrega predict`: the profile's dtype and
device map (model.infer.placement), each rank its own GPUs, and never silently on disk; and the
batch plan ranks share generation by."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import InternVLForConditionalGeneration

from medrega.errors import BadInput
from model.infer import Generator, Query, batches, check_placed, rank_gpus
from model.recipes.generate import MergeError, answers_file, merge
from tests.conftest import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny InternVL with its processor, saved as the pipeline saves models."""
    from model.presets import build_model
    from model.processor import MedRegAProcessor, ProcessorConfig
    from model.tokenizer import train_tokenizer

    cfg = tiny({"model": {"vision_layers": 1, "text_layers": 2}}).model
    tok = train_tokenizer(["What is <box>[[1, 2, 3, 4]]</box> here? liver spleen heart 肝脏"] * 20, 400, 1)
    processor = MedRegAProcessor(tok, ProcessorConfig(image_size=cfg.image_size, num_image_tokens=cfg.num_image_tokens,
                                                      max_length=cfg.max_length))
    model = build_model(cfg, tok, seed=0)
    model.resize_token_embeddings(len(tok))
    out = tmp_path_factory.mktemp("placed") / "model"
    model.save_pretrained(str(out))
    processor.save_pretrained(out)
    return out


def queries() -> list[Query]:
    rng = np.random.default_rng(1)
    return [Query(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), q)
            for q in ("liver?", "What is <box>[[10, 20, 300, 400]]</box> here?", "肝脏")]


def test_each_rank_of_a_node_gets_its_own_gpus():
    assert [rank_gpus(4, r, 4, spread=False) for r in range(4)] == [[0], [1], [2], [3]]
    # device_map auto: the node's GPUs shared out, contiguously (h800-cluster: 2 ranks x 2 GPUs)
    assert [rank_gpus(4, r, 2, spread=True) for r in range(2)] == [[0, 1], [2, 3]]
    assert [rank_gpus(8, r, 1, spread=True) for r in range(1)] == [list(range(8))]
    assert [rank_gpus(5, r, 2, spread=True) for r in range(2)] == [[0, 1], [2, 3]]  # one GPU left idle
    with pytest.raises(BadInput, match="3 ranks on a node with 2 GPU"):
        rank_gpus(2, 0, 3, spread=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule")
def test_on_cpu_the_model_loads_in_float32_whatever_the_profile_says(model_dir):
    generator = Generator.from_pretrained(model_dir, "bfloat16", None)
    assert generator.model.dtype == torch.float32
    assert getattr(generator.model, "hf_device_map", None) is None


def test_device_map_auto_places_through_accelerate_and_answers_the_same(model_dir):
    plain = Generator.from_pretrained(model_dir)
    spread = Generator.from_pretrained(model_dir, "float32", "auto")
    # one device: accelerate's plan puts everything there, so transformers loads it there undispatched
    assert {p.device.type for p in spread.model.parameters()} == {"cuda" if torch.cuda.is_available() else "cpu"}
    assert spread.generate(queries(), batch_size=2, max_new_tokens=6) == plain.generate(queries(), max_new_tokens=6)


def test_a_model_placed_partly_on_disk_is_refused(model_dir, tmp_path):
    # what accelerate does when the devices are too small: offload to disk (generation would crawl)
    model = InternVLForConditionalGeneration.from_pretrained(str(model_dir), device_map="auto",
                                                             max_memory={"cpu": 300_000},
                                                             offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(model.hf_device_map.values())
    with pytest.raises(BadInput, match=r"somewhere: the model does not fit .*disk"):
        check_placed(model, "somewhere")


def test_the_served_model_places_itself_per_its_model_config_and_the_loaders(model_dir, tmp_path):
    from model.pyfunc import MedRegAModel
    from model.serve import load
    from tasks.register import CODE_PATHS

    prompts = tmp_path / "base_prompts.json"
    prompts.write_text(json.dumps({"t2r": {"en": "Find it."}, "_max_new_tokens": 4}))
    folder = tmp_path / "pyfunc"
    # logged as register logs it: the training profile's placement
    mlflow.pyfunc.save_model(str(folder), python_model=MedRegAModel(), code_paths=[str(p) for p in CODE_PATHS],
                             artifacts={"model": str(model_dir), "base_prompts": str(prompts)},
                             model_config={"dtype": "float32", "device_map": "auto"}, pip_requirements=["torch"])
    logged = load(str(folder))
    assert logged.placement == {"dtype": "float32", "device_map": "auto"}
    overridden = load(str(folder), {"dtype": "bfloat16", "device_map": None})  # the serving profile's
    assert overridden.placement == {"dtype": "bfloat16", "device_map": None}
    if not torch.cuda.is_available():
        assert overridden.generator.model.dtype == torch.float32
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"model_config.device_map: 'everywhere'"):
        load(str(folder), {"device_map": "everywhere"})


def test_the_batch_plan_is_the_prompts_alone_and_ranks_share_it_whole():
    lengths = [5, 3, 9, 3, 7, 1, 5]
    plan = batches(lengths, 3)
    assert plan == [[5, 1, 3], [0, 6, 4], [2]]  # by length, ties in item order
    shares = [plan[r::2] for r in range(2)]
    assert sorted(i for share in shares for b in share for i in b) == list(range(len(lengths)))


def test_merge_puts_answers_in_item_order_and_refuses_gaps_repeats_and_mixed_runs(tmp_path):
    def write(rank: int, world: int, rows: dict[int, str]) -> None:
        answers_file(tmp_path, rank, world).write_text(
            "".join(json.dumps({"index": i, "answer": a}) + "\n" for i, a in rows.items()))

    write(0, 2, {0: "a", 2: "c"})
    write(1, 2, {1: "b", 3: "d"})
    assert merge(tmp_path, 4) == ["a", "b", "c", "d"]
    with pytest.raises(MergeError, match=r"missing for items \[4\]"):
        merge(tmp_path, 5)
    write(1, 2, {1: "b", 2: "again", 3: "d"})
    with pytest.raises(MergeError, match="item 2 was answered by two ranks"):
        merge(tmp_path, 4)
    write(0, 3, {0: "a"})  # a file left from a run on 3 ranks
    with pytest.raises(MergeError, match="one answers file per rank of one run"):
        merge(tmp_path, 4)
