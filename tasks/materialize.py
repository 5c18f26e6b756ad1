"""Materialize instruction records into InternVL JSONL + meta files (SPEC §1, §3).

Sources, each written to its own annotation files because a meta entry has one image root:
    data root (SA-Med2D layout + reports.jsonl)  <task>_<lang>_<split>.jsonl,  key "<task>_<lang>"
    materialize.mimic {root, boxes} (optional)   <task>_<lang>_<split>_mimic.jsonl, "<task>_<lang>_mimic"
    materialize.released_meta (optional)         <task>_<lang>_train_released_<name>.jsonl,
                                                 "<task>_<lang>_released_<name>" (as-is repeat_time)
Keys start with the task so training's task filter (model.data.read_meta) sees it.

Output (out_dir): the JSONL files, meta_file.json (train), meta_test.json (test), summary.json,
quarantine.jsonl (records that broke a per-record rule, with file, id, rule, detail) and
validation.json (the instruction suite's results, tasks/validate_instructions.py).

Everything is written into a temporary sibling directory and renamed into place at the end, so a
failure (bad input, too much quarantined, a dataset-level rule) never leaves a half-written
out_dir and never destroys the previous one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from medrega.records import builders
from medrega.records.report_builders import REPORT_TASKS, build_report_records
from medrega.records.report_templates import ALL_BASE_PROMPTS
from medrega.sources.reports import read_reports
from medrega.sources.samed2d import iter_samples
from tasks import validate_instructions as vi

SPLITS = ("train", "test")
KNOWN_TASKS = builders.TASKS + REPORT_TASKS
BOX_TASKS = ("r2t", "t2r", "grounded")
# Random resized crops move the image under its boxes (SPEC §1): box tasks must never opt in,
# and we keep augmentation off everywhere so every task sees the same pixels.
AUGMENT = {t: False for t in KNOWN_TASKS}


def _dump(obj, path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, sort_keys=True, indent=2)
        fh.write("\n")


class _Writer:
    """Routes each record to its annotation file after the per-record rules; keeps the counts,
    the quarantine and the compact rows the instruction suite runs over."""

    def __init__(self, tmp: Path, out_dir: Path, max_bytes: int):
        self.tmp, self.out_dir, self.max_bytes = tmp, out_dir, max_bytes
        self.handles: dict[tuple, object] = {}
        self.counts: dict[tuple, int] = {}  # (task, lang, split, suffix) -> n
        self.roots: dict[str, str] = {}
        self.entry_overrides: dict[str, dict] = {}
        self.rows: list[dict] = []
        self.quarantined = 0
        self.quarantine = (tmp / "quarantine.jsonl").open("w", encoding="utf-8")

    @staticmethod
    def name(task, lang, split, suffix) -> str:
        return f"{task}_{lang}_{split}{suffix}.jsonl"

    def reject(self, file: str, rid, rule: str, detail: str) -> None:
        self.quarantined += 1
        self.quarantine.write(json.dumps({"file": file, "id": rid, "rule": rule, "detail": detail},
                                         ensure_ascii=False, sort_keys=True) + "\n")

    def write(self, rec: dict, suffix: str = "", source_file: str | None = None) -> bool:
        key = (rec["task"], rec["lang"], rec["split"], suffix)
        file = self.name(*key)
        prompt = ALL_BASE_PROMPTS.get(rec["task"], {}).get(rec["lang"], "")
        problems = vi.check_record(rec, self.max_bytes, prompt)
        if problems:
            rule, detail = problems[0]
            self.reject(source_file or file, rec.get("id"), rule, detail)
            return False
        if key not in self.handles:
            self.handles[key] = (self.tmp / file).open("w", encoding="utf-8")
        self.handles[key].write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
        self.counts[key] = self.counts.get(key, 0) + 1
        self.rows.append(vi.row_of(rec, str(self.out_dir / file), prompt))
        return True

    def close(self) -> None:
        for fh in self.handles.values():
            fh.close()
        self.quarantine.close()


def _own_records(sample, regions, report, split, tasks, langs, settings, seed, exhaustive):
    region_tasks = [t for t in tasks if t in builders.TASKS]
    report_tasks = [t for t in tasks if t in REPORT_TASKS]
    recs = builders.build_records(sample, regions, split, region_tasks, langs, settings, seed) if region_tasks else []
    if report_tasks:
        recs += build_report_records(sample, regions, report, split, report_tasks, langs, exhaustive, seed)
    for rec in recs:
        rec["patient"] = sample.patient  # lets the suite prove no patient is in two splits
    return recs


def materialize(data_root: Path, out_dir: Path, params: dict) -> dict:
    """Build all records for params["materialize"] and swap them into out_dir atomically."""
    cfg = params["materialize"]
    tasks, langs = list(cfg["tasks"]), list(cfg["langs"])
    settings = list(cfg.get("t2r_settings", builders.SETTINGS))
    test_share, seed = float(cfg["test_share"]), int(cfg.get("seed", 0))
    max_bytes = int(cfg.get("max_record_bytes", 4096))
    max_q = float(cfg.get("max_quarantine_share", 0.01))
    min_pixels = int(params.get("validate", {}).get("min_mask_pixels", 4))
    for t in tasks:
        if t not in KNOWN_TASKS:
            raise ValueError(f"materialize.tasks: unknown task {t!r} (known: {KNOWN_TASKS})")
    for lang in langs:
        if lang not in builders.LANGS:
            raise ValueError(f"materialize.langs: unknown language {lang!r} (known: {builders.LANGS})")

    data_root, out_dir = Path(data_root), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    setting_counts = {lang: {s: {k: 0 for k in settings} for s in SPLITS} for lang in langs}
    patients = {s: set() for s in SPLITS}
    images = {s: 0 for s in SPLITS}
    w = _Writer(tmp, out_dir, max_bytes)
    try:
        # 1. our own data root: SA-Med2D layout, with reports where reports.jsonl has them
        w.roots[""] = str(data_root)
        reports = read_reports(data_root, langs) if set(tasks) & set(REPORT_TASKS) else {}
        for sample in iter_samples(data_root):
            split = builders.split_of(sample.dataset, sample.patient, test_share)
            patients[split].add((sample.dataset, sample.patient))
            images[split] += 1
            regions = builders.region_boxes(sample, min_pixels)
            report = reports.get(sample.rel_image)
            for rec in _own_records(sample, regions, report, split, tasks, langs, settings, seed,
                                    bool(report and report.exhaustive)):
                if w.write(rec) and rec["task"] == "t2r" and rec["setting"] in settings:
                    setting_counts[rec["lang"]][split][rec["setting"]] += 1
        # 2. MIMIC-CXR-JPG + Chest ImaGenome (English only)
        mimic = cfg.get("mimic")
        if mimic:
            from medrega.sources.mimic import iter_studies

            w.roots["_mimic"] = str(Path(mimic["root"]).resolve())
            for st in iter_studies(Path(mimic["root"]), Path(mimic["boxes"])):
                split = builders.split_of(st.sample.dataset, st.sample.patient, test_share)
                patients[split].add((st.sample.dataset, st.sample.patient))
                for rec in _own_records(st.sample, st.regions, st.report, split,
                                        [t for t in tasks if t in REPORT_TASKS],  # names beyond the vocabulary
                                        [l for l in langs if l == "en"], settings, seed, False):
                    w.write(rec, "_mimic")
        # 3. the authors' release, as-is (training only)
        if cfg.get("released_meta"):
            from medrega.sources.released import iter_released, resolve

            meta_path = Path(cfg["released_meta"])
            for name, entry, rec, bad in iter_released(meta_path):
                suffix = f"_released_{name}"
                if bad:
                    w.reject(bad["file"], bad["id"], bad["rule"], f"line {bad['line']}: {bad['detail']}")
                    continue
                w.roots[suffix] = str(resolve(meta_path, entry.get("root", ".")))
                w.entry_overrides[suffix] = {"repeat_time": entry.get("repeat_time", 1),
                                             **({"base_prompt": entry["base_prompt"]} if entry.get("base_prompt") else {})}
                if rec["task"] in tasks and rec["lang"] in langs:
                    w.write(rec, suffix, source_file=str(resolve(meta_path, entry["annotation"])))
        w.close()

        leaked = patients["train"] & patients["test"]
        if leaked:  # split_of makes this impossible; guards a future change to patient naming
            raise ValueError(f"{data_root}: rule '{vi.R_SPLIT}' failed for {sorted(leaked)[:5]}")
        empty = [s for s in SPLITS if not patients[s]]
        if empty:
            # Too few patients for the hash split to fill both sides: say so before training.
            raise ValueError(f"{data_root}: split(s) {empty} got no patient out of "
                             f"{sum(len(p) for p in patients.values())}; raise materialize.test_share or add patients")
        total = sum(w.counts.values()) + w.quarantined
        share = w.quarantined / total if total else 0.0
        if share > max_q:
            first = (tmp / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()[:5]
            raise ValueError(f"{data_root}: {w.quarantined} of {total} records quarantined (share {share:.4f} > "
                             f"materialize.max_quarantine_share {max_q}); first: "
                             + "; ".join(f"{q['file']} (record {q['id']}): rule '{q['rule']}' failed ({q['detail']})"
                                         for q in map(json.loads, first)))
        validation = vi.run_suite(w.rows, langs, max_bytes)
        _dump(validation, tmp / "validation.json")

        metas = {}
        for s, meta_name in (("train", "meta_file.json"), ("test", "meta_test.json")):
            meta = {}
            for (t, lang, split, suffix), n in sorted(w.counts.items()):
                if split != s or n == 0:  # an empty annotation file would break the training loader
                    continue
                entry = {
                    "root": w.roots[suffix],
                    "annotation": str(out_dir / _Writer.name(t, lang, split, suffix)),
                    "length": n, "repeat_time": 1,
                    "data_augment": AUGMENT[t],
                    "base_prompt": ALL_BASE_PROMPTS[t][lang],
                }
                entry.update(w.entry_overrides.get(suffix, {}))
                meta[f"{t}_{lang}{suffix}"] = entry
            _dump(meta, tmp / meta_name)
            metas[s] = sorted(meta)
        counts = {t: {lang: {s: 0 for s in SPLITS} for lang in langs} for t in tasks}
        by_source: dict[str, int] = {}
        for (t, lang, split, suffix), n in w.counts.items():
            counts[t][lang][split] += n
            by_source[suffix.lstrip("_") or "data_root"] = by_source.get(suffix.lstrip("_") or "data_root", 0) + n
        summary = {
            "records": counts,
            "records_by_source": by_source,
            "t2r_settings": setting_counts,
            "images": images,
            "patients": {s: len(p) for s, p in patients.items()},
            "datasets": metas,
            "quarantined": w.quarantined,
            "quarantine_share": share,
            "length_rule": f"UTF-8 bytes of base prompt + turns <= {max_bytes} (upper bound on byte-level BPE tokens)",
        }
        _dump(summary, tmp / "summary.json")
        # Swap: old output aside, new one in, then drop the old one.
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except BaseException:
            if old.exists():  # put the previous output back rather than leave nothing
                old.rename(out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        w.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def main(argv=None) -> None:
    from medrega.config import load_params

    ap = argparse.ArgumentParser(description="Materialize MedRegA instruction records (SPEC §1, §3).")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    args = ap.parse_args(argv)
    params = load_params(args.params, args.profile)
    summary = materialize(Path(params["data"]["root"]), Path(params["materialize"]["out"]), params)
    print(json.dumps(summary["records"], ensure_ascii=False, sort_keys=True))


if __name__ == "__main__":
    main()
