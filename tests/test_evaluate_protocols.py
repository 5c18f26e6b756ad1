"""The evaluate stage gives the authors' released protocol's figures beside ours (issue 15): in
metrics.json under `release`, in the MLflow run as `release/...`, in the model card; and every
table of report.html names the protocol that made it. The model is a stand-in that answers from
a script (the stage's generation is tested elsewhere): what is checked is where figures go."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tasks.evaluate as ev
from medrega.grammar import format_regions
from medrega.metrics import release as R
from tasks.register import flat_metrics, model_card, release_metrics
from tests.conftest import tiny

LIVER = format_regions([("liver", [[100, 100, 500, 600]])])
BOTH = format_regions([("liver", [[100, 100, 500, 600]]), ("spleen", [[600, 100, 900, 400]])])
# (task, lang, setting, ground truth, the stand-in model's answer)
SCRIPT = [("t2r", "en", "SS", LIVER, LIVER), ("t2r", "zh", "SS", LIVER, format_regions([("liver", [[0, 0, 50, 50]])])),
          ("t2r", "en", "MS", BOTH, BOTH), ("r2t", "en", None, "left kidney", "left kidney"),
          ("r2t", "zh", None, "肝脏", "脾脏"), ("grounded", "en", None, LIVER + ": normal.", LIVER + ": normal.")]


class ScriptedGenerator:
    """Answers each query with the SCRIPT's answer for it (queries come in item order)."""

    @classmethod
    def from_pretrained(cls, model_dir, dtype="float32", device_map=None):  # Generator's signature
        return cls()

    def generate(self, queries, batch_size=16, max_new_tokens=64):
        return [answer for *_, answer in SCRIPT][: len(queries)]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluate run for the module (an MLflow store takes seconds to create)."""
    tmp_path = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _evaluate(tmp_path, monkeypatch)


def _evaluate(tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    image = tmp_path / "scan.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(image)
    items = [{"id": f"{task}-{i}", "image": str(image), "question": "<image>\nWhere?", "base_prompt": None,
              "ground_truth": truth, "width": 999, "height": 999, "task": task, "lang": lang, "modality": "ct",
              "setting": setting, "answer_type": None} for i, (task, lang, setting, truth, _) in enumerate(SCRIPT)]
    monkeypatch.setattr(ev, "test_items", lambda *args, **kw: [dict(i) for i in items])
    monkeypatch.setattr(ev, "Generator", ScriptedGenerator)
    monkeypatch.setattr(ev, "find_wordnet", lambda *_: None)  # METEOR is not what is checked here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MEDREGA_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.delenv("MEDREGA_PARENT_RUN_ID", raising=False)
    out = tmp_path / "eval"
    cfg = tiny({"evaluate": {"tasks": ["r2t", "t2r", "grounded"], "gallery": 0}})
    flat = ev.evaluate(tmp_path / "instructions", tmp_path / "model", out, cfg)
    return out, flat


def test_metrics_json_holds_the_release_figures_under_their_own_key(evaluated):
    out, flat = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(flat))
    release = metrics["release"]
    # per task and setting (or language), in the authors' key names, numbers only
    assert set(release) == {"t2r", "r2t"}  # they ship no grounded-report evaluator
    assert set(release["t2r"]) == {"SS", "MS"} and set(release["r2t"]) == {"en", "zh"}
    assert set(release["t2r"]["SS"]) == {*R.KEYS["SS"], "n"} and set(release["t2r"]["MS"]) == {*R.KEYS["MS"], "n"}
    assert {"bleu1", "F1", "recall", "accuracy", "n"} <= set(release["r2t"]["en"])
    assert release["t2r"]["SS"]["n"] == 2 and release["t2r"]["SS"]["acc50"] == 0.5  # one right, one wrong
    assert release["r2t"]["en"]["accuracy"] == 1.0 and release["r2t"]["zh"]["accuracy"] == 0.0
    # the same numbers as the full block in breakdown.json; ours untouched beside them
    block = json.loads((out / "breakdown.json").read_text())["release"]
    assert release == R.release_headline(block)
    assert {"t2r", "r2t", "grounded"} <= set(metrics) and "region_f1" in metrics["t2r"]
    assert not any(isinstance(v, dict) for task in ("t2r", "r2t") for v in metrics[task].values())


def test_mlflow_run_logs_release_figures_prefixed(evaluated):
    import mlflow

    out, flat = evaluated
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("medrega").experiment_id])
    logged = run.data.metrics
    assert logged["release/t2r/SS/acc50"] == flat["release"]["t2r"]["SS"]["acc50"]
    assert logged["release/r2t/zh/accuracy"] == 0.0 and logged["release/t2r/MS/f1"] == flat["release"]["t2r"]["MS"]["f1"]
    assert logged["t2r/region_f1"] == flat["t2r"]["region_f1"]  # ours, unprefixed
    theirs = {k for k in logged if k.startswith("release/")}
    assert len(theirs) == sum(len(f) for subs in flat["release"].values() for f in subs.values())


def test_every_report_table_names_its_protocol(evaluated):
    out, _ = evaluated
    page = (out / "report.html").read_text(encoding="utf-8")
    tables = re.findall(r"<table>(.*?)</table>", page, re.S)
    captions = [re.match(r"<caption>(.*?)</caption>", t) for t in tables]
    assert tables and all(captions)
    kinds = [c.group(1).split(" (")[0] for c in captions]
    assert set(kinds) == {"protocol: medrega", "protocol: release"}
    assert kinds.count("protocol: release") == 4  # t2r SS, t2r MS, r2t en, r2t zh: one script each
    assert "grounded: not computed: the authors ship no grounded-report evaluator" in page
    assert "regt2r/evaluate_regt2r_sm.py" in page  # our MS is their region-first "sm" script


def test_model_card_has_a_release_section(evaluated):
    out, flat = evaluated
    card = model_card(tiny(), {"t2r.region_f1": flat["t2r"]["region_f1"]}, {"git_commit": "x"}, None,
                      release_metrics(out))
    ours = card.index("## Evaluation (protocol `medrega`")
    theirs = card.index("## Evaluation under the authors' released evaluators (protocol `release`)")
    assert ours < theirs < card.index("## Known limits")
    section = card[theirs:card.index("## Known limits")]
    assert "### t2r · SS" in section and "| acc25 | acc50 | acc75 | iou | n |" in section
    assert "### r2t · zh" in section and "region_f1" not in section
    empty = model_card(tiny(), {}, {}, None, {})
    assert "(not computed for this evaluation)" in empty
    # the registry's tags and the promotion gate read ours only: no release figure among them
    ours = flat_metrics(out)
    assert ours["t2r.region_f1"] == flat["t2r"]["region_f1"] and not any(k.startswith("release") for k in ours)
