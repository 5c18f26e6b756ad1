"""MIMIC-CXR-JPG reports with Chest ImaGenome boxes: grounded chest X-ray reports (SPEC §4).

Layout read (the releases' own, so a real download plugs in):

    root/files/p10/p10000032/s50414267/<dicom_id>.jpg   MIMIC-CXR-JPG image
    root/files/p10/p10000032/s50414267.txt              MIMIC-CXR free-text report of the study
    boxes                                               Chest ImaGenome boxes, either
        - one JSON object {dicom_id: [{"bbox_name", "original_x1", "original_y1", "original_x2",
          "original_y2", optional "phrases": [..]}, ...]}, or
        - a directory of ImaGenome scene graphs `<dicom_id>_SceneGraph.json`, each with
          "image_id", "objects" (as above) and "attributes" [{"bbox_name", "phrases"}].

Reports are parsed into their FINDINGS and IMPRESSION sections (upper-case headers ending in a
colon, as MIMIC writes them). Boxes are in original image pixels; they must lie inside the image
and have positive area. A structure's description is its ImaGenome phrases when given, else the
findings sentences that mention the structure's name (a keyword heuristic, used only for the
English text MIMIC has). Reports are English only, so records from here are English only.
Every bad input raises `MimicError` naming the file, the record and the rule.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from medrega.sources import Sample
from medrega.sources.reports import Report
from medrega.vocab import canonical
from medrega.grammar import encode_box
from medrega.errors import BadInput
from medrega.io import loads_json

DATASET = "MIMICCXR"
R_UTF8 = "report file is UTF-8"
R_SECTIONS = "report has a FINDINGS or IMPRESSION section"
R_IMAGE = "image file exists"
R_BOXES = "boxes file readable"
R_BOX = "box within image bounds"

_HEADER = re.compile(r"^\s*([A-Z][A-Z &/()-]*[A-Z)])\s*:", re.MULTILINE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
# Words too generic to tie a findings sentence to one structure.
_STOP = {"right", "left", "upper", "lower", "mid", "zone", "the", "and"}


class MimicError(BadInput):
    def __init__(self, path, record: str | None, rule: str, detail: str):
        super().__init__(f"{path}" + (f" (record {record})" if record else "") + f": rule '{rule}' failed: {detail}")
        self.path, self.record, self.rule = str(path), record, rule


@dataclass(frozen=True)
class Study:
    """One grounded image: the sample, its structures as (label, grid boxes), and its report."""

    sample: Sample
    regions: list[tuple[str, list[list[int]]]]
    report: Report


def parse_report(text: str) -> dict[str, str]:
    """Section name (lower case) -> text with whitespace collapsed, for every `HEADER:` section."""
    out: dict[str, str] = {}
    heads = list(_HEADER.finditer(text))
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        body = " ".join(text[m.end():end].split())
        if body:
            out[m.group(1).strip().lower()] = body
    return out


def read_report(path: Path) -> dict[str, str]:
    """{"findings", "impression"} of one MIMIC-CXR report file (either may be missing, not both)."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MimicError(path, Path(path).stem, R_UTF8, str(exc)) from None
    sections = parse_report(text)
    found = {k: sections[k] for k in ("findings", "impression") if k in sections}
    if not found:
        raise MimicError(path, Path(path).stem, R_SECTIONS, f"sections found: {sorted(sections) or 'none'}")
    return found


def load_boxes(path: Path) -> dict[str, list[dict]]:
    """dicom_id -> ImaGenome objects (each with bbox_name, original_x1..y2 and phrases)."""
    path = Path(path)
    try:
        if path.is_dir():
            out = {}
            for f in sorted(path.glob("*_SceneGraph.json")):
                graph = loads_json(f.read_text(encoding="utf-8"), f)
                phrases = {a.get("bbox_name"): a.get("phrases") or [] for a in graph.get("attributes", [])}
                objects = [dict(o, phrases=o.get("phrases") or phrases.get(o.get("bbox_name"), []))
                           for o in graph.get("objects", [])]
                out[str(graph.get("image_id") or f.name.split("_SceneGraph")[0])] = objects
            return out
        data = loads_json(path.read_text(encoding="utf-8"), path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MimicError(path, None, R_BOXES, f"{type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise MimicError(path, None, R_BOXES, "expected {image_id: [objects]}")
    return data


def _words(text: str) -> set[str]:
    # crude singular so "lungs" matches "lung"; enough for a keyword match, not linguistics
    return {w[:-1] if len(w) > 4 and w.endswith("s") else w for w in re.findall(r"[a-z]+", text.lower())}


def _keywords(name: str) -> set[str]:
    words = {w for w in _words(name) if len(w) >= 4 and w not in _STOP}
    if "cardiac" in words or "heart" in words:
        words |= {"heart", "cardiac", "cardiomegaly"}
    return words or _words(name)


def describe(name: str, phrases, findings: str) -> str:
    """English description of one structure: its phrases, else findings sentences naming it."""
    if isinstance(phrases, str):
        phrases = [phrases]
    text = " ".join(p.strip() for p in phrases or [] if isinstance(p, str) and p.strip())
    if text:
        return text
    keys = _keywords(name)
    hits = [s for s in _SENTENCE.split(findings) if keys & _words(s)]
    return " ".join(hits)


def iter_studies(root: Path, boxes: Path) -> Iterator[Study]:
    """One `Study` per image that has boxes, sorted by dicom_id."""
    root = Path(root).resolve()
    table = load_boxes(boxes)
    by_id = {p.stem: p for p in (root / "files").rglob("*.jpg")}
    for dicom_id in sorted(table):
        image = by_id.get(dicom_id)
        if image is None:
            raise MimicError(boxes, dicom_id, R_IMAGE, f"no {dicom_id}.jpg under {root / 'files'}")
        study_dir, subject = image.parent, image.parent.parent.name
        sections = read_report(study_dir.with_suffix(".txt"))
        with Image.open(image) as im:
            width, height = im.size
        regions: dict[str, list[list[int]]] = {}
        sentences: dict[str, dict[str, str]] = {}
        for obj in table[dicom_id]:
            name = str(obj.get("bbox_name", "")).strip()
            try:
                x1, y1, x2, y2 = (float(obj[k]) for k in ("original_x1", "original_y1", "original_x2", "original_y2"))
            except (KeyError, TypeError, ValueError):
                raise MimicError(boxes, dicom_id, R_BOX, f"{name or '?'}: original_x1..y2 missing or not numbers") from None
            if not name or not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
                raise MimicError(boxes, dicom_id, R_BOX,
                                 f"{name or '(no bbox_name)'}: [{x1:g}, {y1:g}, {x2:g}, {y2:g}] not inside {width}x{height}")
            label = canonical(name) or name
            regions.setdefault(label, []).append(encode_box((x1, y1, x2, y2), width, height))
            text = describe(name, obj.get("phrases"), sections.get("findings", ""))
            if text:
                sentences.setdefault(label, {"en": ""})
                sentences[label]["en"] = (sentences[label]["en"] + " " + text).strip()
        rel = image.relative_to(root).as_posix()
        sample = Sample(image=image, rel_image=rel, modality="xray", dataset=DATASET, patient=subject,
                        width=width, height=height)
        report = Report(image=rel, findings={"en": sections["findings"]} if "findings" in sections else {},
                        impression={"en": sections["impression"]} if "impression" in sections else {},
                        sentences=sentences, exhaustive=False, study_id=study_dir.name)
        yield Study(sample=sample, regions=list(regions.items()), report=report)
