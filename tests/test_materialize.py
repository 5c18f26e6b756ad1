"""materialize(): JSONL + meta files, patient-disjoint splits, and atomic output."""
import json
from pathlib import Path

import pytest

import tasks.materialize as mat
from medrega import metafile
from medrega.config import ConfigError
from tests.conftest import tiny
from medrega.records import builders
from medrega.sources import synthetic

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params():
    return tiny({"materialize": {"test_share": 0.5}})  # small data: make sure both splits are populated


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mat") / "samed2d"
    synthetic.generate(root, patients_per_modality=2, slices_per_patient=2, image_size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def output(tmp_path_factory, data_root, params):
    out = tmp_path_factory.mktemp("out") / "instructions"
    summary = mat.materialize(data_root, out, params)
    return out, summary


def _lines(path: Path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _shards(out: Path, task: str, lang: str, split: str) -> list[dict]:
    """All records of one task/lang/split, across its shard files in shard order."""
    return [r for p in sorted(out.glob(f"{task}_{lang}_{split}-*.jsonl")) for r in _lines(p)]


def test_files_and_counts(output, params):
    out, summary = output
    assert json.loads((out / "summary.json").read_text(encoding="utf-8")) == summary
    cfg = params.materialize
    for task in cfg.tasks:
        for lang in cfg.langs:
            for split in ("train", "test"):
                recs = _shards(out, task, lang, split)
                assert len(recs) == summary["records"][task][lang][split]
                assert all(r["task"] == task and r["lang"] == lang and r["split"] == split for r in recs)
    for lang in cfg.langs:
        for split in ("train", "test"):
            n = sum(summary["t2r_settings"][lang][split].values())
            assert n == summary["records"]["t2r"][lang][split]


def test_meta_files(output, data_root, params):
    out, summary = output
    for meta_name, split in (("meta_file.json", "train"), ("meta_test.json", "test")):
        meta = json.loads((out / meta_name).read_text(encoding="utf-8"))
        expected = {f"{t}_{lang}" for t in params.materialize.tasks for lang in params.materialize.langs
                    if summary["records"][t][lang][split] > 0}
        datasets = {name.rsplit("-", 1)[0] for name in meta}  # one entry per shard: "r2t_en-00000"
        assert datasets == expected and {"r2t_en", "r2t_zh", "t2r_en", "t2r_zh"} <= datasets
        for name, entry in meta.items():
            dataset, shard = name.rsplit("-", 1)
            task, lang = dataset.split("_")
            assert set(entry) == {"root", "annotation", "length", "repeat_time", "data_augment", "base_prompt"}
            # relative to the meta file's folder: readable from any working directory
            assert not Path(entry["root"]).is_absolute() and not Path(entry["annotation"]).is_absolute()
            assert metafile.resolve(out / meta_name, entry["root"]).resolve() == data_root.resolve()
            assert entry["annotation"] == f"{dataset}_{split}-{shard}.jsonl"
            assert entry["length"] == len(_lines(out / entry["annotation"]))
            assert entry["repeat_time"] == 1
            boxes = task in ("r2t", "t2r", "grounded")  # the tasks whose text carries boxes
            if boxes:
                assert entry["data_augment"] is False
            assert entry["base_prompt"] and ("0 to 999" in entry["base_prompt"] or not boxes or lang == "zh")


def test_no_patient_in_both_splits(output):
    out, _ = output
    seen = {"train": set(), "test": set()}
    for path in out.glob("*.jsonl"):
        for r in _lines(path):
            case = r["image"].split("--")[2]
            seen[r["split"]].add((r["dataset"], case))
    assert seen["train"] and seen["test"]
    assert not seen["train"] & seen["test"]


def test_images_resolve_and_ids_unique(output, data_root):
    out, _ = output
    ids = []
    for path in out.glob("*.jsonl"):
        for r in _lines(path):
            assert (data_root / r["image"]).is_file()
            ids.append(r["id"])
    assert len(ids) == len(set(ids))


def test_deterministic(output, data_root, params, tmp_path):
    out, summary = output
    again = tmp_path / "again"
    assert mat.materialize(data_root, again, params) == json.loads(json.dumps(summary))
    for path in sorted(out.glob("*.jsonl")):
        assert (again / path.name).read_bytes() == path.read_bytes()


def _failing_builder(monkeypatch, after: int):
    real = builders.build_records
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > after:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(mat.builders, "build_records", flaky)


def test_crash_does_not_create_output(data_root, params, tmp_path, monkeypatch):
    out = tmp_path / "instructions"
    _failing_builder(monkeypatch, after=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        mat.materialize(data_root, out, params)
    assert not out.exists()
    # no shard finished (one shard holds every image here), so no work directory is kept either
    assert list(tmp_path.iterdir()) == []


def test_crash_keeps_previous_output(data_root, params, tmp_path, monkeypatch):
    out = tmp_path / "instructions"
    mat.materialize(data_root, out, params)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _failing_builder(monkeypatch, after=5)
    with pytest.raises(RuntimeError):
        mat.materialize(data_root, out, params)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["instructions"]


def test_rerun_replaces_stale_files(data_root, params, tmp_path):
    out = tmp_path / "instructions"
    out.mkdir()
    (out / "stale.jsonl").write_text("{}\n")
    mat.materialize(data_root, out, params)
    assert not (out / "stale.jsonl").exists() and (out / "meta_file.json").is_file()


def test_unknown_task_rejected(params):
    with pytest.raises(ConfigError, match=r"materialize\.tasks\[1\]: .*'vqa_typo'"):
        params.merged({"materialize": {"tasks": ["caption", "vqa_typo"]}})


def test_meta_file_reads_from_any_working_directory(output, tmp_path, monkeypatch):
    from model.data import iter_records

    out, summary = output
    monkeypatch.chdir(tmp_path)  # not the workspace: relative paths resolve against the meta file
    records = list(iter_records(out / "meta_file.json", ["r2t"]))
    assert len(records) == sum(summary["records"]["r2t"][lang]["train"] for lang in ("en", "zh"))
    record, entry = records[0]
    assert (Path(entry["root"]) / record["image"]).is_file()
