"""The instruction suite (per-record quarantine + GX dataset rules) and the released-data import."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medrega import metafile
from medrega.errors import BadInput
from tests.conftest import tiny
from medrega.sources.embedded import build_default
from medrega.sources.released import iter_released
from medrega.records import rules as vi
from tasks.materialize import materialize

REPO = Path(__file__).resolve().parent.parent


def rec(q="<image>\nWhat is <ref>this</ref><box>[[1, 2, 30, 40]]</box>?", a="liver", **kw):
    base = {"id": "r2t-en-1", "image": "images/x.png", "width": 64, "height": 64, "task": "r2t", "lang": "en",
            "split": "train", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    return {**base, **kw}


@pytest.mark.parametrize("record, rule", [
    (rec(q="<image>\n<image>\nWhat is <box>[[1, 2, 30, 40]]</box>?"), vi.R_IMAGE_TAG),
    (rec(q="What is <box>[[1, 2, 30, 40]]</box>?"), vi.R_IMAGE_TAG),
    (rec(q="<image>\nWhat is <ref>this<box>[[1, 2, 30, 40]]</box>?"), vi.R_TAGS),
    (rec(q="<image>\nWhat is <box>[[1, 2, 30, 1000]]</box>?"), vi.R_GRID),   # box outside the image
    (rec(q="<image>\nWhat is <box>[[30, 2, 1, 40]]</box>?"), vi.R_GRID),     # x1 > x2
    (rec(width=None), vi.R_SIZE),
    (rec(lang="zh"), vi.R_LANG),                                            # Chinese text missing
    (rec(a=""), vi.R_LANG),
    (rec(a="x" * 5000), vi.R_LENGTH),
])
def test_per_record_rules(record, rule):
    assert rule in [r for r, _ in vi.check_record(record, max_bytes=4096)]


def test_good_record_passes():
    assert vi.check_record(rec(), 4096) == []


def _row(**kw):
    r = rec(**kw)
    r.setdefault("patient", "p1")
    r["dataset"] = "D"
    return vi.row_of(r, "out/r2t_en_train.jsonl")


def test_suite_duplicate_id_names_file_record_rule():
    rows = [_row(), _row(lang="zh", q="<image>\n这是什么<box>[[1, 2, 30, 40]]</box>？")]  # same id twice
    with pytest.raises(ValueError) as err:
        vi.run_suite(rows, ["en", "zh"], 4096)
    assert "out/r2t_en_train.jsonl (record r2t-en-1): rule 'record ids unique'" in str(err.value)


def test_suite_patient_in_two_splits_and_missing_language():
    rows = [_row(id="a"), _row(id="b", split="test")]
    with pytest.raises(ValueError) as err:
        vi.run_suite(rows, ["en"], 4096)
    assert vi.R_SPLIT in str(err.value) and "patient D/p1 is in 2 splits" in str(err.value)
    with pytest.raises(ValueError, match="every task in every language.*task r2t has languages \\[en\\]"):
        vi.run_suite([_row(id="a")], ["en", "zh"], 4096)


# ------------------------------------------------------------------------- released import
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    params = tiny({"materialize": {"test_share": 0.5},
                   "data": {"patients_per_modality": 2, "slices_per_patient": 1, "image_size": 64,
                            "package_scans": False}})
    root = tmp_path_factory.mktemp("rel") / "samed2d"
    build_default(root, params.data)
    return root, params


def _release(tmp: Path, extra: list[bytes] = ()) -> Path:
    rel = tmp / "release"
    rel.mkdir()
    lines = [
        {"conversations": [{"from": "human", "value": "What can be visualized in the <box>[[214, 437, 392, 619]]</box> of this medical scan?"},
                           {"from": "gpt", "value": "left ventricle"}], "width": 216, "height": 256, "id": -1, "image": "a.png"},
        {"conversations": [{"from": "human", "value": "这张医学影像中<box>[[214, 437, 392, 619]]</box>区域显示的是什么？"},
                           {"from": "gpt", "value": "左心室"}], "width": 216, "height": 256, "id": -1, "image": "a.png"},
        {"conversations": [{"from": "human", "value": "Could you specify the corner points for a bounding box surrounding <ref>heart myocardium</ref> <ref>right ventricle</ref>?"},
                           {"from": "gpt", "value": "<ref>heart myocardium</ref><box>[[1, 2, 30, 40]]</box>, <ref>right ventricle</ref><box>[[5, 6, 50, 60], [70, 70, 90, 90]]</box>"}],
         "width": 216, "height": 256, "id": -1, "image": "b.png"},
    ]
    body = b"".join(json.dumps(l, ensure_ascii=False).encode() + b"\n" for l in lines)
    body += json.dumps(lines[0]).encode() + b"\n"  # an exact duplicate: gets its own id
    body += b"".join(extra)
    (rel / "acdc.jsonl").write_bytes(body)
    (rel / "meta_file.json").write_text(json.dumps({"ACDC": {"root": "images", "annotation": "acdc.jsonl",
                                                             "length": 4, "repeat_time": 2, "data_augment": False}}))
    return rel / "meta_file.json"


def test_released_ids_tasks_and_settings(tmp_path):
    meta = _release(tmp_path)
    out = [r for _, _, r, bad in iter_released(meta) if r]
    assert [r["task"] for r in out] == ["r2t", "r2t", "t2r", "r2t"]
    assert [r["lang"] for r in out] == ["en", "zh", "en", "en"]
    assert out[2]["setting"] == "MM"
    ids = [r["id"] for r in out]
    assert len(set(ids)) == 4 and ids[3] == ids[0] + "-2" and ids == [r["id"] for _, _, r, _ in iter_released(meta) if r]
    assert all(r["conversations"][0]["value"].startswith("<image>\n") and r["released_id"] == -1 for r in out)


def test_materialize_mixes_released(data, tmp_path):
    root, params = data
    p = params.merged({"materialize": {"released_meta": str(_release(tmp_path))}})
    summary = materialize(root, tmp_path / "ins", p)
    meta = json.loads((tmp_path / "ins" / "meta_file.json").read_text())
    entry = meta["r2t_en_released_ACDC"]
    root_read = metafile.resolve(tmp_path / "ins" / "meta_file.json", entry["root"]).resolve()
    assert entry["repeat_time"] == 2 and root_read == (tmp_path / "release" / "images").resolve() and entry["length"] == 2
    assert summary["records_by_source"]["released_ACDC"] == 4 and "r2t_en-00000" in meta


def test_released_bad_lines_quarantined_or_fail(data, tmp_path):
    root, params = data
    bad = [b'{"conversations": [{"from": "human", "value": "caf\xe9"}], "image": "x.png"}\n',
           json.dumps({"conversations": [{"from": "human", "value": "Where? <box>[[10, 10, 1200, 40]]</box>"},
                                         {"from": "gpt", "value": "x"}], "image": "x.png", "width": 9, "height": 9}).encode() + b"\n"]
    p = params.merged({"materialize": {"released_meta": str(_release(tmp_path, bad)), "max_quarantine_share": 0.5}})
    summary = materialize(root, tmp_path / "ins", p)
    q = [json.loads(l) for l in (tmp_path / "ins" / "quarantine.jsonl").read_text().splitlines()]
    assert [x["rule"] for x in q] == ["record is UTF-8", vi.R_GRID] and summary["quarantined"] == 2
    assert q[0]["file"].endswith("acdc.jsonl") and q[0]["id"] == "ACDC:5"
    p = p.merged({"materialize": {"max_quarantine_share": 0.0}})
    with pytest.raises(BadInput, match=r"2 of \d+ records quarantined.*acdc.jsonl \(record ACDC:5\): rule 'record is UTF-8'"):
        materialize(root, tmp_path / "ins2", p)
    assert not (tmp_path / "ins2").exists() and not list(tmp_path.glob(".ins2*"))  # nothing half-written
