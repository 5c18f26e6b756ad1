"""What every training recipe shares: loading, freezing, LoRA, DeepSpeed, resume, publishing.

The recipes (`model/recipes/`) read top to bottom and call these. A run's checkpoints live in
`out_dir/checkpoints`; a re-run with the same inputs (the fingerprint) resumes from the last one,
optimizer, scheduler and ZeRO-3 state included, under the same world size or another one
(model/resume.py); different inputs start clean. The result is written beside them under its
final name only once complete.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from transformers import InternVLForConditionalGeneration, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from medrega import io
from medrega.config import DeepSpeedConfig, LoraConfig, ModelConfig, TrainingConfig
from model import resume
from model.data import Collator, InstructionDataset
from model.processor import MedRegAProcessor

# LoRA only ever touches the language model: the vision tower has q/k/v projections too.
LLM_MODULE_PATTERN = r"(?:.*\.)?language_model\..*\.({names})"
WEIGHT_FILES = {"config.json", "generation_config.json", "adapter_config.json"}


def world() -> tuple[int, int]:
    """(rank, world size) of this process, from torchrun's environment."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend: str | None, timeout_s: int) -> None:
    """Join the process group now, with a bounded timeout: a peer that died or never came makes
    every collective fail after `timeout_s` instead of hanging. (The Trainer would join it later,
    with `ddp_timeout` on GPUs only; it and DeepSpeed reuse a group that exists.)"""
    if world()[1] <= 1 or in_process_group():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend or ("nccl" if cuda else "gloo"),
                                         timeout=timedelta(seconds=timeout_s))


def skip_deepspeed_shm_op() -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce
    (deepspeed_shm_comm) in every process it starts, which only its inference all-reduce uses;
    training reduces through gloo. The build folder is keyed by the op's name, not by the path of
    the sources, so two installs (or a venv reached through a symlink) rebuild it in turn, about
    35 s of both cores each time. Marked incompatible, it is never built: DeepSpeed's ops module
    keeps one `__compatible_ops__` dict per process for such edits."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def leave_distributed() -> None:
    """Leave the process group before the interpreter exits. Left to the interpreter's teardown,
    gloo's threads can be destroyed while still joinable, and a rank that finished its work dies of
    SIGABRT ("terminate called without an active exception"), failing the whole launch. Called on
    success only: after an error the rank exits without waiting on its peers."""
    if in_process_group():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def in_process_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if in_process_group():
        torch.distributed.barrier()


def load_model(model_dir: Path, cfg: ModelConfig) -> InternVLForConditionalGeneration:
    """A checkpoint in the dtype and attention implementation of the profile (float32 on CPU:
    bf16 there is slow and some kernels lack it)."""
    dtype = getattr(torch, cfg.dtype) if torch.cuda.is_available() else torch.float32
    return InternVLForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype,
                                                            attn_implementation=cfg.attn_implementation)


def train_only(model: torch.nn.Module, modules: Iterable[torch.nn.Module]) -> None:
    """Freeze everything, then make `modules` trainable."""
    for p in model.parameters():
        p.requires_grad = False
    for module in modules:
        for p in module.parameters():
            p.requires_grad = True


def apply_lora(model: InternVLForConditionalGeneration, lora: LoraConfig):
    """LoRA adapters on the language model's projections; everything else frozen."""
    from peft import LoraConfig as PeftLora, get_peft_model

    train_only(model, [])
    config = PeftLora(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=LLM_MODULE_PATTERN.format(names="|".join(lora.target_modules)))
    return get_peft_model(model, config)


def deepspeed_config(ds: DeepSpeedConfig) -> dict[str, Any]:
    """ZeRO config; "auto" lets the Trainer fill batch sizes, clipping and bf16 from its args."""
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if ds.zero_stage == 3:  # the Trainer fills these "auto"s for ZeRO-3 only; left "auto" they fail
        zero.update({
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # One consolidated 16-bit state dict on save, so the output loads without DeepSpeed.
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params and ds.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "zero_optimization": zero}


def fingerprint(*parts: Any) -> str:
    """Identity of a run's inputs: file contents (by path) and JSON-able values. A killed run
    resumes only into a run with the same fingerprint."""
    return io.content_hash(*parts)[:16]


def prepare_checkpoint_dir(ckpt_dir: Path, run_parts: tuple, is_main: bool) -> str | None:
    """The last checkpoint to resume from, or None; wipes checkpoints of a different run.
    `run_parts` identify the run (config sections, input files): fingerprinted on rank 0 only."""
    marker = ckpt_dir / "fingerprint.txt"
    if is_main:
        run_id = fingerprint(*run_parts)
        if ckpt_dir.exists() and (not marker.exists() or marker.read_text().strip() != run_id):
            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(run_id)
        # A kill during a save leaves a checkpoint without its layout (written after the
        # Trainer's files): resuming from it would crash, so it goes and the one before is used.
        for partial in ckpt_dir.glob("checkpoint-*"):
            if not (partial / resume.LAYOUT_FILE).exists():
                shutil.rmtree(partial)
    barrier()
    return get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.exists() else None


def training_arguments(cfg: TrainingConfig, ckpt_dir: Path, *, seed: int, run_name: str,
                       deepspeed: dict | None = None, ddp_backend: str | None = None,
                       report_to: list[str] | None = None, comm_timeout_s: int = 1800) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio in transformers 5
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_strategy="steps",
        save_total_limit=2,
        bf16=cfg.bf16 and cuda,
        gradient_checkpointing=cfg.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        use_cpu=not cuda,
        ddp_backend=ddp_backend if world()[1] > 1 else None,
        ddp_timeout=comm_timeout_s,
        deepspeed=deepspeed,
        remove_unused_columns=False,
        dataloader_num_workers=cfg.dataloader_num_workers,
        report_to=report_to or [],
        run_name=run_name,
        seed=seed,
        disable_tqdm=True,
        logging_first_step=True,
    )


def finished_state(last: str | None, max_steps: int) -> dict | None:
    """The trainer state of a checkpoint that already reached max_steps, else None."""
    if not last or max_steps <= 0:
        return None
    state = json.loads((Path(last) / "trainer_state.json").read_text())
    return state if state["global_step"] >= max_steps else None


def train(model, dataset: InstructionDataset, processor: MedRegAProcessor, cfg: TrainingConfig, *,
          stage: str, mode: str, run_id: tuple, out_dir: Path, result: str, seed: int,
          deepspeed: dict | None = None, ddp_backend: str | None = None, comm_timeout_s: int = 1800,
          allow_inexact_resume: bool = False, callbacks: list | None = None) -> dict:
    """Train (resuming when a checkpoint of the same run exists, under this world size or
    another) and publish the weights as `out_dir/<result>` with the processor; returns the
    summary written to train_summary.json."""
    rank, world_size = world()
    init_distributed(ddp_backend, comm_timeout_s)
    last = prepare_checkpoint_dir(out_dir / "checkpoints", run_id, rank == 0)
    final = out_dir / result
    partial = final.with_name(final.name + ".partial")
    if rank == 0 and partial.exists():
        shutil.rmtree(partial)
    base = {"stage": stage, "mode": mode, "resumed_from": Path(last).name if last else None,
            "train_samples": len(dataset), "too_long": len(dataset.too_long), "world_size": world_size}
    done = finished_state(last, cfg.max_steps)
    if done is not None:
        # Killed after its last save: the result is in that checkpoint. (Resuming the Trainer
        # from its final checkpoint would take one step past max_steps.)
        summary = {**base, "zero_stage": None, "global_step": done["global_step"], "log_history": done["log_history"]}
        if rank == 0:
            publish_checkpoint(Path(last), processor, partial, final, out_dir, summary)
        return summary

    # every rank plans from the same files, so a refusal stops all of them alike
    zero_stage = deepspeed["zero_optimization"]["stage"] if deepspeed else None
    run_plan = resume.plan(last, cfg, world_size, zero_stage, allow_inexact_resume)
    if run_plan.convert:
        if rank == 0:
            resume.to_universal(Path(last), run_plan.saved, world_size)
        barrier()
        deepspeed = {**deepspeed, "checkpoint": {"load_universal": True}}
    if deepspeed and not torch.cuda.is_available():
        skip_deepspeed_shm_op()
    cfg = cfg.model_copy(update={"per_device_batch_size": run_plan.layout.per_device_batch_size,
                                 "gradient_accumulation_steps": run_plan.layout.gradient_accumulation_steps})
    args = training_arguments(cfg, out_dir / "checkpoints", seed=seed, run_name=stage, deepspeed=deepspeed,
                              ddp_backend=ddp_backend, comm_timeout_s=comm_timeout_s)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=Collator(processor.tokenizer.pad_token_id),
                      callbacks=[*(callbacks or []), resume.RecordLayout(run_plan.layout)])
    outcome = trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(partial))  # gathers ZeRO-3 shards; rank 0 writes
    summary = {
        **base,
        "world_size": args.world_size,
        # what actually ran, read back from the engine rather than from params
        "zero_stage": trainer.deepspeed.zero_optimization_stage() if trainer.deepspeed is not None else None,
        "global_step": outcome.global_step,
        "train_loss": outcome.training_loss,
        **{k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float))},
        **run_plan.summary(),
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        publish(processor, partial, final, out_dir, summary)
    return summary


def publish_checkpoint(checkpoint: Path, processor: MedRegAProcessor, partial: Path, final: Path, out_dir: Path,
                       summary: dict) -> None:
    """Publish the weights a finished checkpoint holds."""
    partial.mkdir(parents=True)
    for f in checkpoint.iterdir():
        if f.suffix == ".safetensors" or f.name in WEIGHT_FILES:
            shutil.copy2(f, partial / f.name)
    publish(processor, partial, final, out_dir, summary)


def publish(processor: MedRegAProcessor, partial: Path, final: Path, out_dir: Path, summary: dict) -> None:
    processor.save_pretrained(partial)
    io.replace_dir(partial, final)  # the result appears whole or not at all
    io.write_json(out_dir / "train_summary.json", summary)
