"""The rules every instruction record obeys (SPEC §1-2, §8): the gate between materialize and training.

Two layers:
- `check_record(rec, max_bytes)`: the per-record rules, run on every record as it is written.
  A record that breaks one goes to `quarantine.jsonl` (file, record id, rule, detail) and is
  left out; materialize fails when more than `max_quarantine_share` of records are quarantined.
- `run_suite(rows, langs, max_bytes)`: a Great Expectations 1.x suite over one compact row per
  accepted record (and per patient / per task), re-checking the per-record rules and adding the
  rules only the whole dataset can answer: unique ids, no patient in two splits, every task in
  every configured language. Any failure here raises `BadInput` naming file, record and rule:
  these are not record defects a quarantine could fix.

Length rule: no tokenizer exists when records are built (align trains it from them), so length
is bounded by UTF-8 bytes of base prompt + every turn. A byte-level BPE never emits more tokens
than bytes, so the byte count is an upper bound on text tokens (image tokens not included).
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from medrega import grammar, gx
from medrega.errors import BadInput

R_FIELDS = "record fields well formed"
R_IMAGE_TAG = "exactly one <image> in the first human turn"
R_TAGS = "<ref>/<box> balanced and well formed"
R_GRID = "boxes on the 0-999 grid with x1<x2, y1<y2"
R_SIZE = "width/height given where boxes appear"
R_LANG = "text present in the record's language"
R_LENGTH = "text within the length budget"
R_UNIQUE = "record ids unique"
R_SPLIT = "no patient in two splits"
R_BOTH_LANGS = "every task in every language"


def check_record(rec: dict, max_bytes: int, base_prompt: str = "") -> list[tuple[str, str]]:
    """The per-record rules a record breaks, as (rule, detail); [] when it passes."""
    conv = rec.get("conversations")
    if (not isinstance(rec.get("id"), str) or not rec["id"] or not isinstance(rec.get("image"), str)
            or not isinstance(conv, list) or len(conv) < 2
            or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conv)):
        return [(R_FIELDS, "need a string id, an image and conversation turns with string values")]
    texts = [t["value"] for t in conv]
    problems: list[tuple[str, str]] = []
    n_image = sum(grammar.count_images(t) for t in texts)
    if n_image != 1 or not grammar.count_images(texts[0]):
        problems.append((R_IMAGE_TAG, f"{n_image} <image> tags"))
    if not all(grammar.tags_balanced(t) for t in texts):
        problems.append((R_TAGS, "unbalanced or nested <ref>/<box>"))
    bodies = [b for t in texts for b in grammar.box_bodies(t)]
    bad = [b for b in bodies if not grammar.parse_box_body(b)[2]]
    if bad:
        problems.append((R_GRID, f"box {bad[0].strip()[:60]!r}"))
    if bodies and not all(isinstance(rec.get(k), int) and not isinstance(rec.get(k), bool) and rec[k] > 0
                          for k in ("width", "height")):
        problems.append((R_SIZE, f"width={rec.get('width')!r} height={rec.get('height')!r}"))
    if any(not t.strip() for t in texts):
        problems.append((R_LANG, "an empty turn"))
    elif rec.get("lang") == "zh" and grammar.detect_lang(texts[0]) != "zh":
        problems.append((R_LANG, "a Chinese record whose question has no Chinese text"))
    elif rec.get("lang") == "en" and not grammar.has_latin(texts[0]):
        problems.append((R_LANG, "an English record whose question has no English text"))
    n = len(base_prompt.encode("utf-8")) + sum(len(t.encode("utf-8")) for t in texts)
    if n > max_bytes:
        problems.append((R_LENGTH, f"{n} bytes > {max_bytes}"))
    return problems


def row_of(rec: dict, file: str, base_prompt: str = "") -> dict[str, Any]:
    """The compact row the GX suite sees for one accepted record."""
    texts = [t["value"] for t in rec["conversations"]]
    bodies = [b for t in texts for b in grammar.box_bodies(t)]
    return {"file": file, "id": rec["id"], "task": rec["task"], "lang": rec["lang"], "split": rec["split"],
            "patient": f"{rec.get('dataset')}/{rec['patient']}" if rec.get("patient") else None,
            "n_image_tags": sum(grammar.count_images(t) for t in texts),
            "tags_ok": all(grammar.tags_balanced(t) for t in texts),
            "boxes_ok": all(grammar.parse_box_body(b)[2] for b in bodies),
            "n_bytes": len(base_prompt.encode("utf-8")) + sum(len(t.encode("utf-8")) for t in texts)}


def _rules(langs: list[str], max_bytes: int) -> dict[str, list[gx.Rule]]:
    import great_expectations as ge

    E = ge.expectations
    return {
        "records": [
            gx.Rule(R_UNIQUE, E.ExpectColumnValuesToBeUnique(column="id")),
            gx.Rule(R_IMAGE_TAG, E.ExpectColumnValuesToBeBetween(column="n_image_tags", min_value=1, max_value=1)),
            gx.Rule(R_TAGS, E.ExpectColumnValuesToBeInSet(column="tags_ok", value_set=[True])),
            gx.Rule(R_GRID, E.ExpectColumnValuesToBeInSet(column="boxes_ok", value_set=[True])),
            gx.Rule(R_LANG, E.ExpectColumnValuesToBeInSet(column="lang", value_set=sorted(langs))),
            gx.Rule(R_LENGTH, E.ExpectColumnValuesToBeBetween(column="n_bytes", min_value=1, max_value=max_bytes)),
        ],
        "patients": [gx.Rule(R_SPLIT, E.ExpectColumnValuesToBeBetween(column="n_splits", min_value=1, max_value=1),
                             lambda r: f"patient {r['patient']} is in {r['n_splits']} splits")],
        "tasks": [gx.Rule(R_BOTH_LANGS, E.ExpectColumnValuesToBeBetween(column="n_langs", min_value=len(langs)),
                          lambda r: f"task {r['task']} has languages [{r['langs']}]")],
    }


def _frames(rows: pd.DataFrame, langs: list[str]) -> dict[str, pd.DataFrame]:
    with_patient = rows.dropna(subset=["patient"])
    patients = (with_patient.groupby("patient")
                .agg(n_splits=("split", "nunique"), file=("file", "first"), id=("id", "first"))
                .reset_index())
    in_langs = rows[rows["lang"].isin(langs)]
    tasks = (in_langs.groupby("task").agg(n_langs=("lang", "nunique"), file=("file", "first"),
                                          id=("id", "first"), langs=("lang", lambda s: ",".join(sorted(set(s)))))
             .reset_index())
    return {name: gx.numbered(f) for name, f in (("records", rows), ("patients", patients), ("tasks", tasks))}


ROW_COLUMNS = ["file", "id", "task", "lang", "split", "patient", "n_image_tags", "tags_ok", "boxes_ok", "n_bytes"]


def run_suite(rows: list[dict[str, Any]], langs: list[str], max_bytes: int) -> dict[str, Any]:
    """GX over the accepted records. Returns {"expectations": [...], "n_records"}; raises
    BadInput naming file, record and rule, listing up to 10 offending records per rule."""
    frame = pd.DataFrame(rows, columns=ROW_COLUMNS)
    frames = _frames(frame, langs)
    rules = _rules(langs, max_bytes)
    results, hits, _ = gx.run({name: (frames[name], rules[name]) for name in rules}, "instructions",
                              max_rows_per_rule=10)
    if hits:
        raise BadInput("instruction validation failed:\n" + "\n".join(
            f"  {h.suite}: rule '{h.rule}' failed {h.detail}" if h.row is None else
            f"  {h.row['file']} (record {h.row['id']}): rule '{h.rule}' failed {h.detail}".rstrip() for h in hits))
    return {"expectations": results, "n_records": len(frame)}
