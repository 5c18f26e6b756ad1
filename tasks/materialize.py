"""Materialize instruction records from an SA-Med2D-style root into InternVL JSONL + meta files.

Output (out_dir):
    <task>_<lang>_<split>.jsonl   one record per line (SPEC §1 plus task/lang/setting/... keys)
    meta_file.json                train datasets, keyed "<task>_<lang>" (e.g. "r2t_en")
    meta_test.json                test datasets, same keys
    summary.json                  counts per task/lang/split and per t2r setting

Everything is written into a temporary sibling directory and renamed into place at the end, so a
crash never leaves a half-written out_dir and never destroys the previous one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from medrega.records import builders
from medrega.records.templates import BASE_PROMPTS
from medrega.sources.samed2d import iter_samples

SPLITS = ("train", "test")
# Random resized crops move the image under its boxes (SPEC §1): only box-free tasks may opt in,
# and we keep augmentation off for captions too so every task sees the same pixels.
AUGMENT = {"caption": False, "r2t": False, "t2r": False}


def _dump(obj, path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, sort_keys=True, indent=2)
        fh.write("\n")


def materialize(data_root: Path, out_dir: Path, params: dict) -> dict:
    """Build all records for params["materialize"] and swap them into out_dir atomically."""
    cfg = params["materialize"]
    tasks, langs = list(cfg["tasks"]), list(cfg["langs"])
    settings = list(cfg.get("t2r_settings", builders.SETTINGS))
    test_share, seed = float(cfg["test_share"]), int(cfg.get("seed", 0))
    min_pixels = int(params.get("validate", {}).get("min_mask_pixels", 4))
    for t in tasks:
        if t not in builders.TASKS:
            raise ValueError(f"materialize.tasks: unknown task {t!r} (known: {builders.TASKS})")
    for lang in langs:
        if lang not in builders.LANGS:
            raise ValueError(f"materialize.langs: unknown language {lang!r} (known: {builders.LANGS})")

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    counts = {t: {lang: {s: 0 for s in SPLITS} for lang in langs} for t in tasks}
    setting_counts = {lang: {s: {k: 0 for k in settings} for s in SPLITS} for lang in langs}
    patients = {s: set() for s in SPLITS}
    images = {s: 0 for s in SPLITS}
    handles = {}
    try:
        for t in tasks:
            for lang in langs:
                for s in SPLITS:
                    handles[t, lang, s] = (tmp / f"{t}_{lang}_{s}.jsonl").open("w", encoding="utf-8")
        for sample in iter_samples(data_root):
            split = builders.split_of(sample.dataset, sample.patient, test_share)
            patients[split].add((sample.dataset, sample.patient))
            images[split] += 1
            regions = builders.region_boxes(sample, min_pixels)
            for rec in builders.build_records(sample, regions, split, tasks, langs, settings, seed):
                handles[rec["task"], rec["lang"], split].write(
                    json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
                counts[rec["task"]][rec["lang"]][split] += 1
                if rec["setting"]:
                    setting_counts[rec["lang"]][split][rec["setting"]] += 1
        for fh in handles.values():
            fh.close()
        # Same patient in both splits would leak test data; split_of makes it impossible, but a
        # cheap check here guards against a future change to how patients are named.
        leaked = patients["train"] & patients["test"]
        if leaked:
            raise RuntimeError(f"patients in both splits: {sorted(leaked)[:5]}")
        empty = [s for s in SPLITS if not patients[s]]
        if empty:
            # Too few patients for the hash split to fill both sides: say so before training.
            raise ValueError(f"{data_root}: split(s) {empty} got no patient out of "
                             f"{sum(len(p) for p in patients.values())}; raise materialize.test_share or add patients")

        metas = {}
        for s, meta_name in (("train", "meta_file.json"), ("test", "meta_test.json")):
            meta = {}
            for t in tasks:
                for lang in langs:
                    n = counts[t][lang][s]
                    if n == 0:  # an empty annotation file would break the training loader
                        continue
                    meta[f"{t}_{lang}"] = {
                        "root": str(data_root),
                        "annotation": str(out_dir / f"{t}_{lang}_{s}.jsonl"),
                        "length": n,
                        "repeat_time": 1,
                        "data_augment": AUGMENT[t],
                        "base_prompt": BASE_PROMPTS[t][lang],
                    }
            _dump(meta, tmp / meta_name)
            metas[s] = sorted(meta)
        summary = {
            "records": counts,
            "t2r_settings": setting_counts,
            "images": images,
            "patients": {s: len(p) for s, p in patients.items()},
            "datasets": metas,
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
        for fh in handles.values():
            fh.close()
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
