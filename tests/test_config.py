"""The typed config: every profile validated on load, resolved once, read back unchanged."""
import os
from pathlib import Path

import pytest
import yaml

from medrega import config
from medrega.config import ConfigError

REPO = Path(__file__).resolve().parent.parent


def raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def test_tiny_is_the_default_profile():
    cfg = config.resolve(REPO / "params.yaml")
    assert cfg.profile == "tiny"
    assert cfg.tune.launcher.kind == "local" and cfg.tune.launcher.nproc_per_node == 2
    assert cfg.tune.launcher.backend == "gloo" and cfg.tune.deepspeed.zero_stage == 3
    assert cfg.model.num_image_tokens == 16  # 224 px / 28-px patches, pixel shuffle 0.5
    assert [p.max_steps for p in cfg.pretrain.phases] == [1000, 200]
    # keys beside `phases` are shared by every phase; a phase's own win
    assert all(p.per_device_batch_size == 16 for p in cfg.pretrain.phases)
    assert cfg.pretrain.phases[0].tasks == ["r2t", "t2r"] and cfg.pretrain.phases[1].tasks == ["caption", "r2t", "t2r"]


def test_cluster_profile_carries_the_papers_settings():
    cfg = config.resolve(REPO / "params.yaml", "h800-cluster")
    tune, launcher = cfg.tune, cfg.tune.launcher
    assert launcher.nnodes * launcher.nproc_per_node * tune.per_device_batch_size * tune.gradient_accumulation_steps == 128
    assert tune.learning_rate == 1e-5 and tune.lr_scheduler == "cosine" and tune.warmup_ratio == 0.03
    assert tune.weight_decay == 0.05 and tune.bf16 and tune.gradient_checkpointing
    assert cfg.model.max_length == 2048 and cfg.model.image_size == 448 and cfg.model.num_image_tokens == 256
    assert tune.lora.r == 16 and tune.lora.alpha == 32  # kept from the base: the overlay does not override them
    assert cfg.pretrain.phases == []  # a real checkpoint is already pretrained
    assert tune.tasks is None  # the paper's full mix


def test_env_selects_profile_and_an_explicit_one_wins(monkeypatch):
    monkeypatch.setenv("MEDREGA_PROFILE", "h800-cluster")
    assert config.resolve(REPO / "params.yaml").profile == "h800-cluster"
    assert config.resolve(REPO / "params.yaml", "tiny").profile == "tiny"


def test_unknown_profile_and_missing_file_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        config.resolve(REPO / "params.yaml", "nope")
    with pytest.raises(ConfigError, match="not found"):
        config.resolve(tmp_path / "missing.yaml")


@pytest.mark.parametrize("edit,message", [
    (lambda r: r["tune"].update(max_step=10), r"\(profile tiny\): tune\.max_step: unknown key"),
    (lambda r: r["tune"]["lora"].update(r="sixteen"), r"tune\.lora\.r: .*integer.*'sixteen'"),
    (lambda r: r["materialize"].update(test_share=1.5), r"materialize\.test_share: .*less than 1"),
    (lambda r: r["tune"].update(mode="qlora"), r"tune\.mode: .*'lora' or 'full'"),
    (lambda r: r["evaluate"].update(max_samples_per_task=0), r"evaluate\.max_samples_per_task: must be -1"),
    (lambda r: r["model"].update(image_size=225), r"model: image_size 225 is not a multiple of patch_size 28"),
    (lambda r: r["register"].update(alias="champion"), r"register: alias and champion_alias must differ"),
    (lambda r: r["materialize"].update(langs=["en", "en"]), r"materialize\.langs: .*twice"),
    (lambda r: r["profiles"]["h800-cluster"]["tune"].update(lerning_rate=1), r"\(profile h800-cluster\): tune\.lerning_rate"),
    (lambda r: r["profiles"]["h800-cluster"].update(evaluate={"out": "elsewhere"}), r"profiles\.h800-cluster\.evaluate\.out: paths"),
])
def test_bad_values_are_refused_naming_file_profile_and_key(tmp_path, edit, message):
    data = raw()
    edit(data)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=message) as info:
        config.resolve(path)  # the tiny profile: a typo in an inactive profile is refused too
    assert str(path) in str(info.value)


def test_a_key_given_twice_is_refused(tmp_path):
    path = write(tmp_path, "seed: 0\ntune:\n  max_steps: 5\n  max_steps: 6\n")
    with pytest.raises(ConfigError, match=r"line 4: key 'max_steps' is given twice"):
        config.resolve(path)


def test_task_mixes_choose_among_the_materialized_tasks(tmp_path):
    data = raw()
    data["materialize"]["tasks"] = ["caption", "r2t", "t2r"]
    data["evaluate"]["tasks"] = ["t2r", "vqa"]
    with pytest.raises(ConfigError, match=r"evaluate\.tasks names vqa, which materialize\.tasks does not build"):
        config.resolve(write(tmp_path, data))
    data["evaluate"]["tasks"] = None
    data["pretrain"]["phases"][1]["tasks"] = ["grounded"]
    with pytest.raises(ConfigError, match=r"pretrain\.phases\[1\]\.tasks names grounded"):
        config.resolve(write(tmp_path, data))


@pytest.mark.parametrize("gate, words", [
    ("grounded.align_accuracy", "'grounded.align_accuracy': evaluation produces no such figure (did you mean "
                                "grounded.align_recall, grounded.align_f1"),
    ("t2r.fr.region_f1", "no such figure"),             # a language materialize does not build
    ("t2r.n", "no such figure"),                        # a count is not a quality figure
    ("vqa.closed_accuracy", "task 'vqa' is not evaluated"),
])
def test_gate_names_are_checked_against_what_evaluation_produces(tmp_path, gate, words):
    data = raw()
    data["evaluate"]["tasks"] = ["t2r", "r2t", "grounded"]
    data["register"]["gate"]["metrics"] = ["t2r.acc_at_0.5", "r2t.zh.accuracy", gate]
    with pytest.raises(ConfigError) as info:
        config.resolve(write(tmp_path, data))
    assert "register.gate.metrics[2]" in str(info.value) and words in str(info.value)


def test_weights_by_reference_for_the_real_checkpoint_profile_only():
    profiles = config.profiles(REPO / "params.yaml")
    assert profiles["h800-cluster"].register_.weights == "reference"
    assert profiles["tiny"].register_.weights == "merged"  # the embedded default stays self-contained


def test_defaults_live_in_the_schema(tmp_path):
    cfg = config.resolve(write(tmp_path, {"seed": 3}))
    assert cfg.seed == 3 and cfg.materialize.shard_size == config.MaterializeConfig().shard_size
    assert cfg.tune.lora.r == 16 and cfg.validate_.max_image_pixels == 40_000_000


def test_resolved_file_round_trips_and_is_rewritten_only_on_change(tmp_path):
    cfg = config.resolve(REPO / "params.yaml", "h800-cluster")
    path = config.write_resolved(cfg, tmp_path / "params.resolved.yaml")
    assert config.load_resolved(path) == cfg
    text = path.read_text()
    assert "profiles" not in yaml.safe_load(text) and "profile: h800-cluster" in text
    os.utime(path, (1, 1))
    config.write_resolved(cfg, path)
    assert path.stat().st_mtime == 1  # same content: untouched, DVC sees nothing new
    config.write_resolved(cfg.merged({"seed": 1}), path)
    assert path.stat().st_mtime != 1
    with pytest.raises(ConfigError, match="is a params file, not a resolved config"):
        config.load_resolved(REPO / "params.yaml")
    with pytest.raises(ConfigError, match="cannot take --profile"):
        config.load(path, profile="tiny")
