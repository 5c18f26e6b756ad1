"""The GPU path of the tune stage on an InternVL3-sized model: bf16, sdpa / flash attention, MFU.

No weights can be downloaded, so the model is an InternVL3-2B-shaped network (InternViT-300M
vision tower, pixel-shuffle MLP projector, Qwen2.5-1.5B-shaped language model, 151,674-token
vocabulary) with random weights. Speed does not depend on the weights' values. It is saved and
then trained by `model.train.train_stage` itself: the same loading (dtype, attention
implementation), freezing, LoRA, TrainingArguments (bf16, gradient checkpointing,
length-grouped batching) and saving as the pipeline's tune stage, on the embedded
instruction data upscaled to 448-px tiles.

MFU = model FLOPs per second / the card's bf16 matmul peak, measured here in the same run
(an 8192^3 bf16 matmul). Model FLOPs per sample count the linear layers and attention
(non-causal, as PaLM's accounting does): the frozen vision tower and projector run forward
only; the LLM runs forward and backward, the backward counted as one forward for LoRA
(activation gradients through frozen weights) and two for full-LLM tuning (activation and
weight gradients). Recomputation under gradient checkpointing is not counted (that would be
hardware FLOPs utilisation). Tokens are the real ones, not padding.

Run from the repository root after `make pipeline` (or with --data/--processor pointing at
copies of artifacts/instructions/meta_file.json and a saved processor):
    python benchmarks/gpu_train.py --steps 30 --runs lora:sdpa:0,lora:eager:0,full:sdpa:1
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import InternVLForConditionalGeneration, TrainerCallback

from medrega.config import load_params
from model.data import InstructionDataset
from model.presets import num_image_tokens, tiny_config
from model.processor import MedRegAProcessor
from model.train import train_stage

# Shapes of the released InternVL3 "-hf" checkpoints (config.json of each).
SHAPES = {
    "internvl3-2b": dict(vision_hidden_size=1024, vision_layers=24, vision_heads=16, text_hidden_size=1536,
                         text_layers=28, text_heads=12, text_kv_heads=2, text_intermediate_size=8960),
    "internvl3-1b": dict(vision_hidden_size=1024, vision_layers=24, vision_heads=16, text_hidden_size=896,
                         text_layers=24, text_heads=14, text_kv_heads=2, text_intermediate_size=4864),
    # for checking this script on a CPU box
    "smoke": dict(vision_hidden_size=64, vision_layers=2, vision_heads=2, text_hidden_size=64,
                  text_layers=2, text_heads=2, text_kv_heads=1, text_intermediate_size=128),
}
QWEN_VOCAB = 151_674


class StepTimer(TrainerCallback):
    def __init__(self):
        self.begin: list[float] = []
        self.end: list[float] = []

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kw):
        self._sync()
        self.begin.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        self._sync()
        self.end.append(time.perf_counter())

    def steady(self, skip: int) -> tuple[int, float, float]:
        """(steps, seconds, data-wait seconds) from step `skip` on; the first steps warm up."""
        steps = len(self.end) - skip
        seconds = self.end[-1] - self.begin[skip]
        wait = sum(b - e for e, b in zip(self.end[skip:-1], self.begin[skip + 1:]))
        return steps, seconds, wait


def matmul_peak(device: str, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    """Measured FLOP/s of one large matmul: the ceiling MFU is read against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def linear_weights(module: nn.Module) -> int:
    """Multiply-accumulates per token of every Linear/Conv2d (a patch conv is one output per patch)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def flops_per_sample(model: InternVLForConditionalGeneration, shape: dict, tokens: float, mode: str) -> dict:
    vision_tokens = (shape["image_size"] // shape["patch_size"]) ** 2 + 1  # + CLS
    image_tokens = num_image_tokens(shape)
    fwd_vision = (2 * linear_weights(model.model.vision_tower) * vision_tokens
                  + 4 * shape["vision_layers"] * vision_tokens**2 * shape["vision_hidden_size"])
    fwd_projector = 2 * linear_weights(model.model.multi_modal_projector) * image_tokens
    llm = linear_weights(model.model.language_model) + linear_weights(model.lm_head)
    fwd_llm = 2 * llm * tokens + 4 * shape["text_layers"] * tokens**2 * shape["text_hidden_size"]
    total = fwd_vision + fwd_projector + fwd_llm * (2 if mode == "lora" else 3)
    return {"flops_per_sample": total, "llm_linear_params": llm,
            "vision_linear_params": linear_weights(model.model.vision_tower)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="internvl3-2b", choices=sorted(SHAPES))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", type=Path, default=Path("artifacts/instructions/meta_file.json"))
    ap.add_argument("--processor", type=Path, default=Path("artifacts/align/model"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the timing")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--runs", default="lora:sdpa:0,lora:eager:0,full:sdpa:1",
                    help="mode:attention:gradient_checkpointing, comma separated")
    ap.add_argument("--lora-dropout", type=float, default=None, help="override params' LoRA dropout")
    ap.add_argument("--work", type=Path, default=Path("/tmp/medrega-gpu"))
    ap.add_argument("--out", type=Path, default=Path("gpu_train.json"))
    a = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    report = {"card": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "transformers": transformers.__version__, "shape": a.shape, "batch": a.batch,
              "steps": a.steps, "timed_steps": a.steps - a.skip, "runs": []}
    report["matmul_peak_tflops"] = matmul_peak(device, dtype, 8192 if cuda else 1024) / 1e12
    print(f"{report['card']}: measured bf16 matmul peak {report['matmul_peak_tflops']:.0f} TFLOP/s", flush=True)

    shape = dict(SHAPES[a.shape], image_size=448, patch_size=14, downsample_ratio=0.5, max_length=1024)
    processor = MedRegAProcessor.from_pretrained(a.processor)
    processor.config.image_size = shape["image_size"]
    processor.config.num_image_tokens = num_image_tokens(shape)
    processor.config.max_length = shape["max_length"]

    base = a.work / "base"
    shutil.rmtree(a.work, ignore_errors=True)
    config = tiny_config(shape, processor.tokenizer)
    config.text_config.vocab_size = max(QWEN_VOCAB, len(processor.tokenizer)) if a.shape != "smoke" else len(processor.tokenizer)
    torch.manual_seed(0)
    with torch.device(device):
        model = InternVLForConditionalGeneration(config).to(dtype)
    model.save_pretrained(base)
    processor.save_pretrained(base)
    total_params = sum(p.numel() for p in model.parameters())
    report["total_params"] = total_params
    print(f"{a.shape}-shaped model: {total_params / 1e9:.2f} B parameters", flush=True)

    params = load_params(a.params)
    params["model"].update(shape, dtype="bfloat16")
    params["materialize"]["tasks"] = ["r2t", "t2r"]
    lengths = InstructionDataset(a.data, processor, ["r2t", "t2r"]).lengths()
    tokens = sum(lengths) / len(lengths)
    report["mean_tokens_per_sample"] = tokens

    for spec in a.runs.split(","):
        mode, attn, ckpt = spec.split(":")
        row = {"mode": mode, "attention": attn, "gradient_checkpointing": ckpt == "1"}
        if attn == "flash_attention_2" and not transformers.utils.is_flash_attn_2_available():
            row["error"] = "flash-attn is not installed on this machine"
            report["runs"].append(row)
            print(row, flush=True)
            continue
        run_params = copy.deepcopy(params)
        run_params["model"]["attn_implementation"] = attn
        run_params["tune"].update(mode=mode, max_steps=a.steps, per_device_batch_size=a.batch, save_steps=10**9,
                                  logging_steps=10, bf16=True, deepspeed=None, gradient_checkpointing=ckpt == "1",
                                  group_by_length=True, dataloader_num_workers=a.workers, warmup_ratio=0.0)
        if a.lora_dropout is not None:
            run_params["tune"]["lora"]["dropout"] = a.lora_dropout
        row["lora_dropout"] = run_params["tune"]["lora"]["dropout"]
        timer = StepTimer()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out = a.work / f"{mode}-{attn}-{ckpt}"
        try:
            summary = train_stage("tune", run_params, a.data, base, out, callbacks=[timer])
        except Exception as exc:  # one failing configuration must not hide the others' numbers
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            report["runs"].append(row)
            print(row, flush=True)
            continue
        steps, seconds, wait = timer.steady(a.skip)
        samples_per_s = steps * a.batch / seconds
        flops = flops_per_sample(model, shape, tokens, mode)
        row.update(flops, samples_per_s=samples_per_s, tokens_per_s=samples_per_s * tokens,
                   data_wait_share=wait / seconds, step_seconds=seconds / steps,
                   mfu=flops["flops_per_sample"] * samples_per_s / (report["matmul_peak_tflops"] * 1e12),
                   peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                   final_loss=summary.get("train_loss"), global_step=summary["global_step"])
        report["runs"].append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out, ignore_errors=True)

    a.out.write_text(json.dumps(report, indent=2))
    print(f"\n{report['card']}, {a.shape}-shaped ({total_params / 1e9:.2f} B), batch {a.batch}, "
          f"{tokens:.0f} tokens/sample, peak {report['matmul_peak_tflops']:.0f} TFLOP/s\n")
    print("| mode | attention | grad ckpt | samples/s | tokens/s | data wait | peak GiB | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        if "error" in r:
            print(f"| {r['mode']} | {r['attention']} | {r['gradient_checkpointing']} | {r['error']} ||||| ")
        else:
            mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
            print(f"| {r['mode']} | {r['attention']} | {r['gradient_checkpointing']} | {r['samples_per_s']:.1f} | "
                  f"{r['tokens_per_s']:.0f} | {r['data_wait_share']:.1%} | {mem} | {r['mfu']:.1%} |")


if __name__ == "__main__":
    main()
