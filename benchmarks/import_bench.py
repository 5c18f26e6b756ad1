"""Importing a remote-layout InternVL checkpoint: time and peak memory against one shard and the whole.

A V1-2-shaped replica (Llama LM, InternViT with qk-norm, ps_version v1) is written in float32 with
many shards, then three fresh processes each report their peak RSS, all in this one run:

- baseline: the same imports (torch, transformers, model.convert and the transformers classes the
            import uses, about 140 MB of code on their own), nothing loaded;
- import:   `import_checkpoint(replica, out)`;
- whole:    every shard loaded into one materialised state dict (what a load-everything conversion
            holds at least).

The figures that matter are ratios from the same run: (import peak - baseline) over the largest
shard and over the whole checkpoint. Memory bounded by a shard means the first stays near or
below 1 and does not grow with the number of shards, while the whole-model load grows with the
checkpoint.

    .venv/bin/python benchmarks/import_bench.py                      # 570 MB in 24 and 6 shards, 1.1 GB in 48
    .venv/bin/python benchmarks/import_bench.py --configs 64x96         # about 2.3 GB
"""
from __future__ import annotations

import argparse
import json
import math
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
# The classes the import itself uses, loaded in every mode: the baseline holds the same code.
from transformers import InternVLForConditionalGeneration, InternVLConfig, LlamaConfig, PreTrainedTokenizerFast
import transformers.models.internvl.modeling_internvl, transformers.models.llama.modeling_llama
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
    from safetensors import safe_open

    from tests.internvl_replicas import ReplicaSpec, build_replica

    src = root / f"replica-{shards}"
    t0 = time.perf_counter()
    build_replica(src, ReplicaSpec(shards=shards, lm_layers=lm_layers, lm_hidden=lm_hidden, lm_heads=8,
                                   lm_kv_heads=2, vision_hidden=256, vision_heads=4, vision_layers=8))
    built = time.perf_counter() - t0
    sizes = [p.stat().st_size / 2 ** 20 for p in src.glob("model-*.safetensors")]
    tensor_mb = 0.0
    for shard in src.glob("model-*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                shape = handle.get_slice(key).get_shape()
                tensor_mb = max(tensor_mb, 4 * math.prod(shape) / 2 ** 20)
    base = child("baseline", src, root / "unused")
    imp = child("import", src, root / f"imported-{shards}")
    whole = child("whole", src, root / "unused")
    written = sum(p.stat().st_size for p in (root / f"imported-{shards}").glob("*.safetensors")) / 2 ** 20
    shutil.rmtree(root / f"imported-{shards}")
    shutil.rmtree(src)
    largest, total = max(sizes), sum(sizes)
    return {
        "shards": shards, "lm_layers": lm_layers, "checkpoint_mb": round(total, 1),
        "largest_shard_mb": round(largest, 1), "largest_tensor_mb": round(tensor_mb, 1),
        "replica_build_s": round(built, 1),
        "baseline_peak_rss_mb": round(base["peak_rss_mb"], 1),
        "import_peak_rss_mb": round(imp["peak_rss_mb"], 1), "import_s": round(imp["seconds"], 2),
        "import_mb_per_s": round(total / imp["seconds"], 1), "written_mb": round(written, 1),
        "whole_load_peak_rss_mb": round(whole["peak_rss_mb"], 1),
        "import_over_baseline_mb": round(imp["peak_rss_mb"] - base["peak_rss_mb"], 1),
        "import_extra_per_largest_shard": round((imp["peak_rss_mb"] - base["peak_rss_mb"]) / largest, 2),
        "import_extra_per_largest_tensor": round((imp["peak_rss_mb"] - base["peak_rss_mb"]) / tensor_mb, 2),
        "import_extra_per_checkpoint": round((imp["peak_rss_mb"] - base["peak_rss_mb"]) / total, 3),
        "whole_extra_per_checkpoint": round((whole["peak_rss_mb"] - base["peak_rss_mb"]) / total, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["16x24", "16x6", "32x48"],
                        help="LAYERSxSHARDS per replica: 16 LM layers of width 1024 are about 570 MB in float32")
    parser.add_argument("--lm-hidden", type=int, default=1024)
    parser.add_argument("--out", type=Path, help="Also write the rows as JSON here.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="import-bench-") as tmp:
        for config in args.configs:
            layers, shards = (int(v) for v in config.split("x"))
            rows.append(bench(Path(tmp), shards, layers, args.lm_hidden))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"{'shards':>6} {'ckpt MB':>8} {'shard MB':>8} {'tensor MB':>9} {'import s':>8} {'MB/s':>6} "
          f"{'import +RSS MB':>14} {'/shard':>7} {'/tensor':>7} {'/ckpt':>6} {'whole-load +RSS /ckpt':>21}")
    for r in rows:
        print(f"{r['shards']:>6} {r['checkpoint_mb']:>8} {r['largest_shard_mb']:>8} {r['largest_tensor_mb']:>9} "
              f"{r['import_s']:>8} {r['import_mb_per_s']:>6} {r['import_over_baseline_mb']:>14} "
              f"{r['import_extra_per_largest_shard']:>7} {r['import_extra_per_largest_tensor']:>7} "
              f"{r['import_extra_per_checkpoint']:>6} {r['whole_extra_per_checkpoint']:>21}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
