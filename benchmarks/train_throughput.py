"""Training throughput of our tune stage against a plain HF Trainer loop, in one run.

Both train the same LoRA model (the aligned tiny model from `make pipeline`) on the same
records for the same number of steps, in one process (so ZeRO-3's communication cost, which
depends on the rank count, is left out of the comparison).
- ours: `model.data.InstructionDataset` (token ids built once, images decoded per item) and
  `model.data.Collator`, via the same `training_arguments` the stage uses;
- plain: a Dataset that tokenises each record on every access, with the same collator and a
  default `TrainingArguments`.
Prints samples/s, tokens/s, and the share of step time spent waiting for data.
Run: .venv/bin/python benchmarks/train_throughput.py [--steps 30]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import InternVLForConditionalGeneration, Trainer, TrainerCallback, TrainingArguments

from medrega.config import load_params
from model.data import Collator, InstructionDataset, iter_records
from model.processor import MedRegAProcessor
from model.train import apply_lora, freeze_for_stage, training_arguments


class Timer(TrainerCallback):
    """Step time and data wait: the gap between one step's end and the next step's start is
    where the Trainer fetches and collates the next batch."""

    def __init__(self):
        self.begin, self.end, self.tokens = [], [], 0

    def on_step_begin(self, args, state, control, **kw):
        self.begin.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        self.end.append(time.perf_counter())


class PlainDataset(Dataset):
    def __init__(self, meta: Path, processor: MedRegAProcessor):
        self.rows = list(iter_records(meta, ["r2t", "t2r"]))
        self.processor = processor

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        record, entry = self.rows[i]
        enc = self.processor.encode_example(record["conversations"][0]["value"], record["conversations"][1]["value"],
                                            entry.get("base_prompt"))
        return {**enc, "pixel_values": self.processor.load_image(Path(entry["root"]) / record["image"])}


def run(name, dataset, args, base: Path, lora: dict, pad_id: int) -> dict:
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration.from_pretrained(str(base))
    freeze_for_stage(model, "tune", "lora")
    model = apply_lora(model, lora)
    timer = Timer()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=Collator(pad_id), callbacks=[timer])
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    steps = len(timer.end)
    waits = [b - e for e, b in zip(timer.end[:-1], timer.begin[1:])]
    samples = steps * args.per_device_train_batch_size
    mean_len = sum(len(dataset[i]["input_ids"]) for i in range(min(64, len(dataset)))) / min(64, len(dataset))
    return {"name": name, "steps": steps, "seconds": total, "samples_per_s": samples / total,
            "tokens_per_s": samples * mean_len / total, "data_wait_share": sum(waits) / total}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    params = load_params(a.params)
    cfg = dict(params["tune"], max_steps=a.steps, save_steps=10**9, logging_steps=10**9, deepspeed=None)
    base = Path(params["align"]["out"]) / "model"
    meta = Path(params["materialize"]["out"]) / "meta_file.json"
    processor = MedRegAProcessor.from_pretrained(base)
    processor.config.max_length = params["model"]["max_length"]
    out = Path("artifacts/benchmarks/throughput")
    ours_args = training_arguments(cfg, out / "ours", seed=0, deepspeed=None, report_to=[], run_name="ours")
    plain_args = TrainingArguments(output_dir=str(out / "plain"), max_steps=a.steps, per_device_train_batch_size=cfg["per_device_batch_size"],
                                   learning_rate=cfg["learning_rate"], save_strategy="no", report_to=[], use_cpu=True,
                                   remove_unused_columns=False, disable_tqdm=True, logging_steps=10**9)
    plain = run("plain HF Trainer (baseline)", PlainDataset(meta, processor), plain_args, base, params["tune"]["lora"],
                processor.tokenizer.pad_token_id)
    ours = run("our tune stage", InstructionDataset(meta, processor, ["r2t", "t2r"]), ours_args, base,
               params["tune"]["lora"], processor.tokenizer.pad_token_id)
    print(f"{a.steps} steps, batch {cfg['per_device_batch_size']}, one process, {torch.get_num_threads()} threads\n")
    print("| loop | samples/s | tokens/s | data wait share of step time | ratio (samples/s) |")
    print("|---|---|---|---|---|")
    for r in (plain, ours):
        print(f"| {r['name']} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['data_wait_share']:.1%} | "
              f"{r['samples_per_s'] / plain['samples_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
