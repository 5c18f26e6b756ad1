"""The memory plan (model/plan.py) against the peak memory measured on an H200 (benchmarks/gpu_train.py).

Every row of benchmarks/results/gpu_train_h200_*.json is planned with the settings that run used:
the InternVL3-2B-shaped model gpu_train.py builds (its SHAPES and QWEN_VOCAB, read from the script;
448-px tiles, patch 14, pixel shuffle 0.5, tied embeddings as InternVLConfig's default), bf16 weights
under the Trainer's autocast, no DeepSpeed, one GPU, torch AdamW, LoRA as params.yaml's tune.lora
(dropout as the row records it), the row's batch, attention and checkpointing.

Two inputs are not in the JSON files and are stated here:
- PEAK_BATCH_TOKENS: peak memory is set by the longest padded batch, not the mean. The Trainer's
  length-grouped sampler puts the batch holding the longest record first, and the collator pads a
  batch to its longest record, so the peak batch is `batch x longest record`. The benchmark's data
  are not stored; they were rebuilt here with the code and params of the benchmark's commit (d53b4d3:
  12 patients per modality, tasks caption/r2t/t2r; `medrega generate`, `validate`, `materialize`, the
  tiny BPE tokenizer, 448-px processor with 256 image tokens): 1538 R2T/T2R records, mean 412.38 tokens
  (the JSON records 412.50), longest 553. `--meta`/`--processor` recompute it from a dataset.
- The harness's own copy of the model: gpu_train.py builds the model on the GPU, saves it, and keeps
  it (`model`, used for the FLOP count) for the whole run, so every measured peak includes its bf16
  weights (total_params x 2 bytes, total_params from the JSON). It is not part of training; it is
  added to the plan for the comparison only, the same for every row.

Usage: python benchmarks/plan_vs_measured.py [--results benchmarks/results] [--json out.json]
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import yaml

from model.plan import GIB, Architecture, TextArch, TrainingSetup, VisionArch, make_plan

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PEAK_BATCH_TOKENS = 553        # longest record of the benchmark's data (see above)
IMAGE_SIZE, PATCH_SIZE, DOWNSAMPLE = 448, 14, 0.5  # gpu_train.py's `shape`
HARNESS_WEIGHT_BYTES = 2       # bf16 copy of the model the harness keeps on the GPU


def _literal(node: ast.AST):
    """ast.literal_eval that also reads `dict(a=1, ...)` calls."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords}
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def benchmark_shapes(script: Path = ROOT / "benchmarks" / "gpu_train.py") -> tuple[dict, int]:
    """SHAPES and QWEN_VOCAB as gpu_train.py defines them (read, not imported)."""
    found = {}
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and getattr(node.targets[0], "id", None) in (
                "SHAPES", "QWEN_VOCAB"):
            found[node.targets[0].id] = _literal(node.value)
    return found["SHAPES"], found["QWEN_VOCAB"]


def benchmark_architecture(shape_name: str) -> Architecture:
    shapes, vocab = benchmark_shapes()
    s = shapes[shape_name]
    # tiny_config: InternVLVisionConfig defaults (no qkv bias, LayerNorm, intermediate 4 x hidden),
    # a Qwen2Config (qkv bias), InternVLConfig's default tie_word_embeddings=True
    vision = VisionArch(hidden_size=s["vision_hidden_size"], num_layers=s["vision_layers"], num_heads=s["vision_heads"],
                        intermediate_size=4 * s["vision_hidden_size"], image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                        qkv_bias=False, norm_type="layer_norm")
    text = TextArch(s["text_hidden_size"], s["text_layers"], s["text_heads"], s["text_kv_heads"],
                    s["text_intermediate_size"], vocab, qkv_bias=True)
    return Architecture(f"{shape_name}-shaped (gpu_train.py)", vision, text, downsample_ratio=DOWNSAMPLE,
                        tie_word_embeddings=True, source="benchmarks/gpu_train.py")


def lora_settings() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())["tune"]["lora"]


def rows(results: Path = RESULTS, peak_tokens: int = PEAK_BATCH_TOKENS) -> list[dict]:
    lora = lora_settings()
    out = []
    for path in sorted(results.glob("gpu_train_h200_*.json")):
        report = json.loads(path.read_text())
        arch = benchmark_architecture(report["shape"])
        for run in report["runs"]:
            if "error" in run:
                continue
            setup = TrainingSetup(stage="tune", mode=run["mode"], lora_r=lora["r"],
                                  lora_targets=tuple(lora["target_modules"]),
                                  lora_dropout=run.get("lora_dropout", lora["dropout"]), zero_stage=None,
                                  dtype="bfloat16", amp=True, per_device_batch=report["batch"],
                                  tokens_per_sample=peak_tokens, gradient_checkpointing=run["gradient_checkpointing"],
                                  attn_implementation=run["attention"], gpus_per_node=1, nodes=1,
                                  gpu_memory_bytes=int(141 * GIB))
            plan = make_plan(arch, setup, with_levers=False)
            harness = report["total_params"] * HARNESS_WEIGHT_BYTES
            planned = plan.total_bytes + harness
            measured = run["peak_memory_gib"] * GIB
            out.append({
                "file": path.name, "mode": run["mode"], "attention": run["attention"],
                "gradient_checkpointing": run["gradient_checkpointing"], "batch": report["batch"],
                "lora_dropout": setup.lora_dropout if run["mode"] == "lora" else None,
                "arch_params": arch.total_params, "json_params": report["total_params"],
                "plan_gib": plan.total_bytes / GIB, "harness_gib": harness / GIB, "planned_gib": planned / GIB,
                "measured_gib": run["peak_memory_gib"], "ratio": planned / measured,
                "components": {c.name: c.bytes / GIB for c in plan.components},
            })
    return out


def peak_tokens_from_data(meta: Path, processor: Path) -> int:
    """The longest R2T/T2R record, as gpu_train.py measures lengths (448-px tiles, 256 image tokens)."""
    from model.data import InstructionDataset
    from model.processor import MedRegAProcessor

    proc = MedRegAProcessor.from_pretrained(processor)
    proc.config.image_size, proc.config.num_image_tokens, proc.config.max_length = IMAGE_SIZE, 256, 1024
    return max(InstructionDataset(meta, proc, ["r2t", "t2r"]).lengths())


def table(data: list[dict]) -> str:
    lines = ["| mode | attention | grad. ckpt | batch | measured GiB | planned GiB | plan / measured |",
             "|---|---|---|---|---|---|---|"]
    for r in data:
        mode = "full LLM" if r["mode"] == "full" else f"LoRA (dropout {r['lora_dropout']:g})"
        lines.append(f"| {mode} | {r['attention']} | {'yes' if r['gradient_checkpointing'] else 'no'} | {r['batch']} "
                     f"| {r['measured_gib']:.1f} | {r['planned_gib']:.1f} | {r['ratio']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--meta", type=Path, help="meta_file.json of the benchmark's data, to recompute the peak batch")
    ap.add_argument("--processor", type=Path, help="saved processor for --meta")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    peak = peak_tokens_from_data(a.meta, a.processor) if a.meta else PEAK_BATCH_TOKENS
    data = rows(a.results, peak)
    print(f"peak batch: batch x {peak} tokens; planned = plan + the harness's bf16 model "
          f"({data[0]['harness_gib']:.2f} GiB)\n")
    print(table(data))
    print("\nplanned components (GiB), harness copy excluded:")
    for r in data:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["components"].items() if v)
        print(f"- {r['mode']}/{r['attention']}/ckpt={int(r['gradient_checkpointing'])}/b{r['batch']}: {parts}")
    if a.json:
        a.json.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
