"""`medrega export-meta --for internvl`: files upstream InternVL's trainer reads unchanged.

Upstream's code cannot be imported here, so the tests check what it would do with the files:
`_upstream_reads` does what its `build_datasets`/`LazySupervisedDataset` do with a meta file
(`json.loads(open(meta_path).read())`, `open(annotation)`, `range(repeat_time)`,
`os.path.join(root, image)`), from a working directory that is not ours."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medrega import export, grammar, metafile
from medrega.errors import BadInput
from medrega.grammar import base_prompt
from tests.conftest import REPO, tiny


@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> Path:
    """A small materialize output: captions, Region-to-Text and Text-to-Region, English and Chinese."""
    from medrega.sources.synthetic import generate
    from tasks.materialize import materialize

    root = tmp_path_factory.mktemp("export")
    generate(root / "data", patients_per_modality=2, slices_per_patient=1, image_size=64, seed=0)
    cfg = tiny({"materialize": {"test_share": 0.5, "tasks": ["caption", "r2t", "t2r"], "workers": 1},
                "register": {"gate": {"metrics": ["t2r.region_f1", "r2t.accuracy"]}}})
    materialize(root / "data", root / "instructions", cfg)
    return root / "instructions"


def _upstream_reads(meta_path: Path) -> list[tuple[str, dict, list[dict]]]:
    """What upstream's build_datasets and LazySupervisedDataset do with a meta file, in the
    current working directory: (name, entry, records) per dataset; each image path must exist."""
    out = []
    for name, entry in json.loads(open(meta_path).read()).items():
        assert entry["annotation"].endswith("jsonl")  # their assert
        with open(entry["annotation"]) as f:  # against the working directory, as theirs
            records = [json.loads(line) for line in f.readlines()]
        assert len(list(range(entry["repeat_time"]))) == entry["repeat_time"]  # their repeat loop
        assert isinstance(entry["data_augment"], bool)
        for rec in records:
            assert os.path.isfile(os.path.join(entry["root"], rec["image"])), rec["image"]
        out.append((name, entry, records))
    return out


def test_meta_paths_are_absolute_and_read_from_any_working_directory(instructions, tmp_path, monkeypatch):
    out = tmp_path / "for-internvl"
    summary = export.export_internvl(instructions, out, export.tiling("internvl-chat-v1-2"))
    elsewhere = tmp_path / "InternVL" / "internvl_chat"  # where upstream's scripts are launched from
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    for meta_name in ("meta_file.json", "meta_test.json"):
        read = _upstream_reads(out / meta_name)
        ours = metafile.read(instructions / meta_name)
        assert [n for n, _, _ in read] == [n for n, _ in ours]
        for (name, entry, records), (_, mine) in zip(read, ours):
            assert Path(entry["root"]).is_absolute() and Path(entry["annotation"]).is_absolute()
            # nothing changed in these records: the trainer reads our own file in place
            assert Path(entry["annotation"]) == Path(mine["annotation"]).resolve()
            assert entry["length"] == len(records) == mine["length"]
            assert entry["base_prompt"] == mine["base_prompt"] and entry["max_dynamic_patch"] == 1
    assert summary["quarantined"] == 0 and (out / "quarantine.jsonl").read_text() == ""
    assert "--conv_style Hermes-2" in summary["trainer_flags"] and "--max_seq_length 2048" in summary["trainer_flags"]


def test_bake_base_prompt_writes_it_into_the_human_turn_exactly_once(instructions, tmp_path, monkeypatch):
    out = tmp_path / "baked"
    export.export_internvl(instructions, out, export.tiling("internvl-chat-v1-2"), bake_base_prompt=True)
    monkeypatch.chdir(tmp_path)
    originals = {r["id"]: r for name, e in metafile.read(instructions / "meta_file.json")
                 for r in map(json.loads, Path(e["annotation"]).read_text(encoding="utf-8").splitlines())}
    seen = 0
    for name, entry, records in _upstream_reads(out / "meta_file.json"):
        assert entry["base_prompt"] is None  # a trainer that honours base_prompt must not add it again
        assert Path(entry["annotation"]).parent == (out / "annotations" / "train").resolve()
        for rec in records:
            prompt = base_prompt(rec["task"], rec["lang"])
            human, original = rec["conversations"][0]["value"], originals[rec["id"]]["conversations"]
            # SPEC §1: "<image>\n" + base_prompt + " " + question
            assert human == f"<image>\n{prompt} {grammar.without_image(original[0]['value'])}"
            assert human.count(prompt) == 1 and human.count("<image>") == 1
            assert rec["conversations"][1:] == original[1:]  # answers untouched
            seen += 1
        if name.startswith("t2r_en"):  # the grid sentence no longer vanishes upstream
            assert all("integers ranging from 0 to 999" in r["conversations"][0]["value"] for r in records)
    assert seen == len(originals)
    # exporting the export again adds nothing: the prompt is there once already
    again = tmp_path / "again"
    export.export_internvl(out, again, export.tiling("internvl-chat-v1-2"), bake_base_prompt=True)
    first = json.loads((again / "meta_file.json").read_text())
    assert all(Path(e["annotation"]).parent.parent.parent == out.resolve() for e in first.values())


def test_bake_is_idempotent_and_needs_a_prompt():
    once = export.bake("<image>\nWhat is <box>[[1, 2, 3, 4]]</box>?", "PROMPT.")
    assert once == "<image>\nPROMPT. What is <box>[[1, 2, 3, 4]]</box>?"
    assert export.bake(once, "PROMPT.") == once
    assert export.bake("What?", "PROMPT.") == "<image>\nPROMPT. What?"  # <image> made explicit, first
    assert export.bake("<image>\nWhat?", None) == "<image>\nWhat?"
    shipped = "<image>\nWhat is this? PROMPT."  # a source that ships the prompt elsewhere in the turn
    assert export.bake(shipped, "PROMPT.") == shipped


@pytest.mark.parametrize("size, grid, tiles", [
    ((128, 96), (3, 2), 7),     # a small 4:3 slice: cut into 6 tiles + thumbnail
    ((96, 128), (2, 3), 7),
    ((448, 448), (1, 1), 1),    # square: one tile, no thumbnail
    ((896, 448), (2, 1), 3),
    ((600, 600), (1, 1), 1),    # 1:1 ties with 2x2; the larger grid only when the image fills half of it
    ((700, 700), (2, 2), 5),
    ((3000, 100), (6, 1), 7),
])
def test_tile_count_follows_dynamic_preprocess(size, grid, tiles):
    t = export.tiling("internvl2.5")
    assert export.tile_grid(*size, t) == grid
    assert export.n_tiles(*size, t) == tiles
    assert export.image_tokens(*size, t) == tiles * 256 + 2
    v12 = export.tiling("internvl-chat-v1-2")
    assert export.n_tiles(*size, v12) == 1 and export.image_tokens(*size, v12) == 258
    assert export.n_tiles(*size, export.tiling("internvl2.5", max_tiles=1)) == 1


def _odd_instructions(root: Path) -> Path:
    """A Text-to-Region record on a 128x96 MR slice and one on a 448x448 one."""
    images = root / "data" / "images"
    images.mkdir(parents=True)
    recs = []
    for name, (w, h) in (("mr_odd", (128, 96)), ("mr_square", (448, 448))):
        Image.fromarray(np.zeros((h, w), np.uint8)).save(images / f"{name}.png")
        recs.append({"id": f"t2r-en-{name}", "image": f"images/{name}.png", "width": w, "height": h,
                     "task": "t2r", "lang": "en", "conversations": [
                         {"from": "human", "value": "<image>\nWhere is the <ref>left ventricle</ref>?"},
                         {"from": "gpt", "value": "<ref>left ventricle</ref><box>[[120, 300, 480, 720]]</box>"}]})
    out = root / "instructions"
    out.mkdir()
    (out / "t2r_en_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    metafile.write(out / "meta_file.json", {"t2r_en": {
        "root": str(root / "data"), "annotation": str(out / "t2r_en_train.jsonl"), "length": 2, "repeat_time": 1,
        "data_augment": False, "base_prompt": base_prompt("t2r", "en")}})
    return out


def test_a_small_odd_shaped_image_is_quarantined_at_2048_with_6_tiles(tmp_path):
    src = _odd_instructions(tmp_path)
    out = tmp_path / "internvl25"
    summary = export.export_internvl(src, out, export.tiling("internvl2.5"), 2048, max_quarantine_share=1.0)
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["id"], q["rule"], q["entry"]) for q in quarantine] == [
        ("t2r-en-mr_odd", "text and image tokens within max_seq_length", "t2r_en")]
    assert quarantine[0]["file"] == str((src / "t2r_en_train.jsonl").resolve())
    assert "1794 image tokens (7 tiles of a 128x96 image, internvl2.5)" in quarantine[0]["detail"]
    assert "> max_seq_length 2048" in quarantine[0]["detail"]
    entry = json.loads((out / "meta_file.json").read_text())["t2r_en"]
    kept = [json.loads(line) for line in Path(entry["annotation"]).read_text().splitlines()]
    assert [r["id"] for r in kept] == ["t2r-en-mr_square"] and entry["length"] == 1  # left out, never cut
    assert kept[0]["conversations"][1]["value"].endswith("</box>")
    assert entry["max_dynamic_patch"] == 6 and summary["by_rule"] == {export.R_FITS: 1}
    assert "--dynamic_image_size True --use_thumbnail True --min_dynamic_patch 1 --max_dynamic_patch 6" \
        in summary["trainer_flags"]
    # one 448 tile (InternVL-Chat-V1-2): the same record fits
    fits = export.export_internvl(src, tmp_path / "v12", export.tiling("internvl-chat-v1-2"), 2048)
    assert fits["quarantined"] == 0
    # above the allowed share the export is refused, naming file, record and rule, and writes nothing
    with pytest.raises(BadInput, match=r"t2r_en_train.jsonl \(record t2r-en-mr_odd\): rule 'text and image "
                                       r"tokens within max_seq_length' failed"):
        export.export_internvl(src, tmp_path / "refused", export.tiling("internvl2.5"), 2048)
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".refused*"))


def test_an_unreadable_image_is_quarantined_with_its_path(tmp_path):
    src = _odd_instructions(tmp_path)
    (tmp_path / "data" / "images" / "mr_square.png").write_bytes(b"not a png")
    export.export_internvl(src, tmp_path / "out", export.tiling("internvl-chat-v1-2"), max_quarantine_share=1.0)
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert row["rule"] == "image file readable" and "mr_square.png" in row["detail"]


def test_refuses_to_replace_a_folder_that_is_not_an_export(tmp_path):
    src = _odd_instructions(tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(BadInput, match="not an earlier export"):
        export.export_internvl(src, precious, export.tiling("internvl-chat-v1-2"))
    with pytest.raises(BadInput, match="instructions it reads"):
        export.export_internvl(src, src / "export", export.tiling("internvl-chat-v1-2"))
    assert (precious / "notes.txt").read_text() == "keep me" and not (src / "export").exists()
    with pytest.raises(BadInput, match="unknown tiling"):
        export.tiling("internvl9")


def test_cli_export_meta(tmp_path):
    from cli import app

    src = _odd_instructions(tmp_path)
    args = ["export-meta", str(tmp_path / "out"), "--params", str(REPO / "params.yaml"), "--instructions", str(src)]
    result = CliRunner().invoke(app, [*args, "--for", "internvl", "--tiling", "internvl3", "--bake-base-prompt",
                                      "--max-quarantine-share", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "export.json").read_text())["quarantined"] == 1
    assert CliRunner().invoke(app, [*args, "--for", "llava"]).exit_code == 3
    refused = CliRunner().invoke(app, [*args, "--for", "internvl", "--tiling", "internvl2.5"])
    assert refused.exit_code == 3 and "t2r-en-mr_odd" in refused.output


def test_repeat_time_must_be_whole_for_internvl_chat_v1_2(tmp_path):
    """Its build_datasets repeats with range(repeat_time)."""
    src = _odd_instructions(tmp_path)
    meta = json.loads((src / "meta_file.json").read_text())
    meta["t2r_en"]["repeat_time"] = 1.0
    (src / "meta_file.json").write_text(json.dumps(meta))
    export.export_internvl(src, tmp_path / "whole", export.tiling("internvl-chat-v1-2"))
    assert json.loads((tmp_path / "whole" / "meta_file.json").read_text())["t2r_en"]["repeat_time"] == 1
    meta["t2r_en"]["repeat_time"] = 0.5
    (src / "meta_file.json").write_text(json.dumps(meta))
    with pytest.raises(BadInput, match=r"meta_file.json \(entry t2r_en\): rule 'repeat_time is a whole number'"):
        export.export_internvl(src, tmp_path / "half", export.tiling("internvl-chat-v1-2"))
    assert not (tmp_path / "half").exists()
    half = export.export_internvl(src, tmp_path / "half25", export.tiling("internvl2.5"), max_quarantine_share=1.0)
    assert half["meta_files"]["meta_file.json"]["entries"] == 1  # newer trainers sample a fraction
