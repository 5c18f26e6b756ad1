from pathlib import Path

import pytest

from medrega.config import ConfigError, load_params

REPO = Path(__file__).resolve().parent.parent


def test_tiny_is_the_default_profile():
    params = load_params(REPO / "params.yaml")
    assert params["profile"] == "tiny"
    assert params["tune"]["launcher"] == {"kind": "local", "nnodes": 1, "nproc_per_node": 2, "backend": "gloo"}


def test_cluster_profile_carries_the_papers_settings():
    p = load_params(REPO / "params.yaml", "h800-cluster")
    tune, launcher = p["tune"], p["tune"]["launcher"]
    global_batch = launcher["nnodes"] * launcher["nproc_per_node"] * tune["per_device_batch_size"] * tune["gradient_accumulation_steps"]
    assert global_batch == 128
    assert tune["learning_rate"] == 1e-5 and tune["lr_scheduler"] == "cosine" and tune["warmup_ratio"] == 0.03
    assert tune["weight_decay"] == 0.05 and tune["bf16"] and tune["gradient_checkpointing"]
    assert p["model"]["max_length"] == 2048 and p["model"]["image_size"] == 448
    # the overlay keeps the base's keys it does not override (LoRA r=16, alpha=32)
    assert tune["lora"]["r"] == 16 and tune["lora"]["alpha"] == 32
    # every section every stage reads is present
    for section in ("data", "validate", "materialize", "model", "tokenizer", "align", "tune", "evaluate", "register"):
        assert section in p


def test_env_selects_profile(monkeypatch):
    monkeypatch.setenv("MEDREGA_PROFILE", "h800-cluster")
    assert load_params(REPO / "params.yaml")["profile"] == "h800-cluster"


def test_unknown_profile_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        load_params(REPO / "params.yaml", "nope")
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_task_mixes_choose_among_the_materialized_tasks(tmp_path):
    import yaml

    tiny = load_params(REPO / "params.yaml")
    assert set(tiny["materialize"]["tasks"]) == {"caption", "r2t", "t2r", "grounded", "vqa", "report", "cls"}
    assert tiny["tune"]["tasks"] == ["r2t", "t2r"] and tiny["evaluate"]["tasks"] is None
    assert load_params(REPO / "params.yaml", "h800-cluster")["tune"]["tasks"] is None  # the paper's full mix
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["materialize"]["tasks"] = ["caption", "r2t", "t2r"]
    raw["evaluate"]["tasks"] = ["t2r", "vqa"]
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"evaluate\.tasks names vqa, which materialize\.tasks does not build"):
        load_params(bad)
    raw["evaluate"]["tasks"] = None
    raw["model"]["base_pretrain"]["phases"][1]["tasks"] = ["grounded"]
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"base_pretrain\.phases\[1\]\.tasks names grounded"):
        load_params(bad)
