"""Embedded default (synthetic + package scans + reports), report-based records, MIMIC reader."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from medrega import metafile
from tests.conftest import tiny
from medrega.records.report_builders import build_report_records
from medrega.records.report_templates import PLACEHOLDERS, TEMPLATES
from medrega.sources.embedded import CT_DATASET, MR_DATASET, build_default
from medrega.sources.mimic import MimicError, iter_studies, parse_report
from medrega.sources.reports import R_LANGS, R_UTF8, REPORTS_FILE, ReportError, read_reports
from medrega.sources.samed2d import iter_samples
from tasks.materialize import materialize
from tasks.validate import validate

REPO = Path(__file__).resolve().parent.parent
ALL_TASKS = ["caption", "r2t", "t2r", "grounded", "vqa", "report", "cls"]


@pytest.fixture(scope="module")
def params():
    return tiny({"materialize": {"test_share": 0.5}, "data": {"patients_per_modality": 2, "slices_per_patient": 1,
                                                              "image_size": 64}})


@pytest.fixture(scope="module")
def root(tmp_path_factory, params):
    r = tmp_path_factory.mktemp("emb") / "samed2d"
    summary = build_default(r, params.data)
    assert summary["package_scans"]["images"] == 4 and summary["reports"]["reports"] == summary["total_images"] + 4
    return r


def test_build_default_validates_and_materializes(root, params, tmp_path):
    assert validate(root, tmp_path / "val", params.validate_)["passed"]
    summary = materialize(root, tmp_path / "ins", params)  # the default task list
    assert summary["quarantined"] == 0
    recs = [json.loads(l) for f in (tmp_path / "ins").glob("r2t_*.jsonl") for l in f.read_text().splitlines()]
    assert {(r["dataset"], r["modality"]) for r in recs} >= {(CT_DATASET, "ct"), (MR_DATASET, "mr")}
    assert "brain" in {r["conversations"][1]["value"] for r in recs}


def test_build_default_without_package_scans(tmp_path, params):
    d = params.merged({"data": {"patients_per_modality": 1, "package_scans": False}}).data
    summary = build_default(tmp_path / "d", d)
    assert summary["package_scans"] is None
    assert not any(s.dataset in (CT_DATASET, MR_DATASET) for s in iter_samples(tmp_path / "d"))


def test_templates_many_per_task_and_language():
    for kind, by_lang in TEMPLATES.items():
        assert set(by_lang) == {"en", "zh"}
        for lang, templates in by_lang.items():
            assert len(templates) >= 20 and len(set(templates)) == len(templates), (kind, lang)
            for t in templates:
                assert all(t.count(p) == 1 for p in PLACEHOLDERS[kind]), (kind, t)


def test_report_records_all_tasks(root, params, tmp_path):
    p = params.merged({"materialize": {"tasks": ALL_TASKS}})
    summary = materialize(root, tmp_path / "ins", p)
    for task in ALL_TASKS:
        for lang in ("en", "zh"):
            assert summary["records"][task][lang]["train"] > 0, (task, lang)
    meta = json.loads((tmp_path / "ins" / "meta_file.json").read_text())
    assert meta["grounded_zh-00000"]["base_prompt"].startswith("你是一个医疗助手，你的任务是定位并描述病种。")
    assert not any(e["data_augment"] for e in meta.values())
    lines = lambda n: [json.loads(l) for f in sorted((tmp_path / "ins").glob(n.replace(".jsonl", "-*.jsonl")))  # noqa: E731
                       for l in f.read_text().splitlines()]
    g_en, g_zh = lines("grounded_en_train.jsonl"), lines("grounded_zh_train.jsonl")
    assert all("</box>: " in r["conversations"][1]["value"] for r in g_en)
    assert all("</box>：" in r["conversations"][1]["value"] for r in g_zh)
    assert all(r["conversations"][1]["value"].startswith("Findings: ") and " Impression: " in r["conversations"][1]["value"]
               for r in lines("report_en_train.jsonl"))
    assert all(r["conversations"][1]["value"].startswith("影像诊断：") and "影像结论：" in r["conversations"][1]["value"]
               for r in lines("report_zh_train.jsonl"))
    vqa = lines("vqa_en_train.jsonl") + lines("vqa_zh_train.jsonl")
    assert {r["answer_type"] for r in vqa} == {"closed", "open"}
    assert {r["conversations"][1]["value"] for r in vqa if r["answer_type"] == "closed"} == {"yes", "no", "是", "否"}
    assert all(r["conversations"][0]["value"].endswith(("single word or phrase.", "请用词或短语回答问题。")) for r in vqa)
    for r in lines("cls_en_train.jsonl"):  # the answer is one of the labels listed in the prompt
        assert r["conversations"][1]["value"] in r["conversations"][0]["value"]
    # package scans: not exhaustively labelled, so no absence claims about them
    scans = [r for r in vqa + lines("cls_en_train.jsonl") if r["dataset"] in (CT_DATASET, MR_DATASET)]
    assert scans and all(r["conversations"][1]["value"] not in ("no", "否", "none", "无") for r in scans)


def test_bilingual_finding_example(root):
    reports = read_reports(root)
    liver = [r for r in reports.values() if "liver_tumor" in r.sentences and "CT" in r.image.upper()]
    for r in liver:
        assert r.sentences["liver_tumor"]["zh"].startswith("肝右叶见")


def _rewrite_reports(root: Path, dst: Path, mutate) -> Path:
    import shutil
    shutil.copytree(root, dst)
    lines = (dst / REPORTS_FILE).read_bytes().splitlines(keepends=True)
    lines[2] = mutate(lines[2])
    (dst / REPORTS_FILE).write_bytes(b"".join(lines))
    return dst


def test_non_utf8_report_fails_naming_file_line_rule(root, params, tmp_path):
    bad = _rewrite_reports(root, tmp_path / "bad", lambda l: l.replace("肝".encode(), b"\xff\xfe") if "肝".encode() in l
                           else l[:40] + b"\xff" + l[40:])
    with pytest.raises(ReportError) as err:
        read_reports(bad)
    assert f"{REPORTS_FILE}:3" in str(err.value) and R_UTF8 in str(err.value)
    p = params.merged({"materialize": {"tasks": ALL_TASKS}})
    out = tmp_path / "ins"
    out.mkdir()
    (out / "keep.txt").write_text("previous output")
    with pytest.raises(ValueError, match=R_UTF8):
        materialize(bad, out, p)
    assert (out / "keep.txt").read_text() == "previous output"  # old output untouched
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".ins")] == []  # no temp left


def test_missing_chinese_text_fails(root, tmp_path):
    def drop_zh(line: bytes) -> bytes:
        obj = json.loads(line)
        del obj["findings"]["zh"]
        return (json.dumps(obj, ensure_ascii=False) + "\n").encode()
    bad = _rewrite_reports(root, tmp_path / "bad", drop_zh)
    with pytest.raises(ReportError) as err:
        read_reports(bad)
    assert R_LANGS in str(err.value) and "findings.zh" in str(err.value) and "record images/" in str(err.value)
    assert read_reports(bad, langs=("en",))  # an English-only run does not need it


# ---------------------------------------------------------------- MIMIC-CXR-JPG + Chest ImaGenome
REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough.

 FINDINGS:

 The lungs are clear without focal consolidation.  No pleural effusion or
 pneumothorax.  The cardiac silhouette is normal in size.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def _mimic(tmp: Path, report: bytes | None = None, box=(10, 8, 40, 60)) -> tuple[Path, Path]:
    study = tmp / "mimic" / "files" / "p10" / "p10000032" / "s50414267"
    study.mkdir(parents=True)
    Image.new("L", (64, 80), 120).save(study / "02aa804e-bde0afdd.jpg")
    study.with_suffix(".txt").write_bytes(report if report is not None else REPORT.encode())
    boxes = {"02aa804e-bde0afdd": [
        {"bbox_name": "right lung", "original_x1": box[0], "original_y1": box[1], "original_x2": box[2], "original_y2": box[3]},
        {"bbox_name": "left lung", "original_x1": 34, "original_y1": 8, "original_x2": 60, "original_y2": 62},
        {"bbox_name": "cardiac silhouette", "original_x1": 20, "original_y1": 40, "original_x2": 44, "original_y2": 70,
         "phrases": ["The cardiac silhouette is normal in size."]}]}
    (tmp / "boxes.json").write_text(json.dumps(boxes))
    return tmp / "mimic", tmp / "boxes.json"


def test_parse_mimic_report_sections():
    s = parse_report(REPORT)
    assert s["findings"].startswith("The lungs are clear") and s["impression"] == "No acute cardiopulmonary process."


def test_mimic_grounded_report_records(tmp_path):
    root, boxes = _mimic(tmp_path)
    (study,) = list(iter_studies(root, boxes))
    assert study.sample.patient == "p10000032" and (study.sample.width, study.sample.height) == (64, 80)
    labels = [label for label, _ in study.regions]
    assert labels == ["right_lung", "left_lung", "heart"]  # ImaGenome names mapped to the vocabulary
    assert study.report.sentences["right_lung"]["en"].startswith("The lungs are clear")
    recs = build_report_records(study.sample, study.regions, study.report, "train", ("grounded", "report"), ("en", "zh"))
    assert {r["lang"] for r in recs} == {"en"}  # MIMIC is English only
    g = next(r for r in recs if r["task"] == "grounded")["conversations"][1]["value"]
    assert g.startswith("<ref>") and "</box>: " in g
    rep = next(r for r in recs if r["task"] == "report")["conversations"][1]["value"]
    assert rep == ("Findings: The lungs are clear without focal consolidation. No pleural effusion or pneumothorax. "
                   "The cardiac silhouette is normal in size. Impression: No acute cardiopulmonary process.")


def test_mimic_box_outside_image(tmp_path):
    root, boxes = _mimic(tmp_path, box=(10, 8, 70, 60))  # x2 = 70 > width 64
    with pytest.raises(MimicError) as err:
        list(iter_studies(root, boxes))
    msg = str(err.value)
    assert "boxes.json" in msg and "record 02aa804e-bde0afdd" in msg and "box within image bounds" in msg


def test_mimic_non_utf8_report(tmp_path):
    root, boxes = _mimic(tmp_path, report=REPORT.encode("utf-8").replace(b"cough", b"coug\xe9"))
    with pytest.raises(MimicError, match="s50414267.txt .*report file is UTF-8"):
        list(iter_studies(root, boxes))


def test_materialize_with_mimic(root, params, tmp_path):
    mroot, boxes = _mimic(tmp_path)
    p = params.merged({"materialize": {"tasks": ALL_TASKS, "mimic": {"root": str(mroot), "boxes": str(boxes)}}})
    summary = materialize(root, tmp_path / "ins", p)
    assert summary["records_by_source"]["mimic"] > 0
    meta = {**json.loads((tmp_path / "ins" / "meta_file.json").read_text()),
            **json.loads((tmp_path / "ins" / "meta_test.json").read_text())}
    assert metafile.resolve(tmp_path / "ins" / "meta_file.json", meta["grounded_en_mimic"]["root"]).resolve() \
        == mroot.resolve()


def test_cli_generate_uses_build_default(tmp_path, params):
    import yaml
    from typer.testing import CliRunner

    from cli import app

    p = {"data": params.merged({"data": {"patients_per_modality": 1}}).data.model_dump(mode="json")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, allow_unicode=True))
    result = CliRunner().invoke(app, ["generate", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    datasets = {s.dataset for s in iter_samples(tmp_path / "d")}
    assert {CT_DATASET, MR_DATASET} <= datasets
    assert len(read_reports(tmp_path / "d")) == len(list(iter_samples(tmp_path / "d")))
