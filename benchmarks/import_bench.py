"""Importing a remote-layout InternVL checkpoint: time and peak memory against one shard and the whole.

A V1-2-shaped replica (Llama LM, InternViT with qk-norm, ps_version v1) is written in float32 with
many shards, then three fresh processes each report their peak RSS, all in this one run:

- baseline: the same imports (torch, transformers, model.convert), nothing loaded;
- import:   `import_checkpoint(replica, out)`;
- whole:    every shard loaded into one materialised state dict (what a load-everything conversion
            holds at least).

The figures that matter are ratios from the same run: (import peak - baseline) over the largest
shard and over the whole checkpoint. Memory bounded by a shard means the first stays near or
below 1 and does not grow with the number of shards, while the whole-model load grows with the
checkpoint.

    .venv/bin/python benchmarks/import_bench.py                     # two layouts of ~600 MB
    .venv/bin/python benchmarks/import_bench.py --lm-layers 32 --shards 32 8
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
import torch, transformers, safetensors.torch
from model.convert import import_checkpoint
mode, src, dst = sys.argv[1:4]
t0 = time.perf_counter()
if mode == "import":
    import_checkpoint(src, dst)
elif mode == "whole":
    from pathlib import Path
    state = {{}}
    for shard in sorted(Path(src).glob("model-*.safetensors")):
        state.update((k, v.clone()) for k, v in safetensors.torch.load_file(str(shard)).items())
    assert state
# VmHWM: this process image's peak RSS (ru_maxrss would carry the parent's peak over from fork).
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak_rss_mb": int(hwm) / 1024}}))
"""


def child(mode: str, src: Path, dst: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), mode, str(src), str(dst)],
                         check=True, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(root: Path, shards: int, lm_layers: int, lm_hidden: int) -> dict:
    from tests.internvl_replicas import ReplicaSpec, build_replica

    src = root / f"replica-{shards}"
    t0 = time.perf_counter()
    build_replica(src, ReplicaSpec(shards=shards, lm_layers=lm_layers, lm_hidden=lm_hidden, lm_heads=8,
                                   lm_kv_heads=2, vision_hidden=256, vision_heads=4, vision_layers=8))
    built = time.perf_counter() - t0
    sizes = [p.stat().st_size / 2 ** 20 for p in src.glob("model-*.safetensors")]
    base = child("baseline", src, root / "unused")
    imp = child("import", src, root / f"imported-{shards}")
    whole = child("whole", src, root / "unused")
    written = sum(p.stat().st_size for p in (root / f"imported-{shards}").glob("*.safetensors")) / 2 ** 20
    shutil.rmtree(root / f"imported-{shards}")
    shutil.rmtree(src)
    largest, total = max(sizes), sum(sizes)
    return {
        "shards": shards, "checkpoint_mb": round(total, 1), "largest_shard_mb": round(largest, 1),
        "replica_build_s": round(built, 1),
        "baseline_peak_rss_mb": round(base["peak_rss_mb"], 1),
        "import_peak_rss_mb": round(imp["peak_rss_mb"], 1), "import_s": round(imp["seconds"], 2),
        "import_mb_per_s": round(total / imp["seconds"], 1), "written_mb": round(written, 1),
        "whole_load_peak_rss_mb": round(whole["peak_rss_mb"], 1),
        "import_over_baseline_mb": round(imp["peak_rss_mb"] - base["peak_rss_mb"], 1),
        "import_extra_per_largest_shard": round((imp["peak_rss_mb"] - base["peak_rss_mb"]) / largest, 2),
        "import_extra_per_checkpoint": round((imp["peak_rss_mb"] - base["peak_rss_mb"]) / total, 3),
        "whole_extra_per_checkpoint": round((whole["peak_rss_mb"] - base["peak_rss_mb"]) / total, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[24, 6])
    parser.add_argument("--lm-layers", type=int, default=16)
    parser.add_argument("--lm-hidden", type=int, default=1024)
    parser.add_argument("--out", type=Path, help="Also write the rows as JSON here.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="import-bench-") as tmp:
        for shards in args.shards:
            rows.append(bench(Path(tmp), shards, args.lm_layers, args.lm_hidden))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"{'shards':>6} {'ckpt MB':>8} {'shard MB':>8} {'import s':>8} {'MB/s':>6} {'import +RSS MB':>14} "
          f"{'/shard':>7} {'/ckpt':>6} {'whole-load /ckpt':>16}")
    for r in rows:
        print(f"{r['shards']:>6} {r['checkpoint_mb']:>8} {r['largest_shard_mb']:>8} {r['import_s']:>8} "
              f"{r['import_mb_per_s']:>6} {r['import_over_baseline_mb']:>14} {r['import_extra_per_largest_shard']:>7} "
              f"{r['import_extra_per_checkpoint']:>6} {r['whole_extra_per_checkpoint']:>16}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
