"""Import the authors' released MedRegInstruct data (InternVL JSONL + meta_file.json) as-is.

The release registers each annotation file in a meta file keyed by dataset name
({"root", "annotation", "length", "repeat_time", ...}); records look like
`{"conversations": [{"from": "human", "value": "What can be visualized in the <box>[[214, 437,
392, 619]]</box> of this medical scan?"}, {"from": "gpt", "value": "left ventricle"}],
"width": 216, "height": 256, "id": -1, "image": "..."}`.

What this module adds, and why:
- ids: the release uses -1 everywhere; we need unique, stable ids, so each record gets
  `rel-<task>-<lang>-<hash of dataset, image and conversation>` (a repeated identical record
  gets `-2`, `-3`, ... in file order, so re-imports give the same ids).
- task, language and T2R setting are inferred (dataset name first, then the shape of the
  question and answer), so released records join our per-task files and metrics.
- `<image>`: InternVL's loader prepends it when the first turn lacks it; we make that explicit
  so every record carries exactly one (the instruction suite checks it).
- structure: a line that is not UTF-8 JSON with alternating human/gpt turns and an image is
  returned as a rejection (file, line, rule) for the quarantine, never silently dropped.
Released data has no patient ids, so all of it is training data (never our test split).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterator

from medrega import grammar, metafile
from medrega.io import R_JSON_KEYS, DuplicateKey, loads_json

TASK_HINTS = (("grounded", "grounded"), ("grounding", "grounded"), ("report", "report"),
              ("caption", "caption"), ("vqa", "vqa"), ("cls", "cls"), ("classif", "cls"),
              ("r2t", "r2t"), ("region_to_text", "r2t"), ("t2r", "t2r"), ("text_to_region", "t2r"),
              ("detection", "t2r"), ("recognition", "r2t"))

R_UTF8 = "record is UTF-8"
R_JSON = "record is a JSON object"
R_SHAPE = "record has image and human/gpt turns"


def infer_lang(texts: list[str]) -> str:
    return "zh" if any(grammar.detect_lang(t) == "zh" for t in texts) else "en"


def infer_task(dataset: str, question: str, answer: str) -> str:
    """Task from the dataset name when it says, else from where boxes appear."""
    low = dataset.lower()
    for hint, task in TASK_HINTS:
        if hint in low:
            return task
    q_box, a_box = "<box>" in question, "<box>" in answer
    if a_box and re.search(r"</box>\s*[:：]", answer):
        return "grounded"
    if a_box:
        return "t2r"
    if q_box:
        return "r2t"
    return "vqa"


def t2r_setting(answer: str) -> str:
    """SS/SM/MS/MM from the answer: how many objects (<ref>s) and whether any has several boxes."""
    objects = max(1, len(grammar.ref_names(answer)))
    multi = any(len(grammar.parse_box_body(body)[0]) > 1 for body in grammar.box_bodies(answer))
    return ("M" if objects > 1 else "S") + ("M" if multi else "S")


def _check_shape(obj) -> str | None:
    if not isinstance(obj, dict):
        return "not an object"
    if not isinstance(obj.get("image"), str) or not obj["image"]:
        return "no image path"
    conv = obj.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2 or len(conv) % 2:
        return "conversations must be a non-empty list of human/gpt pairs"
    for i, turn in enumerate(conv):
        want = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want or not isinstance(turn.get("value"), str):
            return f"turn {i} must be {{'from': '{want}', 'value': str}}"
    return None


def iter_released(meta_path: Path) -> Iterator[tuple[str, dict, dict | None, dict | None]]:
    """(dataset name, meta entry, record or None, rejection or None) per line of every file.

    Entries come with `root` and `annotation` resolved against the meta file's folder.
    A rejection is {"file", "line", "id", "rule", "detail"}; a record is normalised (stable id,
    task, lang, setting, split "train", source "released", `<image>` made explicit).
    """
    meta_path = Path(meta_path)
    for name, entry in metafile.read(meta_path):
        path = Path(entry["annotation"])
        seen: dict[str, int] = {}
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                where = {"file": str(path), "line": lineno, "id": f"{name}:{lineno}"}
                try:
                    obj = loads_json(raw.decode("utf-8"), path, lineno)
                except UnicodeDecodeError as exc:
                    yield name, entry, None, dict(where, rule=R_UTF8, detail=str(exc))
                    continue
                except DuplicateKey as dup:  # json.loads would keep the last "conversations" silently
                    yield name, entry, None, dict(where, rule=R_JSON_KEYS, detail=f"key {dup.key!r} is given twice")
                    continue
                except json.JSONDecodeError as exc:
                    yield name, entry, None, dict(where, rule=R_JSON, detail=str(exc))
                    continue
                problem = _check_shape(obj)
                if problem:
                    yield name, entry, None, dict(where, rule=R_SHAPE, detail=problem)
                    continue
                yield name, entry, normalise(obj, name, seen), None


def normalise(obj: dict, dataset: str, seen: dict[str, int]) -> dict:
    conv = [dict(t) for t in obj["conversations"]]
    if not any(grammar.count_images(t["value"]) for t in conv):
        conv[0]["value"] = grammar.with_image(conv[0]["value"])
    question, answer = conv[0]["value"], conv[1]["value"]
    task = infer_task(dataset, question, answer)
    lang = infer_lang([t["value"] for t in conv])
    body = json.dumps([dataset, obj["image"], obj["conversations"]], ensure_ascii=False, sort_keys=True)
    digest = hashlib.sha1(body.encode("utf-8")).hexdigest()[:16]
    seen[digest] = seen.get(digest, 0) + 1
    rid = f"rel-{task}-{lang}-{digest}" + (f"-{seen[digest]}" if seen[digest] > 1 else "")
    rec = {k: v for k, v in obj.items() if k not in ("conversations", "id")}
    rec.update(id=rid, conversations=conv, task=task, lang=lang,
               setting=t2r_setting(answer) if task == "t2r" else None,
               dataset=dataset, split="train", source="released", released_id=obj.get("id"))
    rec.setdefault("modality", None)
    return rec
