"""Stage: raw data -> MedRegInstruct records, InternVL JSONL + meta files (SPEC §1, §3).

Sources, each into its own annotation files (a meta entry has one image root):
    data root (SA-Med2D layout + reports.jsonl)  <task>_<lang>_<split>-<shard:05d>.jsonl, entry "<task>_<lang>-<shard>"
    materialize.mimic {root, boxes} (optional)   <task>_<lang>_<split>_mimic.jsonl, entry "<task>_<lang>_mimic"
    materialize.released_meta (optional)         <task>_<lang>_train_released_<name>.jsonl (as-is repeat_time)

The data root is streamed through the resumable shard runner (medrega.shards): shard k holds
images [k*shard_size, (k+1)*shard_size) and its records depend on nothing else, so the bytes are
the same for any worker count, and a killed run keeps its finished shards. Every record passes the
per-record rules (medrega.records.rules) or goes to quarantine.jsonl with file, id, rule and detail;
then the dataset rules run (no patient in two splits, both splits filled, the quarantine share,
the GX suite). Everything is built in a work directory beside `out_dir` and renamed into place
only when every rule passed, so a failure never leaves a half-written output nor destroys the last
good one.

Output: the JSONL files, meta_file.json (train), meta_test.json (test), summary.json,
quarantine.jsonl and validation.json (the suite's results).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from medrega import io, metafile, shards
from medrega.config import Config, MaterializeConfig
from medrega.errors import BadInput
from medrega.grammar import base_prompt
from medrega.records import builders
from medrega.records import rules as vi
from medrega.records.report_builders import REPORT_TASKS, build_report_records
from medrega.sources.reports import REPORTS_FILE, read_reports
from medrega.sources.samed2d import CLASS_MAPPING_FILE, MAPPING_FILE, iter_samples

SPLITS = ("train", "test")
# Random resized crops move the image under its boxes (SPEC §1): box tasks must never opt in,
# and augmentation stays off everywhere so every task sees the same pixels.
DATA_AUGMENT = False
SHARD_FORMAT = 2  # part of the fingerprint: bump when shard contents change for the same inputs


def shard_name(task: str, lang: str, split: str, k: int) -> str:
    return f"{task}_{lang}_{split}-{k:05d}.jsonl"


def route(rec: dict, file: str, out_dir: Path, max_bytes: int) -> tuple[str | None, dict]:
    """(the JSONL line, the suite's row) of an accepted record, or (None, its quarantine entry)."""
    prompt = base_prompt(rec["task"], rec["lang"]) or ""
    problems = vi.check_record(rec, max_bytes, prompt)
    if problems:
        rule, detail = problems[0]
        return None, {"file": file, "id": rec.get("id"), "rule": rule, "detail": detail}
    return json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n", vi.row_of(rec, str(out_dir / file), prompt)


def _records(sample, regions, report, split: str, job: dict) -> list[dict]:
    region_tasks = [t for t in job["tasks"] if t in builders.TASKS]
    report_tasks = [t for t in job["tasks"] if t in REPORT_TASKS]
    exhaustive = bool(report and report.exhaustive)
    recs = builders.build_records(sample, regions, split, region_tasks, job["langs"], job["settings"], job["seed"]) \
        if region_tasks else []
    if report_tasks:
        recs += build_report_records(sample, regions, report, split, report_tasks, job["langs"], exhaustive, job["seed"])
    for rec in recs:
        rec["patient"] = sample.patient  # lets the suite prove no patient is in two splits
    return recs


def build_shard(k: int, items: list, job: dict) -> dict:
    """Build, check and write shard k ((sample, report) pairs); return its manifest. Runs in a
    worker: it touches only shard k's files, each written atomically."""
    work, out_dir = Path(job["work"]), Path(job["out_dir"])
    lines: dict[tuple, list[str]] = {}
    man: dict[str, Any] = {"shard": k, "images": {s: 0 for s in SPLITS}, "quarantine": [], "rows": [],
                           "settings": {}, "patients": set()}
    for sample, report in items:
        split = builders.split_of(sample.dataset, sample.patient, job["test_share"])
        man["images"][split] += 1
        man["patients"].add((split, sample.dataset, sample.patient))
        for rec in _records(sample, builders.region_boxes(sample, job["min_pixels"]), report, split, job):
            key = (rec["task"], rec["lang"], split)
            line, row = route(rec, shard_name(*key, k), out_dir, job["max_bytes"])
            if line is None:
                man["quarantine"].append(row)
                continue
            lines.setdefault(key, []).append(line)
            man["rows"].append(row)
            if rec["task"] == "t2r":
                tag = f"{rec['lang']}/{split}/{rec['setting']}"
                man["settings"][tag] = man["settings"].get(tag, 0) + 1
    for key, body in sorted(lines.items()):
        io.write_text(work / shard_name(*key, k), "".join(body))
    man["patients"] = sorted(man["patients"])
    man["counts"] = [[*key, len(body)] for key, body in sorted(lines.items())]
    return man


class Tally:
    """What the shards and the extra sources produced: counts, quarantine, suite rows, patients."""

    def __init__(self, cfg: MaterializeConfig, work: Path, out_dir: Path, data_root: Path):
        self.cfg, self.work, self.out_dir = cfg, work, out_dir
        self.entries: dict[tuple[str, str], dict] = {}  # (split, meta entry name) -> entry (+ task, lang)
        self.quarantine: list[dict] = []
        self.rows: list[dict] = []
        self.patients: dict[str, set] = {s: set() for s in SPLITS}
        self.images = {s: 0 for s in SPLITS}
        self.settings = {lang: {s: {k: 0 for k in cfg.t2r_settings} for s in SPLITS} for lang in cfg.langs}
        self.data_root = data_root
        self.extra: dict[tuple, list[str]] = {}  # (task, lang, split, suffix) -> lines, non-shard sources
        self.extra_roots: dict[str, tuple[Path, dict]] = {}  # suffix -> (image root, entry overrides)
        self.n_shards = 0

    def take(self, man: dict) -> None:
        """A shard's manifest, in shard order."""
        self.n_shards = max(self.n_shards, man["shard"] + 1)
        self.quarantine += man["quarantine"]
        self.rows += man["rows"]
        for task, lang, split, n in man["counts"]:
            self._entry(f"{task}_{lang}-{man['shard']:05d}", task, lang, split, self.data_root,
                        self.out_dir / shard_name(task, lang, split, man["shard"]), n)
        for split, dataset, patient in man["patients"]:
            self.patients[split].add((dataset, patient))
        for split, n in man["images"].items():
            self.images[split] += n
        for tag, n in man["settings"].items():
            lang, split, setting = tag.split("/")
            self.settings[lang][split][setting] += n

    def add(self, rec: dict, suffix: str, source_file: str | None = None) -> None:
        """A record of a non-sharded source (MIMIC, the authors' release)."""
        file = f"{rec['task']}_{rec['lang']}_{rec['split']}{suffix}.jsonl"
        line, row = route(rec, file, self.out_dir, self.cfg.max_record_bytes)
        if line is None:
            self.quarantine.append({**row, "file": source_file or file})
            return
        self.extra.setdefault((rec["task"], rec["lang"], rec["split"], suffix), []).append(line)
        self.rows.append(row)

    def _entry(self, name, task, lang, split, root, annotation, n, **overrides) -> None:
        self.entries[split, name] = {"root": str(root), "annotation": str(annotation), "length": n, "repeat_time": 1,
                              "data_augment": DATA_AUGMENT, "base_prompt": base_prompt(task, lang),
                              "split": split, "task": task, "lang": lang, **overrides}

    def write_extra(self) -> None:
        for (task, lang, split, suffix), lines in sorted(self.extra.items()):
            file = f"{task}_{lang}_{split}{suffix}.jsonl"
            io.write_text(self.work / file, "".join(lines))
            root, overrides = self.extra_roots[suffix]
            self._entry(f"{task}_{lang}{suffix}", task, lang, split, root, self.out_dir / file, len(lines), **overrides)


def _extra_sources(cfg: MaterializeConfig, tally: Tally) -> None:
    if cfg.mimic:  # MIMIC-CXR-JPG + Chest ImaGenome (English only)
        from medrega.sources.mimic import iter_studies

        tally.extra_roots["_mimic"] = (cfg.mimic.root.resolve(), {})
        job = {"tasks": [t for t in cfg.tasks if t in REPORT_TASKS], "langs": [lg for lg in cfg.langs if lg == "en"],
               "settings": cfg.t2r_settings, "seed": cfg.seed}
        for st in iter_studies(cfg.mimic.root, cfg.mimic.boxes):
            split = builders.split_of(st.sample.dataset, st.sample.patient, cfg.test_share)
            tally.patients[split].add((st.sample.dataset, st.sample.patient))
            for rec in _records(st.sample, st.regions, st.report, split, job):  # names beyond the vocabulary
                tally.add(rec, "_mimic")
    if cfg.released_meta:  # the authors' release, as-is (training only)
        from medrega.sources.released import iter_released

        for name, entry, rec, bad in iter_released(cfg.released_meta):
            if bad:
                tally.quarantine.append({"file": bad["file"], "id": bad["id"], "rule": bad["rule"],
                                         "detail": f"line {bad['line']}: {bad['detail']}"})
                continue
            suffix = f"_released_{name}"
            tally.extra_roots[suffix] = (Path(entry["root"]), {"repeat_time": entry.get("repeat_time", 1),
                                                                **({"base_prompt": entry["base_prompt"]}
                                                                   if entry.get("base_prompt") else {})})
            if rec["task"] in cfg.tasks and rec["lang"] in cfg.langs:
                tally.add(rec, suffix, source_file=entry["annotation"])


def _verdict(tally: Tally, data_root: Path) -> float:
    """The dataset rules; returns the quarantine share. Raises BadInput naming the rule."""
    leaked = tally.patients["train"] & tally.patients["test"]
    if leaked:  # split_of makes this impossible; guards a future change to patient naming
        raise BadInput(f"{data_root}: rule '{vi.R_SPLIT}' failed for {sorted(leaked)[:5]}")
    empty = [s for s in SPLITS if not tally.patients[s]]
    if empty:
        # Too few patients for the hash split to fill both sides: say so before training.
        raise BadInput(f"{data_root}: split(s) {empty} got no patient out of "
                       f"{sum(len(p) for p in tally.patients.values())}; raise materialize.test_share or add patients")
    accepted = sum(e["length"] for e in tally.entries.values())
    total = accepted + len(tally.quarantine)
    share = len(tally.quarantine) / total if total else 0.0
    if share > tally.cfg.max_quarantine_share:
        first = "; ".join(f"{q['file']} (record {q['id']}): rule '{q['rule']}' failed ({q['detail']})"
                          for q in tally.quarantine[:5])
        raise BadInput(f"{data_root}: {len(tally.quarantine)} of {total} records quarantined (share {share:.4f} > "
                       f"materialize.max_quarantine_share {tally.cfg.max_quarantine_share}); first: {first}")
    return share


def _summary(tally: Tally, share: float) -> dict:
    cfg = tally.cfg
    counts = {t: {lang: {s: 0 for s in SPLITS} for lang in cfg.langs} for t in cfg.tasks}
    by_source: dict[str, int] = {}
    for (_, name), e in tally.entries.items():
        counts[e["task"]][e["lang"]][e["split"]] += e["length"]
        source = name.split("_", 2)[2] if name.count("_") >= 2 else "data_root"
        by_source[source] = by_source.get(source, 0) + e["length"]
    return {
        "records": counts, "records_by_source": by_source, "t2r_settings": tally.settings, "images": tally.images,
        "patients": {s: len(p) for s, p in tally.patients.items()},
        "datasets": {s: sorted(n for split, n in tally.entries if split == s) for s in SPLITS},
        "shards": tally.n_shards,
        "quarantined": len(tally.quarantine), "quarantine_share": share,
        "length_rule": f"UTF-8 bytes of base prompt + turns <= {cfg.max_record_bytes} (upper bound on byte-level "
                       "BPE tokens)",
    }


def _write_outputs(tally: Tally, share: float) -> dict:
    work, cfg = tally.work, tally.cfg
    io.write_jsonl(work / "quarantine.jsonl", tally.quarantine)
    io.write_json(work / "validation.json", vi.run_suite(tally.rows, list(cfg.langs), cfg.max_record_bytes))
    for split, meta_name in (("train", "meta_file.json"), ("test", "meta_test.json")):
        # paths are written relative to the meta file once it is in place (out_dir)
        entries = {n: {k: v for k, v in e.items() if k not in ("split", "task", "lang")}
                   for (s, n), e in tally.entries.items() if s == split and e["length"]}
        metafile.write(work / meta_name, entries, relative_to=tally.out_dir)
    summary = _summary(tally, share)
    io.write_json(work / "summary.json", summary)
    return summary


def _work_dir(out_dir: Path, fingerprint: str) -> Path:
    """The resumable work directory: kept when its fingerprint matches, emptied otherwise."""
    work = out_dir.parent / f".{out_dir.name}.partial"
    stamp = work / "fingerprint.txt"
    if work.exists() and not (stamp.is_file() and stamp.read_text(encoding="utf-8") == fingerprint):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    io.write_text(stamp, fingerprint)
    return work


def materialize(data_root: Path, out_dir: Path, config: Config) -> dict:
    """Build every record of `materialize` from `data_root` (+ extra sources) into `out_dir`."""
    cfg = config.materialize
    data_root, out_dir = Path(data_root), Path(out_dir)
    min_pixels = config.validate_.min_mask_pixels
    # what shard contents depend on: the section (not the worker count) and the inputs' bytes
    fingerprint = io.content_hash(SHARD_FORMAT, str(data_root), str(out_dir), min_pixels,
                                  cfg.model_dump(mode="json", exclude={"workers", "dask_address"}),
                                  *(data_root / n for n in (MAPPING_FILE, CLASS_MAPPING_FILE, REPORTS_FILE)))
    work = _work_dir(out_dir, fingerprint)
    tally = Tally(cfg, work, out_dir, data_root)
    job = {"work": str(work), "out_dir": str(out_dir), "tasks": list(cfg.tasks), "langs": list(cfg.langs),
           "settings": list(cfg.t2r_settings), "seed": cfg.seed, "test_share": cfg.test_share,
           "max_bytes": cfg.max_record_bytes, "min_pixels": min_pixels}
    built = False
    try:
        reports = read_reports(data_root, list(cfg.langs)) if set(cfg.tasks) & set(REPORT_TASKS) else {}
        items = ((s, reports.get(s.rel_image)) for s in iter_samples(data_root))
        shards.run(items, size=cfg.shard_size, work=work, build=build_shard, args=(job,), take=tally.take,
                   workers=cfg.n_workers, dask_address=cfg.dask_address, total=_count_images(data_root),
                   desc="materialize")
        _extra_sources(cfg, tally)
        tally.write_extra()
        built = True  # every record is written: what follows is a verdict, not a crash
        summary = _write_outputs(tally, _verdict(tally, data_root))
        shards.discard_bookkeeping(work)  # resume bookkeeping is not part of the output
        (work / "fingerprint.txt").unlink()
        io.replace_dir(work, out_dir)
    except BaseException:
        # Interrupted while building: the work directory stays so a re-run keeps its finished
        # shards. Built but rejected by a dataset rule, or nothing finished to resume from (e.g.
        # a bad input file): drop it, nothing half-written stays behind.
        if built or not shards.finished(work):
            shutil.rmtree(work, ignore_errors=True)
        raise
    return summary


def _count_images(data_root: Path) -> int | None:
    """Images in the mapping, for the progress bar's total (the reader streams, it cannot say)."""
    try:
        with (data_root / MAPPING_FILE).open(encoding="utf-8") as fh:
            return len(json.load(fh))
    except (OSError, ValueError):
        return None
