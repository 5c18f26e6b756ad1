"""Resuming a training run under another world size (README, "Running on a cluster").

Every checkpoint records the layout it was saved under (`layout.json`, written after the
Trainer's own files: world size, per-device batch, gradient accumulation, ZeRO stage). A run that
resumes it under another world size:

- keeps the global batch (per-device batch x accumulation x ranks). Step k then consumes the
  same samples, [k*G, (k+1)*G) of the seeded permutation, however they are split across ranks,
  and the learning-rate schedule and the meaning of a step stay as they were. The per-device
  batch stays and the accumulation absorbs the change (2 ranks x 1 -> 1 rank x 2); where it
  cannot (more ranks than accumulation steps), the per-device batch shrinks to the largest size
  that divides the share of one rank. A world size that does not divide the global batch is
  refused (`ResumeRefused`), naming the sizes that would work;
- converts a ZeRO checkpoint, whose optimizer state is partitioned per rank, once to DeepSpeed's
  universal form (`deepspeed.checkpoint.ds_to_universal`) beside the original, and loads that
  (`checkpoint.load_universal`): fp32 weights, Adam moments and step are re-partitioned for the
  new world size; the scheduler state comes from the checkpoint as before;
- refuses (unless `tune.launcher.allow_inexact_resume`) where the rest of the epoch could not be
  drawn in the same order: with group_by_length the Trainer groups lengths per (per-device batch
  x accumulation), which the change alters.
What stays different: dropout masks come from each rank's random stream, which cannot be split
or merged across ranks, so a run with dropout follows another (equally valid) random path after
the resume; without dropout it ends where the uninterrupted run ends, to float rounding.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import TrainerCallback

from medrega import io
from medrega.config import TrainingConfig
from medrega.errors import BadInput

LAYOUT_FILE = "layout.json"
UNIVERSAL_MARKER = "latest_universal"  # DeepSpeed's name: load_checkpoint reads the tag from it


class ResumeRefused(BadInput):
    """A checkpoint cannot be resumed exactly under this world size; the message says what would."""


@dataclass(frozen=True)
class Layout:
    world_size: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    zero_stage: int | None  # None: no DeepSpeed (the optimizer state is whole in every checkpoint)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.per_device_batch_size * self.gradient_accumulation_steps

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.per_device_batch_size} per device x "
                f"{self.gradient_accumulation_steps} accumulation x {self.world_size} rank(s)")


@dataclass(frozen=True)
class Plan:
    layout: Layout              # what this run trains with
    saved: Layout | None        # what the checkpoint was saved under (None: a fresh start)
    convert: bool               # the ZeRO state must go through the universal form first

    def summary(self) -> dict:
        return {"layout": asdict(self.layout), "resumed_layout": asdict(self.saved) if self.saved else None,
                "universal_checkpoint": self.convert}


def read_layout(checkpoint: str | Path | None) -> Layout | None:
    if checkpoint is None:
        return None
    path = Path(checkpoint) / LAYOUT_FILE
    try:
        return Layout(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise ResumeRefused(f"{path}: unreadable checkpoint layout ({err}); delete {Path(checkpoint)} "
                            "to resume from the checkpoint before it") from err


def plan(checkpoint: str | Path | None, cfg: TrainingConfig, world_size: int, zero_stage: int | None,
         allow_inexact: bool = False) -> Plan:
    """How this run trains: as configured on a fresh start, else so that it continues the
    checkpoint's run exactly (module docstring), or ResumeRefused."""
    saved = read_layout(checkpoint)
    if saved is None:
        return Plan(Layout(world_size, cfg.per_device_batch_size, cfg.gradient_accumulation_steps, zero_stage),
                    None, False)
    if saved.world_size == world_size:
        return Plan(Layout(world_size, saved.per_device_batch_size, saved.gradient_accumulation_steps, zero_stage),
                    saved, False)
    where = f"{checkpoint} was saved with {saved.describe()}"
    total = saved.global_batch
    if total % world_size:
        fits = [n for n in range(1, total + 1) if total % n == 0]
        raise ResumeRefused(
            f"{where}; {world_size} ranks cannot keep that global batch, so the run cannot resume exactly. "
            f"Resume it on a world size that divides {total} (nodes x processes per node in "
            f"tune.launcher: one of {fits}), or start the run over by deleting {Path(checkpoint).parent}.")
    share = total // world_size
    per_device = max(d for d in range(1, min(cfg.per_device_batch_size, share) + 1) if share % d == 0)
    layout = Layout(world_size, per_device, share // per_device, zero_stage)
    if cfg.group_by_length and not allow_inexact and \
            layout.per_device_batch_size * layout.gradient_accumulation_steps != \
            saved.per_device_batch_size * saved.gradient_accumulation_steps:
        raise ResumeRefused(
            f"{where}; under {world_size} ranks ({layout.describe()}) group_by_length would group the rest "
            f"of the epoch differently (the Trainer groups lengths per per-device batch x accumulation), so some "
            f"samples would be seen twice and others not at all. Resume it under {saved.world_size} ranks, or set "
            f"tune.launcher.allow_inexact_resume: true to accept that.")
    return Plan(layout, saved, bool(saved.zero_stage))


def to_universal(checkpoint: Path, saved: Layout, world_size: int) -> None:
    """DeepSpeed's universal form of the checkpoint's ZeRO state, written beside it once: the
    marker file DeepSpeed loads from (`latest_universal`) appears only when it is whole, and a
    conversion killed half-way is redone. Rank 0 only; the other ranks wait."""
    checkpoint = Path(checkpoint)
    if (checkpoint / UNIVERSAL_MARKER).exists():
        return
    tag = (checkpoint / "latest").read_text().strip()
    target = checkpoint / f"{tag}_universal"
    work = checkpoint / ".universal.partial"
    for stale in (work, target):
        shutil.rmtree(stale, ignore_errors=True)
    from deepspeed.checkpoint import ds_to_universal

    # One worker: the converter's process pool would fork this process, which holds the process
    # group's threads. inject_missing_state: ZeRO-1/2 conversion wants the model-parallel layout
    # Megatron-DeepSpeed records; a model without tensor or pipeline parallelism has none to record.
    args = argparse.Namespace(input_folder=str(checkpoint / tag), output_folder=str(work / target.name),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    try:
        ds_to_universal.main(args)
    except Exception as err:  # any failure of the converter means: cannot resume here
        shutil.rmtree(work, ignore_errors=True)
        raise ResumeRefused(
            f"{checkpoint} ({saved.describe()}) could not be converted to DeepSpeed's universal form to resume "
            f"under {world_size} ranks: {type(err).__name__}: {err}. Resume it under {saved.world_size} ranks, or "
            f"start the run over by deleting {checkpoint.parent}.") from err
    os.replace(work / target.name, target)
    shutil.rmtree(work, ignore_errors=True)
    io.write_text(checkpoint / UNIVERSAL_MARKER, target.name)  # last: its presence means whole


class RecordLayout(TrainerCallback):
    """Writes the layout into each checkpoint after the Trainer saved it (rank 0)."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            io.write_json(Path(args.output_dir) / f"checkpoint-{state.global_step}" / LAYOUT_FILE,
                          asdict(self.layout))
