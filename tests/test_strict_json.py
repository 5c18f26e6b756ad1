"""JSON that gives a key twice is an error naming the file, the line and the key, in every JSON the
pipeline reads (json.loads would silently keep the last one)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medrega import io, metafile
from medrega.errors import BadInput
from medrega.metrics.region import read_answers
from medrega.metrics.release import read_release_files
from medrega.sources.mimic import load_boxes
from medrega.sources.released import iter_released
from medrega.sources.reports import ReportError, read_reports


def test_loader_names_line_and_key_even_when_nested():
    text = '{"a": 1,\n "b": [{"c": 1},\n {"c": 2,\n  "c": 3}]}'
    with pytest.raises(io.DuplicateKey) as info:
        io.loads_json(text, "x.json")
    assert (info.value.line, info.value.key) == (4, "c")
    assert str(info.value).startswith("x.json:4: rule 'JSON keys unique' failed: key 'c' is given twice")
    # an escaped spelling of the same key is the same key
    with pytest.raises(io.DuplicateKey, match="x.json:2: .*'ab'"):
        io.loads_json('{"a\\u0062": 1,\n "ab": 2}', "x.json")
    assert io.loads_json(text.replace('"c": 3', '"d": 3')) == json.loads(text.replace('"c": 3', '"d": 3'))
    with pytest.raises(json.JSONDecodeError):  # syntax errors stay what they were
        io.loads_json('{"a": 1', "x.json")


def test_read_json_refuses_duplicates_with_bad_input(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{\n"k": 1,\n"k": 1\n}')
    with pytest.raises(BadInput, match=f"{path}:3: rule 'JSON keys unique' failed: key 'k'"):
        io.read_json(path)


def test_reports_line_with_a_key_twice(tmp_path):
    good = {"image": "images/a.png", "findings": {"en": "x", "zh": "肝"}, "impression": {"en": "y", "zh": "脾"}}
    line = json.dumps(good, ensure_ascii=False)
    twice = line[:-1] + ', "findings": {"en": "other", "zh": "别的"}}'
    (tmp_path / "reports.jsonl").write_text(line.replace("a.png", "b.png") + "\n" + twice + "\n", encoding="utf-8")
    with pytest.raises(ReportError, match=r"reports.jsonl:2: rule 'JSON keys unique' failed: key 'findings'"):
        read_reports(tmp_path)


def _released(tmp_path: Path, meta_text: str, lines: list[str]) -> Path:
    (tmp_path / "ann.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    meta = tmp_path / "meta.json"
    meta.write_text(meta_text, encoding="utf-8")
    return meta


def test_released_meta_file_and_annotation_lines(tmp_path):
    conv = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "liver"}]
    ok = json.dumps({"id": -1, "image": "a.png", "conversations": conv})
    twice = ok[:-1] + ', "image": "b.png"}'
    entry = '{"root": ".", "annotation": "ann.jsonl", "repeat_time": 1, "data_augment": false}'
    meta = _released(tmp_path, '{"SAMed_r2t": ' + entry + ',\n "SAMed_r2t": ' + entry + "}", [ok])
    with pytest.raises(BadInput, match=r"meta.json:2: rule 'JSON keys unique' failed: key 'SAMed_r2t'"):
        metafile.read(meta)
    meta = _released(tmp_path, '{"SAMed_r2t": ' + entry + "}", [ok, twice])
    rows = list(iter_released(meta))
    assert rows[0][2] is not None and rows[0][3] is None
    bad = rows[1][3]  # quarantined like any line it cannot read, never the last "image" kept
    assert rows[1][2] is None and (bad["line"], bad["rule"]) == (2, "JSON keys unique")
    assert bad["file"].endswith("ann.jsonl") and "'image'" in bad["detail"]


def test_imagenome_boxes_file_and_scene_graphs(tmp_path):
    boxes = tmp_path / "boxes.json"
    boxes.write_text('{"d1": [],\n "d1": [{"bbox_name": "right lung"}]}')
    with pytest.raises(BadInput, match=r"boxes.json:2: rule 'JSON keys unique' failed: key 'd1'"):
        load_boxes(boxes)
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    (graphs / "d2_SceneGraph.json").write_text('{"image_id": "d2",\n"objects": [],\n"objects": []}')
    with pytest.raises(BadInput, match=r"d2_SceneGraph.json:3: .*'objects'"):
        load_boxes(graphs)


def test_answers_files_json_lines_and_array(tmp_path):
    lines = tmp_path / "answers.jsonl"
    lines.write_text('{"prediction": "a", "ground_truth": "b"}\n{"prediction": "a", "prediction": "c", '
                     '"ground_truth": "b"}\n')
    with pytest.raises(BadInput, match=r"answers.jsonl:2: rule 'JSON keys unique' failed: key 'prediction'"):
        read_answers(lines)
    array = tmp_path / "their_ss.json"
    array.write_text('[\n{"answer": "x", "gt": "y", "hw": [1, 1]},\n{"answer": "x",\n "gt": "y", "gt": "z", '
                     '"hw": [1, 1]}\n]')
    with pytest.raises(BadInput, match=r"their_ss.json:4: rule 'JSON keys unique' failed: key 'gt'"):
        read_release_files([array], "t2r")
