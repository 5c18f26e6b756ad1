"""Instruction-record validation (SPEC §1-2, §8): the gate between materialize and training.

Two layers:
- `check_record(rec, max_bytes)`: the per-record rules, run on every record as it is written.
  A record that breaks one goes to `quarantine.jsonl` (file, record id, rule, detail) and is
  left out; materialize fails when more than `max_quarantine_share` of records are quarantined.
- `run_suite(rows, langs, max_bytes)`: a Great Expectations 1.x suite over one compact row per
  accepted record (and per patient / per task), re-checking the per-record rules and adding the
  rules only the whole dataset can answer: unique ids, no patient in two splits, every task in
  every configured language. Any failure here raises `ValueError` naming file, record and rule:
  these are not record defects a quarantine could fix.

Length rule: no tokenizer exists when records are built (align trains it from them), so length
is bounded by UTF-8 bytes of base prompt + every turn. A byte-level BPE never emits more tokens
than bytes, so the byte count is an upper bound on text tokens (image tokens not included).
"""
from __future__ import annotations

import os
import re
from typing import Any

import pandas as pd

from model.boxes import _parse_group

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

_TAG = re.compile(r"</?(ref|box)>")
_CJK = re.compile(r"[\u4e00-\u9fff]")
_LATIN = re.compile(r"[A-Za-z]")


def _tags_ok(text: str) -> bool:
    """<ref>..</ref> and <box>..</box> strictly alternate open/close, never nest."""
    open_tag = None
    for m in _TAG.finditer(text):
        closing, name = m.group(0).startswith("</"), m.group(1)
        if closing:
            if open_tag != name:
                return False
            open_tag = None
        else:
            if open_tag is not None:
                return False
            open_tag = name
    return open_tag is None


def check_record(rec: dict, max_bytes: int, base_prompt: str = "") -> list[tuple[str, str]]:
    """The per-record rules a record breaks, as (rule, detail); [] when it passes."""
    conv = rec.get("conversations")
    if (not isinstance(rec.get("id"), str) or not rec["id"] or not isinstance(rec.get("image"), str)
            or not isinstance(conv, list) or len(conv) < 2
            or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conv)):
        return [(R_FIELDS, "need a string id, an image and conversation turns with string values")]
    texts = [t["value"] for t in conv]
    problems: list[tuple[str, str]] = []
    n_image = sum(t.count("<image>") for t in texts)
    if n_image != 1 or "<image>" not in texts[0]:
        problems.append((R_IMAGE_TAG, f"{n_image} <image> tags"))
    if not all(_tags_ok(t) for t in texts):
        problems.append((R_TAGS, "unbalanced or nested <ref>/<box>"))
    bodies = [b for t in texts for b in re.findall(r"<box>(.*?)</box>", t, re.DOTALL)]
    bad = [b for b in bodies if not _parse_group(b)[2]]
    if bad:
        problems.append((R_GRID, f"box {bad[0].strip()[:60]!r}"))
    if bodies and not all(isinstance(rec.get(k), int) and not isinstance(rec.get(k), bool) and rec[k] > 0
                          for k in ("width", "height")):
        problems.append((R_SIZE, f"width={rec.get('width')!r} height={rec.get('height')!r}"))
    if any(not t.strip() for t in texts):
        problems.append((R_LANG, "an empty turn"))
    elif rec.get("lang") == "zh" and not _CJK.search(texts[0]):
        problems.append((R_LANG, "a Chinese record whose question has no Chinese text"))
    elif rec.get("lang") == "en" and not _LATIN.search(texts[0].replace("<image>", "")):
        problems.append((R_LANG, "an English record whose question has no English text"))
    n = len(base_prompt.encode("utf-8")) + sum(len(t.encode("utf-8")) for t in texts)
    if n > max_bytes:
        problems.append((R_LENGTH, f"{n} bytes > {max_bytes}"))
    return problems


def row_of(rec: dict, file: str, base_prompt: str = "") -> dict[str, Any]:
    """The compact row the GX suite sees for one accepted record."""
    texts = [t["value"] for t in rec["conversations"]]
    bodies = [b for t in texts for b in re.findall(r"<box>(.*?)</box>", t, re.DOTALL)]
    return {"file": file, "id": rec["id"], "task": rec["task"], "lang": rec["lang"], "split": rec["split"],
            "patient": f"{rec.get('dataset')}/{rec['patient']}" if rec.get("patient") else None,
            "n_image_tags": sum(t.count("<image>") for t in texts),
            "tags_ok": all(_tags_ok(t) for t in texts),
            "boxes_ok": all(_parse_group(b)[2] for b in bodies),
            "n_bytes": len(base_prompt.encode("utf-8")) + sum(len(t.encode("utf-8")) for t in texts)}


def _suites(langs: list[str], max_bytes: int):
    import great_expectations as gx

    E = gx.expectations
    return {
        "records": [
            (R_UNIQUE, E.ExpectColumnValuesToBeUnique(column="id")),
            (R_IMAGE_TAG, E.ExpectColumnValuesToBeBetween(column="n_image_tags", min_value=1, max_value=1)),
            (R_TAGS, E.ExpectColumnValuesToBeInSet(column="tags_ok", value_set=[True])),
            (R_GRID, E.ExpectColumnValuesToBeInSet(column="boxes_ok", value_set=[True])),
            (R_LANG, E.ExpectColumnValuesToBeInSet(column="lang", value_set=sorted(langs))),
            (R_LENGTH, E.ExpectColumnValuesToBeBetween(column="n_bytes", min_value=1, max_value=max_bytes)),
        ],
        "patients": [(R_SPLIT, E.ExpectColumnValuesToBeBetween(column="n_splits", min_value=1, max_value=1))],
        "tasks": [(R_BOTH_LANGS, E.ExpectColumnValuesToBeBetween(column="n_langs", min_value=len(langs)))],
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
    out = {"records": rows, "patients": patients, "tasks": tasks}
    for name, f in out.items():
        f = f.reset_index(drop=True)
        f["row"] = range(len(f))  # GX reports unexpected rows by this column
        out[name] = f
    return out


def _detail(name: str, row: dict) -> str:
    if name == "patients":
        return f"patient {row['patient']} is in {row['n_splits']} splits"
    if name == "tasks":
        return f"task {row['task']} has languages [{row['langs']}]"
    return ""


def run_suite(rows: list[dict[str, Any]], langs: list[str], max_bytes: int) -> dict[str, Any]:
    """GX over the accepted records. Returns {"expectations": [...]}; raises ValueError (file,
    record, rule) on the first failing rule, listing up to 10 offending records."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    frame = pd.DataFrame(rows, columns=["file", "id", "task", "lang", "split", "patient", "n_image_tags",
                                        "tags_ok", "boxes_ok", "n_bytes"])
    frames = _frames(frame, langs)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("instructions")
    fmt = {"result_format": "COMPLETE", "unexpected_index_column_names": ["row"]}
    results, failures = [], []
    for name, entries in _suites(langs, max_bytes).items():
        df = frames[name]
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = gx.ExpectationSuite(name=f"instructions_{name}")
        for rule, exp in entries:
            exp.meta = {"rule": rule}
            suite.add_expectation(exp)
        result = batch.get_batch(batch_parameters={"dataframe": df}).validate(suite, result_format=fmt)
        for er in result.results:
            rule = er.expectation_config.meta["rule"]
            res = er.result or {}
            results.append({"suite": name, "rule": rule, "expectation": er.expectation_config.type,
                            "success": bool(er.success), "unexpected_count": res.get("unexpected_count")})
            for hit in (res.get("unexpected_index_list") or [])[:10]:
                row = df.iloc[int(hit["row"])].to_dict()
                failures.append(f"  {row['file']} (record {row['id']}): rule '{rule}' failed {_detail(name, row)}".rstrip())
    if failures:
        raise ValueError("instruction validation failed:\n" + "\n".join(failures))
    return {"expectations": results, "n_records": len(frame)}
