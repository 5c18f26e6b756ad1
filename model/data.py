"""Training data: MedRegInstruct records (via meta_file.json) -> tensors for the Trainer.

Records are tokenised once up front (cheap for text) and images are decoded lazily per item,
so memory holds token ids, never pixels. A record that does not fit `max_length` is counted
and reported, never silently truncated; above `max_too_long_share` the run fails.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from medrega import metafile
from medrega.errors import BadInput
from model.processor import IGNORE_INDEX, MedRegAProcessor, TooLong


class DataError(BadInput):
    """A meta file or annotation file cannot be used for training."""


@dataclass(frozen=True)
class Item:
    image: Path
    input_ids: list[int]
    labels: list[int]


def read_meta(meta_file: Path, tasks: list[str] | None = None) -> list[tuple[str, dict]]:
    """The meta file's entries for `tasks` (paths resolved against its folder); none is an error."""
    entries = metafile.read(meta_file, tasks)
    if not entries:
        raise DataError(f"{meta_file}: no datasets for tasks {tasks}")
    return entries


def annotation_files(meta_file: Path) -> list[Path]:
    """Every annotation file a meta file registers (what a training run reads besides images)."""
    return [Path(entry["annotation"]) for _, entry in read_meta(meta_file)]


def iter_records(meta_file: Path, tasks: list[str] | None = None, seed: int = 0):
    """(record, meta entry) pairs, with each dataset's repeat_time applied (SPEC §1)."""
    rng = random.Random(seed)
    for name, entry in read_meta(meta_file, tasks):
        path = Path(entry["annotation"])
        with path.open(encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        repeat = float(entry.get("repeat_time", 1))
        whole, frac = int(repeat), repeat - int(repeat)
        chosen = records * whole + (rng.sample(records, round(len(records) * frac)) if frac else [])
        for record in chosen:
            yield record, entry


class InstructionDataset(Dataset):
    def __init__(self, meta_file: Path, processor: MedRegAProcessor, tasks: list[str] | None = None,
                 max_too_long_share: float = 0.0, seed: int = 0, base_prompt_share: float = 1.0):
        self.processor = processor
        # Share of records that get their dataset's base prompt (SPEC §1 says all of them; the
        # tiny preset's stand-in pretraining uses fewer). Drawn per record with a seeded RNG.
        keep_prompt = random.Random(seed + 1)
        self.items: list[Item] = []
        self.too_long: list[str] = []
        for record, entry in iter_records(meta_file, tasks, seed):
            human, gpt = record["conversations"][0]["value"], record["conversations"][1]["value"]
            with_prompt = base_prompt_share >= 1 or keep_prompt.random() < base_prompt_share
            try:
                encoded = processor.encode_example(human, gpt, entry.get("base_prompt") if with_prompt else None)
            except TooLong:
                self.too_long.append(str(record["id"]))
                continue
            self.items.append(Item(Path(entry["root"]) / record["image"], encoded["input_ids"], encoded["labels"]))
        total = len(self.items) + len(self.too_long)
        if total == 0:
            raise DataError(f"{meta_file}: no records for tasks {tasks}")
        share = len(self.too_long) / total
        if share > max_too_long_share:
            raise DataError(
                f"{meta_file}: {len(self.too_long)} of {total} records exceed max_length "
                f"{processor.config.max_length} (allowed share {max_too_long_share}); first ids: {self.too_long[:5]}"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        return {
            "input_ids": item.input_ids,
            "labels": item.labels,
            "pixel_values": self.processor.load_image(item.image),
        }

    def lengths(self) -> list[int]:
        return [len(item.input_ids) for item in self.items]


@dataclass
class Collator:
    """Right-pads ids and labels for training (left padding is only for generation)."""

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        }
