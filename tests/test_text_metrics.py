"""Region-to-Text metrics, expected values computed by hand."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medrega.grammar import detect_lang
from medrega.metrics.scoring import score_answers
from medrega.metrics.text import bleu1, score_text, token_scores, tokens


def score_r2t(items):
    """The Region-to-Text block of what the evaluate stage and `medrega score` compute."""
    return score_answers(items, "r2t")["r2t"]


def test_english_tokens_are_normalised_words():
    assert tokens("The Left-Ventricle.", "en") == ["the", "left", "ventricle"]


def test_chinese_tokens_are_characters_with_latin_runs_whole():
    assert tokens("左心室", "zh") == ["左", "心", "室"]
    assert tokens("CT示左肾。", "zh") == ["ct", "示", "左", "肾"]


def test_detect_lang():
    assert detect_lang("左肾") == "zh" and detect_lang("left kidney") == "en"


def test_token_scores_english():
    # pred 3 tokens, ref 2, overlap 2: P = 2/3, R = 1, F1 = 2*(2/3)/(5/3) = 0.8
    s = token_scores("left ventricle wall", "left ventricle", "en")
    assert s["token_precision"] == pytest.approx(2 / 3)
    assert s["token_recall"] == 1.0
    assert s["token_f1"] == pytest.approx(0.8)


def test_token_scores_count_repeats_once_each():
    # pred "liver liver" vs ref "liver": overlap min(2, 1) = 1 -> P = 1/2, R = 1
    s = token_scores("liver liver", "liver", "en")
    assert s["token_precision"] == 0.5 and s["token_recall"] == 1.0


def test_token_scores_chinese():
    # 左心 vs 左心室: overlap 2 chars, P = 1, R = 2/3, F1 = 2*(2/3)/(5/3) = 0.8
    s = token_scores("左心", "左心室", "zh")
    assert s["token_precision"] == 1.0
    assert s["token_recall"] == pytest.approx(2 / 3)
    assert s["token_f1"] == pytest.approx(0.8)


def test_accuracy_is_recall_at_least_three_quarters():
    # 3 of 4 reference words: recall exactly 0.75 -> counts as correct
    assert score_text("right upper lobe", "right upper lobe nodule", "en")["accuracy"] == 1.0
    # 2 of 3 characters: 0.667 < 0.75
    assert score_text("左心", "左心室", "zh")["accuracy"] == 0.0


def test_bleu1_hand_computed():
    # unigram precision 2/3, hypothesis longer than reference so BP = 1
    assert bleu1("left ventricle wall", "left ventricle", "en") == pytest.approx(2 / 3)
    # precision 1, hyp 1 word vs ref 2: BP = exp(1 - 2/1) = e^-1
    assert bleu1("ventricle", "left ventricle", "en") == pytest.approx(math.exp(-1))
    # Chinese split into characters by the zh tokenizer: precision 1, BP = exp(1 - 3/2)
    assert bleu1("左心", "左心室", "zh") == pytest.approx(math.exp(-0.5))
    # case does not matter
    assert bleu1("Left Ventricle", "left ventricle", "en") == pytest.approx(1.0)
    assert bleu1("", "left ventricle", "en") == 0.0


def test_name_accuracy_uses_vocabulary():
    assert score_text("LV", "left ventricle", "en")["name_accuracy"] == 1.0
    assert score_text("左心室", "left ventricle", "en")["name_accuracy"] == 1.0
    assert score_text("right ventricle", "left ventricle", "en")["name_accuracy"] == 0.0
    assert score_text("", "", "en")["name_accuracy"] == 0.0


def test_empty_or_missing_prediction_scores_zero():
    for pred in ("", None, "   "):
        s = score_text(pred, "left kidney", "en")
        assert all(s[k] == 0.0 for k in ("bleu1", "token_f1", "token_recall", "accuracy", "name_accuracy"))


def test_score_r2t_macro_and_breakdown():
    items = [
        # perfect: every figure 1
        {"prediction": "left kidney", "ground_truth": "left kidney", "lang": "en", "modality": "ct"},
        # wrong: no shared token, every figure 0
        {"prediction": "spleen", "ground_truth": "liver", "lang": "en", "modality": "mr"},
        # 左心 vs 左心室: bleu1 e^-0.5, F1 0.8, recall 2/3, accuracy 0, name 0; lang inferred as zh
        {"prediction": "左心", "ground_truth": "左心室", "modality": "mr"},
    ]
    r = score_r2t(items)
    assert r["n"] == 3
    assert r["bleu1"] == pytest.approx((1 + 0 + math.exp(-0.5)) / 3)
    assert r["token_f1"] == pytest.approx((1 + 0 + 0.8) / 3)
    assert r["token_recall"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert r["accuracy"] == pytest.approx(1 / 3)
    assert r["name_accuracy"] == pytest.approx(1 / 3)
    assert r["by"]["by_lang"]["en"]["n"] == 2
    assert r["by"]["by_lang"]["en"]["accuracy"] == pytest.approx(0.5)
    assert r["by"]["by_lang"]["zh"]["token_f1"] == pytest.approx(0.8)
    assert r["by"]["by_modality"]["mr"]["n"] == 2
    assert r["by"]["by_modality"]["ct"]["bleu1"] == pytest.approx(1.0)


def test_score_r2t_empty_is_an_error():
    from medrega.errors import BadInput

    with pytest.raises(BadInput, match="no r2t answers"):
        score_r2t([])


words = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8), min_size=1, max_size=6).map(" ".join)
zh_text = st.text(alphabet="左右心室肝脏肾肺脾胰腺", min_size=1, max_size=8)


@settings(max_examples=100)
@given(st.one_of(words, zh_text))
def test_identical_answer_scores_one(text):
    s = score_text(text, text)
    for k in ("bleu1", "token_f1", "token_recall", "accuracy", "name_accuracy"):
        assert s[k] == pytest.approx(1.0), k


@settings(max_examples=100)
@given(st.one_of(words, zh_text), st.one_of(words, zh_text))
def test_scores_bounded(pred, ref):
    s = score_text(pred, ref)
    for k in ("bleu1", "token_f1", "token_recall", "accuracy", "name_accuracy"):
        assert 0.0 <= s[k] <= 1.0 + 1e-9, k
