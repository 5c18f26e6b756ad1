"""Region-to-Text metrics (SPEC §6, paper Table 1): BLEU-1, token F1, token recall,
accuracy (token recall >= 0.75) and a strict name match through the vocabulary table.

Tokens: English is lower-cased, punctuation-stripped and split on whitespace; Chinese is
split into characters (a Chinese structure name is a handful of characters with no
spaces, so words would make every near-miss a total miss), with runs of Latin letters or
digits inside Chinese text ("CT", "T2") kept as one token. All figures are in 0..1.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter


from sacrebleu.metrics import BLEU

from medrega.grammar import CJK, detect_lang
from medrega.vocab import names_match

ACCURACY_RECALL = 0.75

_ZH_TOKEN = re.compile(f"[{CJK}]|[a-z0-9]+")
_EN_TOKEN = re.compile(r"[a-z0-9]+")

# sacrebleu's own tokenizers: '13a' for English, 'zh' (splits CJK characters) for Chinese.
# effective_order avoids a zero score on one-word answers; it is moot at order 1 anyway.
_BLEU1 = {
    "en": BLEU(max_ngram_order=1, tokenize="13a", lowercase=True, effective_order=True),
    "zh": BLEU(max_ngram_order=1, tokenize="zh", lowercase=True, effective_order=True),
}


def tokens(text: str, lang: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text or "").lower()
    return (_ZH_TOKEN if lang == "zh" else _EN_TOKEN).findall(text)


def bleu1(prediction: str, reference: str, lang: str) -> float:
    if not (prediction or "").strip() or not (reference or "").strip():
        return 0.0
    bleu = _BLEU1["zh" if lang == "zh" else "en"]
    return bleu.sentence_score(prediction, [reference]).score / 100.0


def token_scores(prediction: str, reference: str, lang: str) -> dict:
    """Bag-of-tokens precision/recall/F1 of a prediction against one reference."""
    p, r = tokens(prediction, lang), tokens(reference, lang)
    common = sum((Counter(p) & Counter(r)).values())
    precision = common / len(p) if p else 0.0
    recall = common / len(r) if r else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"token_precision": precision, "token_recall": recall, "token_f1": f1}


def score_text(prediction: str, reference: str, lang: str | None = None) -> dict:
    """Every R2T figure for one answer; `lang` defaults to what the reference is written in."""
    lang = lang or detect_lang(reference)
    prediction = prediction if isinstance(prediction, str) else ""
    out = token_scores(prediction, reference, lang)
    out["bleu1"] = bleu1(prediction, reference, lang)
    out["accuracy"] = float(out["token_recall"] >= ACCURACY_RECALL)
    out["name_accuracy"] = float(bool(prediction.strip()) and names_match(prediction, reference))
    return out


METRIC_KEYS = ("bleu1", "token_f1", "token_recall", "accuracy", "name_accuracy")


def aggregate(samples: list[dict]) -> dict:
    n = len(samples)
    out = {"n": n}
    for key in METRIC_KEYS:
        out[key] = sum(s[key] for s in samples) / n if n else 0.0
    return out
