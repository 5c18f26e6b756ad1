"""Records for the report-based tasks (SPEC §3): grounded reports, VQA, report generation and
classification, in English and Chinese, in the same record format as medrega.records.builders.

Inputs per image: the `Sample` (provenance, size), its structures as (label, grid boxes) from
`builders.region_boxes` or a box source such as Chest ImaGenome, and its `Report` (may be None:
then only VQA and classification are built). `exhaustive` says every structure in the image is
labelled; only then do we build questions whose answer is an absence ("no", "none"), because
an unlabelled structure is not an absent one.

Labels are vocabulary keys where the source uses them; a name the vocabulary does not know
(e.g. ImaGenome's "right costophrenic angle") is used verbatim, in English only, since we have
no Chinese name for it. Choices come from RNGs seeded by the record's identity (as builders.py),
so records and ids are stable when other images come and go.
"""
from __future__ import annotations

import random

from medrega.records.builders import _digest, _refs, make_record
from medrega.grammar import VQA_ANSWER
from medrega.records.report_templates import CATEGORY, NO_LESION, POSITIONS, TEMPLATES, YES_NO
from medrega.sources import Sample
from medrega.sources.reports import Report
from medrega.vocab import BY_KEY, MODALITIES, STRUCTURES
from medrega.grammar import format_regions

REPORT_TASKS = ("grounded", "vqa", "report", "cls")

Box = list[int]


def name_of(label: str, lang: str) -> str | None:
    """Display name of a label in `lang`, or None when we have none (unknown label, Chinese)."""
    s = BY_KEY.get(label)
    if s is not None:
        return s.name(lang)
    return label if lang == "en" else None


def _cell(boxes: list[Box]) -> tuple[int, int]:
    """(row, column) of the 3x3 grid holding the centre of the boxes' union (0-999 grid)."""
    x1, y1 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x2, y2 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return min(2, int(cy * 3 // 1000)), min(2, int(cx * 3 // 1000))


def _join(texts: list[str], lang: str) -> str:
    return "".join(texts) if lang == "zh" else " ".join(texts)


def build_report_records(sample: Sample, regions: list[tuple[str, list[Box]]], report: Report | None,
                         split: str, tasks=REPORT_TASKS, langs=("en", "zh"), exhaustive: bool = False,
                         seed: int = 0) -> list[dict]:
    records: list[dict] = []

    def add(task, lang, setting, index, question, answer, **extra):
        records.append(make_record(sample, split, task, lang, setting, index, question, answer, **extra))

    def rng_for(*key):
        return random.Random(int(_digest(seed, sample.rel_image, *key)[:16], 16))

    present = {label for label, _ in regions}
    for lang in langs:
        modality = MODALITIES[sample.modality][lang]
        named = [(label, boxes, name_of(label, lang)) for label, boxes in regions if name_of(label, lang)]
        has_text = report is not None and lang in report.langs()

        if "grounded" in tasks and has_text:
            described = [r for r in named if lang in report.sentences.get(r[0], {})]
            if described:
                rng = rng_for("grounded", lang)
                lesions = [r for r in described if BY_KEY.get(r[0]) and BY_KEY[r[0]].lesion]
                picked = lesions or rng.sample(described, min(len(described), rng.randint(1, 2)))
                order = {label: i for i, (label, _) in enumerate(regions)}
                picked = sorted(picked, key=lambda r: order[r[0]])
                q = rng.choice(TEMPLATES["grounded"][lang]).format(
                    objects=_refs([n for _, _, n in picked], lang), modality=modality)
                text = _join([report.sentences[label][lang] for label, _, _ in picked], lang)
                a = format_regions([(n, boxes) for _, boxes, n in picked]) + ("：" if lang == "zh" else ": ") + text
                add("grounded", lang, None, 0, q, a)

        if "report" in tasks and has_text:
            rng = rng_for("report", lang)
            q = rng.choice(TEMPLATES["report"][lang]).format(modality=modality)
            f, i = report.findings[lang], report.impression[lang]
            a = f"影像诊断：{f} 影像结论：{i}" if lang == "zh" else f"Findings: {f} Impression: {i}"
            add("report", lang, None, 0, q, a)

        if "vqa" in tasks:
            suffix = ("" if lang == "zh" else " ") + VQA_ANSWER[lang]
            yes, no = YES_NO[lang]
            if named:  # closed, answer yes: a structure that is labelled here
                rng = rng_for("vqa", lang, "yes")
                _, _, n = rng.choice(named)
                q = rng.choice(TEMPLATES["vqa_closed"][lang]).format(object=n, modality=modality)
                add("vqa", lang, "closed", 0, q + suffix, yes, answer_type="closed")
            absent = [s for s in STRUCTURES if sample.modality in s.modalities and s.key not in present]
            if exhaustive and absent:  # closed, answer no: only where labels are exhaustive
                rng = rng_for("vqa", lang, "no")
                s = rng.choice(absent)
                q = rng.choice(TEMPLATES["vqa_closed"][lang]).format(object=s.name(lang), modality=modality)
                add("vqa", lang, "closed", 1, q + suffix, no, answer_type="closed")
            cells: dict[tuple[int, int], list[str]] = {}
            for _, boxes, n in named:
                cells.setdefault(_cell(boxes), []).append(n)
            # Open: a cell holding exactly one structure; with non-exhaustive labels an unlabelled
            # structure might share it, so those sources get no open question.
            unique = sorted(c for c, ns in cells.items() if len(ns) == 1)
            if unique and exhaustive:
                rng = rng_for("vqa", lang, "open")
                c = rng.choice(unique)
                q = rng.choice(TEMPLATES["vqa_open"][lang]).format(position=POSITIONS[lang][c[0]][c[1]],
                                                                  modality=modality)
                add("vqa", lang, "open", 0, q + suffix, cells[c][0], answer_type="open")

        if "cls" in tasks:
            sep = "、" if lang == "zh" else ", "
            rng = rng_for("cls", lang, "modality")
            labels = [MODALITIES[m][lang] for m in MODALITIES]
            q = rng.choice(TEMPLATES["cls"][lang]).format(category=CATEGORY["modality"][lang], labels=sep.join(labels))
            add("cls", lang, "modality", 0, q, modality)
            lesion_keys = [s for s in STRUCTURES if s.lesion and sample.modality in s.modalities]
            shown = [s for s in lesion_keys if s.key in present]
            if exhaustive and lesion_keys and len(shown) <= 1:  # single-label: at most one lesion type
                rng = rng_for("cls", lang, "lesion")
                labels = [s.name(lang) for s in lesion_keys] + [NO_LESION[lang]]
                q = rng.choice(TEMPLATES["cls"][lang]).format(category=CATEGORY["lesion"][lang], labels=sep.join(labels))
                add("cls", lang, "lesion", 0, q, shown[0].name(lang) if shown else NO_LESION[lang])
    return records
