"""Materialize instruction records into InternVL JSONL + meta files (SPEC §1, §3).

Sources, each written to its own annotation files because a meta entry has one image root:
    data root (SA-Med2D layout + reports.jsonl)  <task>_<lang>_<split>-<shard:05d>.jsonl,
                                                 key "<task>_<lang>-<shard:05d>" (one entry per shard)
    materialize.mimic {root, boxes} (optional)   <task>_<lang>_<split>_mimic.jsonl, "<task>_<lang>_mimic"
    materialize.released_meta (optional)         <task>_<lang>_train_released_<name>.jsonl,
                                                 "<task>_<lang>_released_<name>" (as-is repeat_time)
Keys start with the task so training's task filter (model.data.read_meta) sees it.

Output (out_dir): the JSONL files, meta_file.json (train), meta_test.json (test), summary.json,
quarantine.jsonl (records that broke a per-record rule, with file, id, rule, detail) and
validation.json (the instruction suite's results, tasks/validate_instructions.py).

Scale (issue 3). The data root is streamed: samples are taken from the reader `shard_size`
images at a time, each shard is built by a worker (a local process pool of `workers`, or a Dask
cluster through Prefect's DaskTaskRunner when `dask_address` is set) and written as its own
annotation files, and at most a few shards are in flight, so memory holds shards, never the
dataset. Shard k always holds images [k*shard_size, (k+1)*shard_size) of the sorted image list
and its records depend on nothing else, so the bytes are the same for any worker count.

Resume. Everything is written into a work directory beside out_dir (.<out>.partial) that a
failure or a kill leaves behind. A shard is finished when its manifest (shards/<k>.json) exists;
it is written after the shard's files, so a re-run keeps finished shards and redoes the rest. The
work directory carries a fingerprint of params and inputs; a change discards it. Only a run that
passes every rule renames the work directory into place (old output aside, new one in), so a
failure never leaves a half-written out_dir and never destroys the previous one.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from medrega.records import builders
from medrega.records.report_builders import REPORT_TASKS, build_report_records
from medrega.records.report_templates import ALL_BASE_PROMPTS
from medrega.sources.reports import REPORTS_FILE, read_reports
from medrega import io
from medrega.sources.samed2d import CLASS_MAPPING_FILE, MAPPING_FILE, iter_samples
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


SHARDS_DIR = "shards"  # inside the work directory: one manifest per finished shard
SHARD_FORMAT = 1  # part of the fingerprint: bump when shard contents change for the same inputs


def shard_name(task: str, lang: str, split: str, k: int) -> str:
    return f"{task}_{lang}_{split}-{k:05d}.jsonl"


def _build_shard(k: int, samples: list, reports: dict, job: dict) -> dict:
    """Build, check and write shard k of the data root; return its manifest.

    Runs in a worker (process or Dask): it gets only picklable inputs and touches only shard k's
    files. Each file is written atomically and the manifest last, so a kill at any point leaves
    either a finished shard or one that the next run redoes."""
    work, out_dir, settings = Path(job["work"]), Path(job["out_dir"]), job["settings"]
    lines: dict[tuple, list[str]] = {}
    man = {"shard": k, "images": {s: 0 for s in SPLITS}, "quarantine": [], "rows": [], "settings": {}}
    patients = set()
    for sample in samples:
        split = builders.split_of(sample.dataset, sample.patient, job["test_share"])
        man["images"][split] += 1
        patients.add((split, sample.dataset, sample.patient))
        regions = builders.region_boxes(sample, job["min_pixels"])
        report = reports.get(sample.rel_image)
        for rec in _own_records(sample, regions, report, split, job["tasks"], job["langs"], settings,
                                job["seed"], bool(report and report.exhaustive)):
            key = (rec["task"], rec["lang"], split)
            file = shard_name(*key, k)
            prompt = ALL_BASE_PROMPTS.get(rec["task"], {}).get(rec["lang"], "")
            problems = vi.check_record(rec, job["max_bytes"], prompt)
            if problems:
                rule, detail = problems[0]
                man["quarantine"].append({"file": file, "id": rec.get("id"), "rule": rule, "detail": detail})
                continue
            lines.setdefault(key, []).append(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
            man["rows"].append(vi.row_of(rec, str(out_dir / file), prompt))
            if rec["task"] == "t2r" and rec["setting"] in settings:
                tag = f"{rec['lang']}/{split}/{rec['setting']}"
                man["settings"][tag] = man["settings"].get(tag, 0) + 1
    for key, body in sorted(lines.items()):
        io.write_text(work / shard_name(*key, k), "".join(body))
    man["patients"] = sorted(patients)
    man["counts"] = [[*key, len(body)] for key, body in sorted(lines.items())]
    io.write_json(work / SHARDS_DIR / f"{k:05d}.json", man, indent=None)
    return man


def _chunks(samples, size: int):
    """(k, list of `size` samples) taken lazily from an iterator: never more than one chunk here."""
    it = iter(samples)
    for k in itertools.count():
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield k, chunk


class _Ready:
    """A finished shard, shaped like a future so the ordered drain below treats all alike."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _drive(samples, reports: dict, job: dict, submit, window: int, take, bar) -> None:
    """Feed shards to `submit(fn, *args) -> future` with at most `window` in flight, and hand
    each manifest to `take` in shard order (so aggregation is the same for any worker count).
    Shards with a manifest from an earlier run are read back, not rebuilt."""
    pending: deque = deque()

    def drain_one():
        future, n = pending.popleft()
        take(future.result())
        bar.update(n)

    for k, chunk in _chunks(samples, job["shard_size"]):
        done = Path(job["work"]) / SHARDS_DIR / f"{k:05d}.json"
        if done.is_file():
            pending.append((_Ready(json.loads(done.read_text(encoding="utf-8"))), len(chunk)))
        else:
            mine = {s.rel_image: reports[s.rel_image] for s in chunk if s.rel_image in reports}
            pending.append((submit(_build_shard, k, chunk, mine, job), len(chunk)))
        while len(pending) > window:
            drain_one()
    while pending:
        drain_one()


def _run_shards(samples, reports: dict, job: dict, workers: int, dask_address: str | None, take, total) -> None:
    bar = tqdm(total=total, unit="img", desc="materialize", mininterval=2.0)
    try:
        if dask_address:
            from tasks import materialize_dask

            materialize_dask.run(dask_address, samples, reports, job, 4 * max(workers, 1), take, bar)
        elif workers <= 1:
            _drive(samples, reports, job, lambda fn, *a: _Ready(fn(*a)), 0, take, bar)
        else:
            with ProcessPoolExecutor(workers) as pool:
                try:
                    _drive(samples, reports, job, pool.submit, 2 * workers, take, bar)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # finished shards stay for resume
                    raise
    finally:
        bar.close()


def _fingerprint(data_root: Path, out_dir: Path, cfg: dict, min_pixels: int) -> str:
    """What shard contents depend on: params (not the worker count), inputs' size and mtime."""
    knobs = {k: v for k, v in cfg.items() if k not in ("workers", "dask_address")}
    stats = []
    for name in (MAPPING_FILE, CLASS_MAPPING_FILE, REPORTS_FILE):
        path = data_root / name
        if path.is_file():
            st = path.stat()
            stats.append([name, st.st_size, st.st_mtime_ns])
    blob = json.dumps([SHARD_FORMAT, str(data_root), str(out_dir), knobs, min_pixels, stats],
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def _work_dir(out_dir: Path, fingerprint: str) -> Path:
    """The resumable work directory: kept when its fingerprint matches, emptied otherwise."""
    work = out_dir.parent / f".{out_dir.name}.partial"
    stamp = work / "fingerprint.txt"
    if work.exists() and not (stamp.is_file() and stamp.read_text(encoding="utf-8") == fingerprint):
        shutil.rmtree(work)
    (work / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    io.write_text(stamp, fingerprint)
    return work


def _count_images(data_root: Path) -> int | None:
    """Images in the mapping, for the progress bar's total (the reader streams, it cannot say)."""
    try:
        with (data_root / MAPPING_FILE).open(encoding="utf-8") as fh:
            return len(json.load(fh))
    except (OSError, ValueError):
        return None


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

    shard_size = int(cfg.get("shard_size", 10000))
    workers = int(cfg.get("workers") or os.cpu_count() or 1)  # null/0: one per core
    if shard_size < 1:
        raise ValueError(f"materialize.shard_size must be >= 1, got {shard_size}")

    data_root, out_dir = Path(data_root), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _work_dir(out_dir, _fingerprint(data_root, out_dir, cfg, min_pixels))
    setting_counts = {lang: {s: {k: 0 for k in settings} for s in SPLITS} for lang in langs}
    patients = {s: set() for s in SPLITS}
    images = {s: 0 for s in SPLITS}
    w = _Writer(tmp, out_dir, max_bytes)
    shard_counts: dict[tuple, int] = {}  # (task, lang, split, shard) -> n, data root only
    built = False
    try:
        # 1. our own data root: SA-Med2D layout, with reports where reports.jsonl has them;
        # streamed in shards over the workers (module docstring)
        w.roots[""] = str(data_root)
        reports = read_reports(data_root, langs) if set(tasks) & set(REPORT_TASKS) else {}
        job = {"work": str(tmp), "out_dir": str(out_dir), "tasks": tasks, "langs": langs,
               "settings": settings, "seed": seed, "test_share": test_share, "max_bytes": max_bytes,
               "min_pixels": min_pixels, "shard_size": shard_size}

        def take(man: dict) -> None:  # called in shard order
            for q in man["quarantine"]:
                w.reject(q["file"], q["id"], q["rule"], q["detail"])
            w.rows.extend(man["rows"])
            for t, lang, split, n in man["counts"]:
                shard_counts[(t, lang, split, man["shard"])] = n
            for split, dataset, patient in man["patients"]:
                patients[split].add((dataset, patient))
            for split, n in man["images"].items():
                images[split] += n
            for tag, n in man["settings"].items():
                lang, split, setting = tag.split("/")
                setting_counts[lang][split][setting] += n

        _run_shards(iter_samples(data_root), reports, job, workers, cfg.get("dask_address"), take,
                    _count_images(data_root))
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
        built = True  # every record is written: what follows is a verdict, not a crash

        leaked = patients["train"] & patients["test"]
        if leaked:  # split_of makes this impossible; guards a future change to patient naming
            raise ValueError(f"{data_root}: rule '{vi.R_SPLIT}' failed for {sorted(leaked)[:5]}")
        empty = [s for s in SPLITS if not patients[s]]
        if empty:
            # Too few patients for the hash split to fill both sides: say so before training.
            raise ValueError(f"{data_root}: split(s) {empty} got no patient out of "
                             f"{sum(len(p) for p in patients.values())}; raise materialize.test_share or add patients")
        total = sum(w.counts.values()) + sum(shard_counts.values()) + w.quarantined
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
            for (t, lang, split, k), n in sorted(shard_counts.items()):
                if split == s:  # one entry per shard: InternVL's loader reads one file per entry
                    meta[f"{t}_{lang}-{k:05d}"] = {
                        "root": w.roots[""], "annotation": str(out_dir / shard_name(t, lang, split, k)),
                        "length": n, "repeat_time": 1, "data_augment": AUGMENT[t],
                        "base_prompt": ALL_BASE_PROMPTS[t][lang]}
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
        for (t, lang, split, _), n in shard_counts.items():
            counts[t][lang][split] += n
        if shard_counts:
            by_source["data_root"] = sum(shard_counts.values())
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
            "shards": 1 + max((k for *_, k in shard_counts), default=-1),
            "quarantined": w.quarantined,
            "quarantine_share": share,
            "length_rule": f"UTF-8 bytes of base prompt + turns <= {max_bytes} (upper bound on byte-level BPE tokens)",
        }
        _dump(summary, tmp / "summary.json")
        # Resume bookkeeping is not part of the output.
        shutil.rmtree(tmp / SHARDS_DIR)
        (tmp / "fingerprint.txt").unlink()
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
        # Interrupted while building: the work directory stays so a re-run keeps its finished
        # shards. Built but rejected by a dataset rule, or nothing finished to resume from (e.g.
        # a bad input file): drop it, nothing half-written stays behind.
        if built or not any((tmp / SHARDS_DIR).iterdir()):
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
