"""Per-image bilingual reports next to an SA-Med2D-layout root (`reports.jsonl`), and their reader.

The format follows MIMIC-CXR-JPG (free-text findings and impression per study) joined with
Chest ImaGenome (one sentence per named structure, keyed like its `bbox_name`), in both
languages. One JSON object per line:

    {"image": "images/ct_00--SynthAbdomenCT--patient0002--z_0030.png", "study_id": "...",
     "dataset": "SynthAbdomenCT", "patient": "patient0002", "modality": "ct", "exhaustive": true,
     "findings":   {"en": "The liver is ... A hypodense lesion ...", "zh": "肝脏...肝右叶见低密度灶。"},
     "impression": {"en": "Liver lesion, suspicious for neoplasm.", "zh": "肝脏占位，考虑肿瘤性病变。"},
     "sentences":  {"liver": {"en": "...", "zh": "..."}, "liver_tumor": {"en": "...", "zh": "..."}}}

`exhaustive` says every structure in the image is labelled (true for the synthetic scenes), so
builders may ask "is there an X?" and answer "no". Sentence keys are vocabulary keys (masks'
labels) so a grounded record pairs each sentence with that structure's boxes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from medrega.sources.findings import impression, structure_sentence
from medrega.sources.samed2d import iter_samples, mask_boxes
from medrega.errors import BadInput
from medrega.io import R_JSON_KEYS, DuplicateKey, loads_json, open_atomic

REPORTS_FILE = "reports.jsonl"
LANGS = ("en", "zh")

R_UTF8 = "report file is UTF-8"
R_JSON = "report line is a JSON object"
R_FIELDS = "report has required fields"
R_LANGS = "report text in both languages"
R_UNIQUE = "one report per image"
R_KEYS = R_JSON_KEYS  # one rule name for a repeated key, whichever file it is in


class ReportError(BadInput):
    """A reports file cannot be used; the message names the file, line/record and rule."""

    def __init__(self, path, line: int | None, record: str | None, rule: str, detail: str):
        where = f"{path}" + (f":{line}" if line else "") + (f" (record {record})" if record else "")
        super().__init__(f"{where}: rule '{rule}' failed: {detail}")
        self.path, self.line, self.record, self.rule = str(path), line, record, rule


@dataclass(frozen=True)
class Report:
    """Findings and impression of one image by language, plus one sentence per structure."""

    image: str  # relative to the dataset root, as in the records
    findings: dict[str, str]
    impression: dict[str, str]
    sentences: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> lang -> text
    exhaustive: bool = False
    study_id: str = ""

    def langs(self) -> tuple[str, ...]:
        """Languages with findings and impression (MIMIC reports are English only)."""
        return tuple(l for l in LANGS if self.findings.get(l) and self.impression.get(l))


def _synthetic_datasets() -> set[str]:
    from medrega.sources.synthetic import SCENES

    return {ds for scenes in SCENES.values() for ds, _, _ in scenes}


def report_for(sample, exhaustive: bool, min_pixels: int = 4) -> dict:
    """The reports.jsonl object of one `Sample`, from its labels and their component counts."""
    counts: dict[str, int] = {}
    for region in sample.regions:
        counts[region.label] = counts.get(region.label, 0) + len(mask_boxes(region.mask, min_pixels))
    keys = [k for k, n in counts.items() if n > 0]
    sentences = {}
    for k in keys:
        en, zh = structure_sentence(k, sample.modality, counts[k], exhaustive)
        sentences[k] = {"en": en, "zh": zh}
    imp_en, imp_zh = impression(keys, exhaustive)
    return {
        "image": sample.rel_image, "dataset": sample.dataset, "patient": sample.patient,
        "modality": sample.modality, "exhaustive": exhaustive,
        "study_id": hashlib.sha1(sample.rel_image.encode("utf-8")).hexdigest()[:12],
        "findings": {"en": " ".join(s["en"] for s in sentences.values()),
                     "zh": "".join(s["zh"] for s in sentences.values())},
        "impression": {"en": imp_en, "zh": imp_zh},
        "sentences": sentences,
    }


def write_reports(root: Path, seed: int = 0, min_pixels: int = 4) -> dict:
    """Write `root/reports.jsonl` for every image of the SA-Med2D root (atomic replace).

    The text is a function of the labels alone, so `seed` is recorded only for provenance and
    re-running over the same data gives identical bytes.
    """
    root = Path(root)
    synthetic = _synthetic_datasets()
    n = 0
    # streamed (one line per image of the root), appearing whole with the umask's permissions
    with open_atomic(root / REPORTS_FILE, "w") as fh:
        for sample in iter_samples(root):
            rec = report_for(sample, sample.dataset in synthetic, min_pixels)
            fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return {"file": REPORTS_FILE, "reports": n, "seed": seed}


def _texts(obj, path, line, image, what: str, langs) -> dict[str, str]:
    if not isinstance(obj, dict):
        raise ReportError(path, line, image, R_FIELDS, f"{what} must be an object of language -> text")
    for lang in langs:
        text = obj.get(lang)
        if not isinstance(text, str) or not text.strip():
            raise ReportError(path, line, image, R_LANGS, f"{what}.{lang} is missing or empty")
    return {k: v for k, v in obj.items() if isinstance(v, str)}


def read_reports(root: Path, langs=LANGS) -> dict[str, Report]:
    """image -> Report from `root/reports.jsonl`; {} when the file does not exist.

    Every line must decode as UTF-8, be a JSON object with image/findings/impression, carry
    text in each of `langs` for findings, impression and every sentence, and name an image no
    other line names. The first violation raises `ReportError` (file, line, record, rule).
    """
    path = Path(root) / REPORTS_FILE
    if not path.is_file():
        return {}
    out: dict[str, Report] = {}
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ReportError(path, lineno, None, R_UTF8, str(exc)) from None
            if not text.strip():
                continue
            try:
                obj = loads_json(text, path, lineno)
            except json.JSONDecodeError as exc:
                raise ReportError(path, lineno, None, R_JSON, str(exc)) from None
            except DuplicateKey as dup:  # json.loads would keep the last "findings" without a word
                raise ReportError(path, lineno, None, R_KEYS, f"key {dup.key!r} is given twice") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
                raise ReportError(path, lineno, None, R_FIELDS, "need an object with a string 'image'")
            image = obj["image"]
            if image in out:
                raise ReportError(path, lineno, image, R_UNIQUE, "image already has a report")
            findings = _texts(obj.get("findings"), path, lineno, image, "findings", langs)
            imp = _texts(obj.get("impression"), path, lineno, image, "impression", langs)
            sentences = obj.get("sentences") or {}
            if not isinstance(sentences, dict):
                raise ReportError(path, lineno, image, R_FIELDS, "sentences must map labels to texts")
            sentences = {k: _texts(v, path, lineno, image, f"sentences.{k}", langs) for k, v in sentences.items()}
            out[image] = Report(image=image, findings=findings, impression=imp, sentences=sentences,
                                exhaustive=bool(obj.get("exhaustive", False)), study_id=str(obj.get("study_id", "")))
    return out
