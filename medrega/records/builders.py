"""Turn `Sample`s into InternVL conversation records (SPEC §1) for caption, r2t and t2r.

Record: {"id", "image", "width", "height", "conversations": [human, gpt], "task", "lang",
"setting", "modality", "dataset", "split"}. The human turn starts with "<image>\n"; the base
prompt is not in the record (the meta file carries it and training prepends it).

Every choice (template, which box, which structures) comes from an RNG seeded by a hash of the
record's identity, so a record does not change when other images are added or removed, and ids
are stable across runs.
"""
from __future__ import annotations

import hashlib
import random

from medrega.records.templates import TEMPLATES
from medrega.sources import Sample
from medrega.sources.samed2d import mask_boxes
from medrega.vocab import BY_KEY, MODALITIES
from medrega.grammar import encode_box, format_box, format_regions, with_image

TASKS = ("caption", "r2t", "t2r")
LANGS = ("en", "zh")
SETTINGS = ("SS", "SM", "MS", "MM")

Box = list[int]


def _digest(*parts) -> str:
    return hashlib.sha1("|".join(str(p) for p in parts).encode("utf-8")).hexdigest()


def split_of(dataset: str, patient: str, test_share: float) -> str:
    """'test' or 'train' for a patient, from a hash of (dataset, patient) alone.

    Every image of a patient gets the same answer, so no patient is in two splits, and the
    split does not move when other patients or seeds change.
    """
    u = int(_digest(dataset, patient)[:13], 16) / 16**13  # uniform in [0, 1)
    return "test" if u < test_share else "train"


def region_boxes(sample: Sample, min_pixels: int = 4) -> list[tuple[str, list[Box]]]:
    """(label, grid boxes) per structure of the sample, in order of first appearance.

    Instance masks of one label are merged (one structure, several regions); each connected
    component is one box. Boxes that collapse on the 0-999 grid (x1 == x2) are dropped: the
    parser would reject them, so they cannot be a target.
    """
    out: dict[str, list[Box]] = {}
    for region in sample.regions:
        for pixel_box in mask_boxes(region.mask, min_pixels):
            g = encode_box(pixel_box, sample.width, sample.height)
            if g[0] < g[2] and g[1] < g[3]:
                out.setdefault(region.label, []).append(g)
    return [(label, boxes) for label, boxes in out.items()]


def _join_names(names: list[str], lang: str) -> str:
    if lang == "zh":
        return "、".join(names)
    if len(names) <= 2:
        return " and ".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def _refs(names: list[str], lang: str) -> str:
    return ("、" if lang == "zh" else ", ").join(f"<ref>{n}</ref>" for n in names)


def _t2r_pick(regions: list[tuple[str, list[Box]]], setting: str, rng: random.Random):
    """The structures a Text-to-Region question of `setting` asks for, or None if impossible."""
    singles = [r for r in regions if len(r[1]) == 1]
    multis = [r for r in regions if len(r[1]) > 1]
    if setting == "SS":
        return [rng.choice(singles)] if singles else None
    if setting == "SM":
        return [rng.choice(multis)] if multis else None
    if setting == "MS":
        if len(singles) < 2:
            return None
        picked = rng.sample(singles, rng.randint(2, min(3, len(singles))))
    elif setting == "MM":
        if not multis or len(regions) < 2:
            return None
        first = rng.choice(multis)
        rest = [r for r in regions if r is not first]
        picked = [first] + rng.sample(rest, rng.randint(1, min(2, len(rest))))
    else:
        raise ValueError(f"unknown Text-to-Region setting {setting!r} (expected one of {SETTINGS})")
    order = {label: i for i, (label, _) in enumerate(regions)}
    return sorted(picked, key=lambda r: order[r[0]])  # keep a stable, anatomical order


def make_record(sample: Sample, split: str, task: str, lang: str, setting: str | None, index: int,
                question: str, answer: str, **extra) -> dict:
    """One InternVL conversation record (SPEC §1) with a stable id and our provenance keys."""
    rid = _digest(sample.rel_image, task, lang, setting, index)[:16]
    return {
        "id": f"{task}-{lang}-{rid}",
        "image": sample.rel_image, "width": sample.width, "height": sample.height,
        "conversations": [{"from": "human", "value": with_image(question)},
                          {"from": "gpt", "value": answer}],
        "task": task, "lang": lang, "setting": setting,
        "modality": sample.modality, "dataset": sample.dataset, "split": split, **extra,
    }


def build_records(sample: Sample, regions: list[tuple[str, list[Box]]], split: str,
                  tasks=TASKS, langs=LANGS, settings=SETTINGS, seed: int = 0) -> list[dict]:
    """All records of one sample: caption per language, r2t per structure and language, and
    one t2r per feasible setting and language."""
    records = []

    def add(task, lang, setting, index, question, answer):
        records.append(make_record(sample, split, task, lang, setting, index, question, answer))

    def rng_for(task, lang, setting, index):
        return random.Random(int(_digest(seed, sample.rel_image, task, lang, setting, index)[:16], 16))

    for lang in langs:
        modality = MODALITIES[sample.modality][lang]
        names = {label: BY_KEY[label].name(lang) for label, _ in regions}
        if "caption" in tasks:
            rng = rng_for("caption", lang, None, 0)
            q = rng.choice(TEMPLATES["caption"][lang]).format(modality=modality)
            listed = _join_names([names[label] for label, _ in regions], lang)
            if lang == "zh":
                a = f"{modality}图像，显示{listed}。" if regions else f"{modality}图像。"
            else:
                head = modality[0].upper() + modality[1:]
                a = f"{head} image showing {listed}." if regions else f"{head} image."
            add("caption", lang, None, 0, q, a)
        if "r2t" in tasks:
            for i, (label, boxes) in enumerate(regions):
                rng = rng_for("r2t", lang, None, i)
                box = rng.choice(boxes)  # one region of the structure; its name is the answer
                q = rng.choice(TEMPLATES["r2t"][lang]).format(region=format_box([box]), modality=modality)
                add("r2t", lang, None, i, q, names[label])
        if "t2r" in tasks:
            for setting in settings:
                rng = rng_for("t2r", lang, setting, 0)
                picked = _t2r_pick(regions, setting, rng)
                if picked is None:
                    continue
                q = rng.choice(TEMPLATES["t2r"][lang]).format(
                    objects=_refs([names[label] for label, _ in picked], lang), modality=modality)
                a = format_regions([(names[label], boxes) for label, boxes in picked])
                add("t2r", lang, setting, 0, q, a)
    return records
