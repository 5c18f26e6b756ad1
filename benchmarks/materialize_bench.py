"""Materialization throughput: masks per second, on the same mask files, in one run.

    naive   one file at a time in one process, as materialize used to: decode with PIL, convert
            to "L", connected components over the full-size array (the pre-issue-3 mask_boxes)
    floor   the bare PNG decode of every mask (Image.open + load), nothing else, one process
    ours    materialize's box stage: medrega.sources.samed2d.mask_boxes (no mode conversion,
            components inside PIL's getbbox crop only) over a process pool of --workers,
            fed by shards of samples as tasks/materialize.py feeds them
    e2e     the whole materialize() (records, checks, shard files, GX suite) with --workers

Run: .venv/bin/python benchmarks/materialize_bench.py --patients 4 --slices 6 --size 512 --workers 2
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medrega.config import load_params  # noqa: E402
from medrega.sources import synthetic  # noqa: E402
from medrega.sources.samed2d import MAPPING_FILE, component_boxes, mask_boxes  # noqa: E402

def naive_mask_boxes(mask_path: Path, min_pixels: int = 4):
    """The pre-issue-3 implementation, verbatim in effect."""
    with Image.open(mask_path) as im:
        arr = np.asarray(im.convert("L")) > 0
    # components on the full-size array: what the old path paid for
    return component_boxes(arr, min_pixels)


def _decode(path: Path) -> None:
    with Image.open(path) as im:
        im.load()


def _ours_chunk(paths: list[Path]) -> list:
    return [mask_boxes(p) for p in paths]


def timed(label: str, fn, n: int) -> float:
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    print(f"{label:<44} {n / dt:10.1f} masks/s  ({dt:.2f} s)", flush=True)
    return n / dt, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patients", type=int, default=4, help="synthetic patients per modality")
    ap.add_argument("--slices", type=int, default=6)
    ap.add_argument("--size", type=int, default=512, help="image/mask side in pixels")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=64, help="images per shard")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end materialize run")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "samed2d"
        synthetic.generate(root, a.patients, a.slices, a.size, seed=0)
        mapping = json.loads((root / MAPPING_FILE).read_text(encoding="utf-8"))
        masks = [root / m for img in sorted(mapping) for m in sorted(mapping[img])]
        n = len(masks)
        for p in masks:  # warm the page cache so every contender reads from memory
            p.read_bytes()
        print(f"{len(mapping)} images, {n} masks of {a.size}x{a.size}, workers={a.workers}")

        floor, _ = timed("floor: PNG decode only (1 process)", lambda: [_decode(p) for p in masks], n)
        naive, want = timed("naive: decode+convert+full-size label (1 proc)", lambda: [naive_mask_boxes(p) for p in masks], n)
        one, got1 = timed("ours: mask_boxes (1 process)", lambda: [mask_boxes(p) for p in masks], n)

        # the images of a shard stay together, as in materialize
        chunks, per_image = [], [[root / m for m in sorted(mapping[img])] for img in sorted(mapping)]
        for i in range(0, len(per_image), a.shard_size):
            chunks.append([p for ms in per_image[i:i + a.shard_size] for p in ms])
        with ProcessPoolExecutor(a.workers) as pool:
            pool.submit(int).result()  # start the workers outside the timing
            ours, got = timed(f"ours: mask_boxes, {a.workers} processes, shards",
                              lambda: [b for c in pool.map(_ours_chunk, chunks) for b in c], n)
        assert got == want == got1, "boxes differ from the naive implementation"

        print(f"\nours ({a.workers} proc) / naive : {ours / naive:6.2f}x   (target >= 10x)")
        print(f"ours (1 proc) / naive        : {one / naive:6.2f}x")
        print(f"floor / ours ({a.workers} proc) : {floor / ours:6.2f}x   (target <= 1.5x)")
        print(f"floor / ours (1 proc)        : {floor / one:6.2f}x")

        if not a.no_e2e:
            import tasks.materialize as mat

            params = copy.deepcopy(load_params(REPO / "params.yaml", "tiny"))
            params["materialize"].update(workers=a.workers, shard_size=a.shard_size, test_share=0.3)
            e2e, summary = timed(f"e2e: materialize(), {a.workers} processes",
                                 lambda: mat.materialize(root, Path(tmp) / "out", params), n)
            print(f"e2e records: {sum(v for t in summary['records'].values() for l in t.values() for v in l.values())}, "
                  f"shards: {summary['shards']}; e2e / naive boxes: {e2e / naive:.2f}x")


if __name__ == "__main__":
    main()
