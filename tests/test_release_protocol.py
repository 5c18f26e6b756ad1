"""The authors' released evaluation protocol (`--protocol release`) beside ours (SPEC §6).

Every expected value is worked out by hand from the rules in docs/evaluation-protocols.md (the
authors' scripts' behaviour), and each documented defect has its own case. Boxes are on a
999 x 999 image unless said otherwise: there v / 999 * 999 is exact in float32 for every grid
integer (checked below), so pixel coordinates equal the grid values.
"""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli import app
from medrega.metrics import release as R
from medrega.metrics.region import read_answers
from medrega.metrics.scoring import score_answers
from medrega.grammar import parse_answer_regions


def score_t2r(items, **options):
    """The Text-to-Region block of our protocol, as the evaluate stage and `medrega score` compute it."""
    return score_answers(items, "t2r", **options)["t2r"]

HW = [999, 999]


def rec(answer, gt, hw=HW):
    return {"answer": answer, "gt": gt, "hw": hw}


def item(prediction, truth, setting, **kw):
    return {"prediction": prediction, "ground_truth": truth, "width": 999, "height": 999, "setting": setting, **kw}


def write_array(path, records):
    # one JSON array, pretty-printed over many lines, as their inference writes it
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


# --- float32 arithmetic, checked against torch doing the same operations --------------------

def torch_iou(pred, gt, w, h):
    """An independent float32 oracle: their box scaling and torchvision-style IoU in torch."""
    def scale(b):
        t = torch.tensor(b, dtype=torch.float32).view(-1, 4) / 999
        t[:, 0::2] *= w
        t[:, 1::2] *= h
        return t
    p, g = scale(pred), scale(gt)
    area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
    area_g = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
    lt = torch.max(p[:, None, :2], g[:, :2])
    rb = torch.min(p[:, None, 2:], g[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    return (inter / (area_p[:, None] + area_g - inter)).double().numpy()


box = st.tuples(st.integers(0, 998), st.integers(0, 998), st.integers(1, 999), st.integers(1, 999)).map(
    lambda b: [min(b[0], b[2] - 1), min(b[1], b[3] - 1), b[2], b[3]])


@settings(max_examples=300, deadline=None)
@given(p=st.lists(box, min_size=1, max_size=3), g=st.lists(box, min_size=1, max_size=3),
       w=st.integers(1, 4096), h=st.integers(1, 4096))
def test_float32_iou_equals_torch(p, g, w, h):
    ours = R.iou_matrix32(R.scale_boxes(p, w, h), R.scale_boxes(g, w, h))
    assert np.array_equal(ours, torch_iou(p, g, w, h))


def test_grid_scaling_is_exact_on_a_999_image():
    v = np.arange(1000)
    assert np.array_equal(R.scale_boxes(np.stack([v, v, v, v], 1).tolist(), 999, 999)[:, 0], v.astype(np.float32))


# --- Text-to-Region, each documented behaviour ------------------------------------------------

GT_TWO_BOXES = "<ref>liver</ref><box>[[0, 0, 100, 100], [200, 200, 300, 300]]</box>"


def test_perfect_two_box_answer_scores_half_object_accuracy_in_their_sm_script():
    answer = GT_TWO_BOXES  # a perfect answer: one object, two boxes
    r = R.t2r_sm([rec(answer, GT_TWO_BOXES)])
    # pairs (0,0) and (1,1), IoU 1 each. Names are kept per box LIST (one), so only pair (0,0)
    # is looked at: named = aligned = 1 of 2 ground-truth boxes.
    assert r == {"box_acc": 1.0, "box_iou": 1.0, "object_acc": 0.5, "object_iou": 1.0, "object_box_acc": 0.5,
                 "object_box_alignment": 0.5, "object_box_detection": 1.0}
    ours = score_t2r([item(answer, GT_TWO_BOXES, "SM")])
    assert ours["object_recall"] == 1.0 and ours["align_f1"] == 1.0


def test_iou_exactly_half_fails_their_strict_threshold_and_passes_ours():
    gt = "<ref>liver</ref><box>[[0, 0, 100, 200]]</box>"
    answer = "<ref>liver</ref><box>[[0, 0, 100, 100]]</box>"
    # 100 x 100 inside 100 x 200: IoU 10000 / 20000 = 0.5, exact in float32
    assert torch_iou([[0, 0, 100, 100]], [[0, 0, 100, 200]], 999, 999)[0, 0] == 0.5
    assert R.t2r_ss([rec(answer, gt)]) == {"acc25": 1.0, "acc50": 0.0, "acc75": 0.0, "iou": 0.5}
    ours = score_t2r([item(answer, gt, "SS")])
    assert ours["acc@0.5"] == 1.0 and ours["region_f1"] == 1.0  # IoU >= 0.5, inclusive


@pytest.mark.parametrize("a, above", [(15, True), (29, False)])
def test_a_true_half_iou_falls_either_way_in_float32(a, above):
    # On a 512 x 512 image a box half as wide as the truth has a true IoU of exactly 1/2; in
    # float32 it comes out one unit in the last place above (0.5 + 2**-24) or below (0.5 - 2**-25).
    p, g = [[0, 0, a, 100]], [[0, 0, 2 * a, 100]]
    v = torch_iou(p, g, 512, 512)[0, 0]
    assert v == (0.5 + 2 ** -24 if above else 0.5 - 2 ** -25)
    r = R.t2r_ss([rec(f"[[0, 0, {a}, 100]]", f"<ref>x</ref><box>[[0, 0, {2 * a}, 100]]</box>", [512, 512])])
    assert r["acc50"] == (1.0 if above else 0.0)
    ours = score_t2r([{**item(f"<ref>x</ref><box>[[0, 0, {a}, 100]]</box>",
                              f"<ref>x</ref><box>[[0, 0, {2 * a}, 100]]</box>", "SS"), "width": 512, "height": 512}])
    assert ours["acc@0.5"] == 1.0  # ours: exact IoU on the grid, 0.5 >= 0.5 either way


def test_sentence_before_the_tag_names_the_box_in_theirs_not_in_ours():
    gt = "<ref>duodenum</ref><box>[[0, 0, 100, 100]]</box>"
    answer = "the duodenum is probably <ref>aorta</ref><box>[[0, 0, 100, 100]]</box>"
    # their name is the raw text before the list, "the duodenum is probably <ref>aorta</ref><box>",
    # which contains "duodenum": an object hit
    assert R.read_release_answer(answer).group_names == ["the duodenum is probably <ref>aorta</ref><box>"]
    r = R.t2r_mm([rec(answer, gt)])
    assert r["object_pre"] == 1.0 and r["object_box_pre"] == 1.0
    ours = score_t2r([item(answer, gt, "MM")])
    assert ours["object_f1"] == 0.0 and ours["region_f1"] == 1.0  # ours: the box is named aorta


def test_unnamed_box_matches_any_object_in_theirs():
    gt = "<ref>liver</ref><box>[[0, 0, 100, 100]]</box>, <ref>spleen</ref><box>[[200, 200, 300, 300]]</box>"
    bare = "[[0, 0, 100, 100]][[200, 200, 300, 300]]"  # two lists, each with an empty name
    r = R.t2r_mm([rec(bare, gt)])
    assert r["object_pre"] == 1.0 and r["object_rec"] == 1.0 and r["object_box_f1"] == 1.0
    assert score_t2r([item(bare, gt, "MM")])["object_f1"] == 0.0  # ours: an unnamed box names nothing
    # a <box> without a <ref> is not unnamed for them: its name is the text "<box>"
    tagged = "<box>[[0, 0, 100, 100]]</box>"
    assert R.t2r_mm([rec(tagged, "<ref>liver</ref><box>[[0, 0, 100, 100]]</box>")])["object_pre"] == 0.0


def test_null_answer_is_a_zero_box_in_ss_and_stops_their_mm_script():
    gt = "<ref>liver</ref><box>[[0, 0, 100, 100]]</box>"
    records = [rec(gt, gt), rec(None, gt)]
    assert R.t2r_ss(records) == {"acc25": 0.5, "acc50": 0.5, "acc75": 0.5, "iou": 0.5}
    # MS: the zero box is one prediction matched at IoU 0: precision (hits / M) 0, recall 0
    assert R.t2r_ms(records) == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "iou": 0.5}
    with pytest.raises(R.ReleaseError, match="MM script stops"):
        R.t2r_mm(records)
    assert "not_computed" in R.release_figures([item(None, gt, "MM")], "t2r", "MM")
    ours = score_t2r([item(gt, gt, "MM"), item(None, gt, "MM")])
    assert ours["parse_failures"] == 1 and ours["align_f1"] == 0.5


def test_text_without_a_box_list_gives_no_box_not_a_zero_box():
    assert R.read_release_answer("I cannot tell") == R.ReleaseAnswer()
    assert R.read_release_answer(None).zero_box
    # a list their literal_eval rejects (full-width digits): fallback after the lists before it
    a = R.read_release_answer("liver[[1, 2, 3, 4]], spleen[[１, 2, 3, 4]]")
    assert a.boxes == [[1, 2, 3, 4]] and a.zero_box


def test_their_ms_script_ignores_names_uses_075_and_swaps_precision_and_recall():
    gt = "<ref>liver</ref><box>[[0, 0, 100, 100]]</box>, <ref>spleen</ref><box>[[200, 0, 300, 100]]</box>"
    # liver box exact but named "kidney"; spleen box at IoU 0.6; a third box far away
    answer = "kidney[[0, 0, 100, 100]], spleen[[200, 0, 300, 60]], heart[[500, 500, 600, 600]]"
    r = R.t2r_ms([rec(answer, gt)])
    # hits at IoU >= 0.75: 1 of M = 2 truths, N = 3 predictions
    assert r["precision"] == pytest.approx(1 / 2)   # hits / M: the standard recall
    assert r["recall"] == pytest.approx(1 / 3)      # hits / N: the standard precision
    assert r["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert r["iou"] == pytest.approx((1 + 0.6) / 2)  # over the 2 matched pairs, not the truths
    ours = score_t2r([item(answer, gt, "MS")])  # ours: IoU >= 0.5, names count, standard meanings
    assert ours["object_precision"] == pytest.approx(1 / 3) and ours["untagged_answers"] == 1
    assert ours["region_precision"] == pytest.approx(2 / 3) and ours["region_recall"] == pytest.approx(1.0)


def test_their_ss_script_compares_only_the_first_boxes_unless_there_are_more_predictions():
    gt = "<ref>liver</ref><box>[[0, 0, 100, 100]]</box>"
    two = "liver[[500, 500, 600, 600]], liver[[0, 0, 100, 100]]"
    assert R.t2r_ss([rec(two, gt)])["iou"] == 1.0  # 2 > 1 predictions: the best against the first truth
    gt2 = "<ref>liver</ref><box>[[0, 0, 100, 100], [200, 200, 300, 300]]</box>"
    swapped = "liver[[200, 200, 300, 300], [0, 0, 100, 100]]"
    assert R.t2r_ss([rec(swapped, gt2)])["iou"] == 0.0  # 2 = 2: first prediction vs first truth only
    ours = score_t2r([item(swapped, gt2, "SS")])
    assert ours["acc@0.75"] == 1.0 and ours["mean_iou"] == 1.0  # Hungarian matching: both boxes found


def test_settings_map_to_their_region_first_script_names():
    assert R.SCRIPTS == {"SS": "regt2r/evaluate_regt2r_ss.py", "SM": "regt2r/evaluate_regt2r_ms.py",
                         "MS": "regt2r/evaluate_regt2r_sm.py", "MM": "regt2r/evaluate_regt2r_mm.py"}
    assert tuple(R.t2r_mm([rec(GT_TWO_BOXES, GT_TWO_BOXES)])) == R.KEYS["MM"]
    assert tuple(R.t2r_sm([rec(GT_TWO_BOXES, GT_TWO_BOXES)])) == R.KEYS["SM"]


def test_ground_truth_without_a_box_stops_their_scripts():
    with pytest.raises(R.ReleaseError, match="record 1"):
        R.t2r_ss([rec("liver[[0, 0, 1, 1]]", "liver")])
    with pytest.raises(R.ReleaseError, match="hw"):
        R.t2r_ss([{"answer": "x", "gt": "<ref>a</ref><box>[[0, 0, 1, 1]]</box>"}])


# --- our protocol reads their files and their tagless answers ---------------------------------

def test_tagless_answers_are_read_by_ours_and_counted_apart():
    a = parse_answer_regions("liver[[0, 0, 100, 100]], spleen[[200, 200, 300, 300]]")
    assert a.untagged and a.ok and a.regions == [("liver", [0, 0, 100, 100]), ("spleen", [200, 200, 300, 300])]
    zh = "<ref>胰腺癌</ref><box>[[690, 472, 735, 511]]</box>"
    r = score_t2r([item("胰腺癌[[690, 472, 735, 511]]", zh, "SS"), item(zh, zh, "SS")])
    assert r["untagged_answers"] == 1 and r["parse_failures"] == 0 and r["align_f1"] == 1.0
    # a tagged answer never falls back to bare lists
    assert not parse_answer_regions("<box>[[1, 2, 3]]</box> liver[[0, 0, 1, 1]]").untagged


def test_acc_is_reported_per_setting_with_ss_as_headline():
    gt = "<ref>liver</ref><box>[[0, 0, 100, 100]]</box>"
    half = "<ref>liver</ref><box>[[0, 0, 50, 100]]</box>"
    r = score_t2r([item(gt, gt, "SS"), item(half, gt, "SS"), item(gt, gt, "SM"), item(gt, gt, "SM")])
    assert r["acc_scope"] == "SS" and r["acc_n"] == 2
    assert r["acc@0.75"] == 0.5  # SS only: 1 of 2 (pooled it would be 3 of 4)
    assert r["by"]["by_setting"]["SM"]["acc@0.75"] == 1.0 and r["by"]["by_setting"]["SM"]["acc_scope"] == "SM"


def test_reading_their_json_array_names_file_and_line(tmp_path):
    gt = "<ref>liver</ref><box>[[0, 0, 100, 100]]</box>"
    path = write_array(tmp_path / "liver_regt2r_ss.json", [rec("liver[[0, 0, 100, 100]]", gt), rec("x", gt)])
    items = read_answers(path, "medrega")
    # indent=2: "[" on line 1, the first record on lines 2-9 (its hw list spans 4 lines), the second from 10
    assert [i["_where"] for i in items] == [f"{path}:2", f"{path}:10"]
    assert items[0]["height"] == 999 and items[0]["prediction"] == "liver[[0, 0, 100, 100]]"
    bad = write_array(tmp_path / "bad.json", [rec("x", gt), {"answer": "x", "gt": gt, "hw": "999"}])
    with pytest.raises(ValueError, match=rf"{bad}:10: \"hw\" must be \[H, W\]"):
        read_answers(bad, "medrega")


@pytest.mark.parametrize("text, message", [
    ("", "empty answers file"), ("  \n\n", "empty answers file"), ("[]", "empty JSON array"),
    ('{"prediction": "a", "ground_truth": "b"}\n\n{"prediction": "a", "ground_truth": \n', r":3: not valid JSON"),
    ('[\n {"answer": "a", "gt": "b", "hw": [1, 1]},\n {"answer": }\n]', r":3: not valid JSON"),
])
def test_bad_or_empty_files_name_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "answers.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}{message}" if message.startswith(":") else message):
        read_answers(path, "medrega" if text.startswith("[") else "native")


def test_scoring_errors_name_the_record(tmp_path):
    path = tmp_path / "a.jsonl"
    ok = {"task": "t2r", "prediction": "x", "ground_truth": "<ref>a</ref><box>[[0, 0, 1, 1]]</box>", "width": 9,
          "height": 9}
    path.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "width": None}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: width and height are required"):
        score_answers(read_answers(path), "t2r")
    with pytest.raises(ValueError, match="no r2t answers"):
        score_answers(read_answers(path), "r2t")


# --- the command line -----------------------------------------------------------------------------

def test_cli_release_and_ours_on_the_same_file(tmp_path):
    gt = "<ref>liver</ref><box>[[0, 0, 100, 200]]</box>"
    path = write_array(tmp_path / "abd_regt2r_ss.json",
                       [rec("liver[[0, 0, 100, 100]]", gt), rec("liver[[0, 0, 100, 200]]", gt), rec(None, gt)])
    out = tmp_path / "release.json"
    r = CliRunner().invoke(app, ["score", str(path), "--task", "t2r", "--protocol", "release", "--setting", "SS",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    got = json.loads(out.read_text())
    assert got["protocol"] == "release" and got["script"].endswith("evaluate_regt2r_ss.py")
    # IoUs 0.5 (exact), 1, 0 (null -> zero box): > 0.25: 2, > 0.5: 1, > 0.75: 1; mean 0.5
    assert got["release"] == {"acc25": 0.6667, "acc50": 0.3333, "acc75": 0.3333, "iou": 0.5}
    ours_out = tmp_path / "ours.json"
    r = CliRunner().invoke(app, ["score", str(path), "--task", "t2r", "--format", "medrega", "--setting", "SS",
                                 "--out", str(ours_out)])
    assert r.exit_code == 0, r.output
    ours = json.loads(ours_out.read_text())
    assert ours["protocol"] == "medrega" and ours["t2r"]["protocol"] == "medrega"
    t2r = ours["t2r"]
    assert t2r["untagged_answers"] == 2 and t2r["parse_failures"] == 1
    assert t2r["acc@0.5"] == pytest.approx(2 / 3) and t2r["acc_scope"] == "SS"


def test_cli_several_files_are_merged_for_t2r(tmp_path):
    gt = "<ref>liver</ref><box>[[0, 0, 100, 100]]</box>"
    a = write_array(tmp_path / "a_regt2r.json", [rec("liver[[0, 0, 100, 100]]", gt)])
    b = write_array(tmp_path / "b_regt2r.json", [rec("nothing", gt)])
    out = tmp_path / "m.json"
    r = CliRunner().invoke(app, ["score", str(a), str(b), "--task", "t2r", "--protocol", "release", "--setting", "SS",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["release"]["acc50"] == 0.5


@pytest.mark.parametrize("args, message", [
    (["--task", "t2r", "--protocol", "release"], "needs --setting"),
    (["--protocol", "release"], "needs --task"),
    (["--task", "grounded", "--protocol", "release"], "no grounded-report evaluator"),
    (["--task", "t2r", "--protocol", "release", "--setting", "XS"], "--setting must be"),
])
def test_cli_release_bad_options_exit_3(tmp_path, args, message):
    path = write_array(tmp_path / "a.json", [rec("x", "<ref>a</ref><box>[[0, 0, 1, 1]]</box>")])
    r = CliRunner().invoke(app, ["score", str(path), *args, "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 3 and message in " ".join(r.output.split())


def test_cli_empty_file_exits_3(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    r = CliRunner().invoke(app, ["score", str(path), "--task", "t2r", "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 3 and "empty answers file" in r.output


# --- the other tasks ---------------------------------------------------------------------------------

def test_r2t_release_hand_computed():
    records = [{"pred_answer": "Left Kidney[[1, 2, 3, 4]]", "gt_answer": "left kidney"},
               {"pred_answer": "the right kidney", "gt_answer": "left kidney"}]
    r = R.r2t(records)
    # 1: boxes removed, {left, kidney} both ways: P = R = 1, F1 = 2 / (2 + 1e-8), BLEU-1 1, accurate
    # 2: {the, right, kidney} vs {left, kidney}: P 1/3, R 1/2; BLEU-1 1/3 (3 words > 2: no penalty)
    f1_2 = 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2 + 1e-8)
    assert r["F1"] == pytest.approx((2 / (2 + 1e-8) + f1_2) / 2, abs=1e-12)
    assert r["recall"] == pytest.approx(0.75) and r["accuracy"] == 0.5
    assert r["bleu1"] == pytest.approx((1 + 1 / 3) / 2, rel=1e-6)  # float32
    assert r["bertscore"] == R.BERTSCORE_NOT_COMPUTED


def test_bleu1_brevity_penalty_float32():
    # 1 word of 1 matches, reference 2 words: exp(1 - 2/1) = e**-1
    assert R.bleu1_f32("kidney", "left kidney") == pytest.approx(np.exp(-1.0), rel=1e-6)
    assert R.bleu1_f32("", "left kidney") == 0.0


def test_vqa_release_english_period_glues_to_the_answer():
    records = [{"pred_answer": "Yes.", "gt_answer": "yes"},   # cleaned to "yes,": misses "yes"
               {"pred_answer": "no", "gt_answer": "No"},      # closed, right
               {"pred_answer": "the liver", "gt_answer": "liver"}]  # open: recall 1
    r = R.vqa(records, "en")
    assert R.clean_vqa("Yes.") == "yes,"
    assert r["closedQuestionsAccuracy"] == 0.5
    assert r["openQuestionsRecall"] == 1.0 and r["openQuestionsAccuracy"] == 1.0
    assert r["recall"] == pytest.approx(2 / 3)


def test_vqa_release_chinese_closed_is_decided_by_the_prediction():
    records = [{"pred_answer": "是", "gt_answer": "是"},      # 是 is not "yes": an open question
               {"pred_answer": "no", "gt_answer": "no"},      # the prediction is "no": closed
               {"pred_answer": "肝脏", "gt_answer": "脾脏"}]
    r = R.vqa(records, "zh")
    assert r["closedQuestionsAccuracy"] == 1.0
    assert r["openQuestionsRecall"] == pytest.approx(0.5) and r["openQuestionsAccuracy"] == 0.5
    assert "BertScore" in r and "bertScore" not in r


def test_vqa_without_open_question_stops_their_script():
    with pytest.raises(R.ReleaseError, match="no open question"):
        R.vqa([{"pred_answer": "yes", "gt_answer": "yes"}], "en")


def test_cls_release_multiclass_and_multilabel():
    classes = R.CLASS_LISTS["isic2016_test"]  # benign, melanoma
    r = R.classification([{"pred_answer": "Melanoma.", "gt_answer": "melanoma"},
                          {"pred_answer": "a benign lesion", "gt_answer": "melanoma"}], classes, False)
    # predictions melanoma, benign; truths melanoma, melanoma: F1 melanoma 2/3, benign 0
    assert r == {"F1-macro": pytest.approx(1 / 3), "Accuracy": 0.5}
    ml = R.classification([{"pred_answer": "edema", "gt_answer": "Edema"}], R.CLASS_LISTS["chexpert_test"], True)
    # every one of the 14 classes counts in the macro average; 13 never seen score 0
    assert ml == {"F1-macro": pytest.approx(1 / 14), "Accuracy": 1.0}
    with pytest.raises(R.ReleaseError, match="not one of the classes"):
        R.classification([{"pred_answer": "x", "gt_answer": "Benign"}], classes, False)


def test_report_release_english_is_corpus_bleu_on_cleaned_text():
    assert R.clean_report_en("Findings: the lungs, clear.\nNo_x effusion") == "findings.the lungs.clear"
    records = [{"pred_answer": "a b", "gt_answer": "a b"}, {"pred_answer": "c d e f", "gt_answer": "c x"}]
    r = R.report(records, "en")
    # corpus BLEU-1: 3 matching words of 6, 6 > 4 reference words: no penalty
    assert r["bleu1"] == pytest.approx(0.5)
    assert r["meteor"].startswith("not computed")
    from medrega.metrics.report import find_wordnet

    same = R.report([{"pred_answer": "the heart is normal", "gt_answer": "The heart is normal."}], "en", find_wordnet())
    # 4 words matched in 1 chunk: F-mean 1, penalty 0.5 * (1/4)**3
    assert same["meteor"] == pytest.approx(1 - 0.5 / 64)
    assert same["bleu1"] == pytest.approx(1.0) and same["rougeL"] == pytest.approx(1.0)


def test_report_release_chinese_scores_rouge_on_latin_tokens_only_and_swaps_the_names():
    # their answer loses its spaces ("b a ct" would be one word "bact"); jieba splits at the commas.
    r = R.report([{"pred_answer": "b，a，ct", "gt_answer": "ct a b"}], "zh")
    # rouge-score's default tokenizer keeps [a-z0-9] runs: ["b", "a", "ct"] vs ["ct", "a", "b"]:
    # ROUGE-1 F 1, ROUGE-L F 1/3 (LCS 1), printed under each other's name
    assert r["rouge1"] == pytest.approx(1 / 3) and r["rougeL"] == pytest.approx(1.0)
    zh = R.report([{"pred_answer": "肝脏未见异常", "gt_answer": "肝脏未见异常"}], "zh")
    assert zh["rouge1"] == 0.0 and zh["rougeL"] == 0.0 and zh["bleu1"] == pytest.approx(1.0)
    assert R.clean_report_zh("1. 肝脏 3.5cm\n2. [[1, 2]]脾脏-正常") == "肝脏 5cm，脾脏正常"


# --- the evaluate stage ----------------------------------------------------------------------------------

def test_release_block_gives_their_figures_beside_ours():
    gt = "<ref>liver</ref><box>[[0, 0, 100, 200]]</box>"
    items = [{**item("<ref>liver</ref><box>[[0, 0, 100, 100]]</box>", gt, "SS"), "task": "t2r", "lang": "en"},
             {**item(gt, gt, "MM"), "task": "t2r"},
             {**item(None, gt, "MM"), "task": "t2r"},
             {"task": "r2t", "lang": "en", "prediction": "left kidney", "ground_truth": "left kidney"},
             {"task": "grounded", "lang": "en", "prediction": "x", "ground_truth": "y"}]
    block = R.release_block(items)
    assert block["protocol"] == "release"
    assert block["t2r"]["SS"]["acc50"] == 0.0 and block["t2r"]["SS"]["n"] == 1
    assert "KeyError" in block["t2r"]["MM"]["not_computed"]
    assert block["r2t"]["en"]["accuracy"] == 1.0
    assert block["grounded"].startswith("not computed")


# --- the public fixture of docs/evaluation-protocols.md ------------------------------------------

FIXTURES = "tests/fixtures/release/"


def test_docs_fixture_ss_both_protocols_hand_computed():
    records = R.read_release_files([FIXTURES + "demo_regt2r_ss.json"], "t2r")[0]
    # their IoUs: 1, 0.5 (exact, fails > 0.5), 0.5 + 2**-24 (passes), 0 (null: zero box), 0 (no box),
    # 0.8, 1, 1 (two predictions for one truth: the best): > .25: 6, > .5: 5, > .75: 4; mean 4.8 / 8
    assert R.t2r_ss(records) == {"acc25": 0.75, "acc50": 0.625, "acc75": 0.5, "iou": 0.6}
    items = read_answers(FIXTURES + "demo_regt2r_ss.json", "medrega")
    ours = score_t2r([{**i, "setting": "SS"} for i in items])
    # ours: the two true halves count (>= 0.5, exact); null and the sentence without a box are failures
    assert ours["acc@0.5"] == 0.75 and ours["acc@0.75"] == 0.5 and ours["mean_iou"] == pytest.approx(0.6)
    assert ours["parse_failures"] == 2 and ours["untagged_answers"] == 4


def test_docs_fixture_their_sm_object_iou_exceeds_one():
    records = R.read_release_files([FIXTURES + "demo_regt2r_ms.json"], "t2r")[0]
    r = R.t2r_sm(records)
    # IoU 1 is summed for pair (0, 0) of the 4 answers with a box list, name or not, but divided by
    # the 3 whose name passes: 4 / 3
    assert r["object_iou"] == pytest.approx(4 / 3)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("[]0123456789, liver<>/refbox:：１")), max_size=60))
def test_both_readers_never_raise_on_model_output(text):
    ours = parse_answer_regions(text)
    assert ours.ok == (bool(ours.regions) and ours.ok)
    theirs = R.read_release_answer(text)
    assert len(theirs.box_names) == len(theirs.boxes)
