"""Training for both stages with the HF Trainer.

- align (stage 1): vision encoder and LLM frozen, the MLP projector trains on captions.
- tune (stage 2): vision encoder and projector frozen; LoRA on the LLM (paper) or the full LLM
  (the authors' released script), under DeepSpeed ZeRO-3 when a config is given.

The same function runs in one process or as every rank under torchrun. Checkpoints are saved
every `save_steps`; a re-run with the same inputs resumes from the last one (optimizer and
ZeRO-3 state included), a re-run with different inputs starts clean.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import InternVLForConditionalGeneration, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from model.data import Collator, InstructionDataset
from model.processor import MedRegAProcessor

# LoRA only ever touches the language model: the vision tower has q/k/v projections too.
LLM_MODULE_PATTERN = r"(?:.*\.)?language_model\..*\.({names})"


def freeze_for_stage(model: InternVLForConditionalGeneration, stage: str, mode: str = "lora") -> None:
    for p in model.parameters():
        p.requires_grad = False
    if stage == "base":
        trainable = [model]  # tiny preset only: stands in for a pretrained checkpoint
    elif stage == "align":
        trainable = [model.model.multi_modal_projector]
    elif stage == "tune" and mode == "full":
        trainable = [model.model.language_model, model.lm_head]
    elif stage == "tune" and mode == "lora":
        trainable = []  # PEFT marks the adapters trainable
    else:
        raise ValueError(f"unknown stage/mode {stage}/{mode}")
    for module in trainable:
        for p in module.parameters():
            p.requires_grad = True


def apply_lora(model: InternVLForConditionalGeneration, lora: dict[str, Any]):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=LLM_MODULE_PATTERN.format(names="|".join(lora["target_modules"])),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def deepspeed_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """ZeRO config from params; "auto" lets the Trainer fill batch sizes and lr from its args."""
    ds = cfg.get("deepspeed") or {}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": ds.get("zero_stage", 3),
            "overlap_comm": False,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # One consolidated 16-bit state dict on save, so the output loads without DeepSpeed.
            "stage3_gather_16bit_weights_on_model_save": True,
        },
    }


def fingerprint(*parts: Any) -> str:
    """Identity of a training run's inputs: resume only into a run with the same one."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path) and part.is_file():
            digest.update(part.read_bytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def prepare_checkpoint_dir(ckpt_dir: Path, print_id: str, is_main: bool) -> str | None:
    """Last checkpoint to resume from, or None; wipes checkpoints of a different run."""
    marker = ckpt_dir / "fingerprint.txt"
    if is_main:
        if ckpt_dir.exists() and (not marker.exists() or marker.read_text().strip() != print_id):
            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(print_id)
        # A kill during a save leaves a checkpoint without its trainer state (written last):
        # resuming from it would crash, so it goes and the one before it is used.
        for partial in ckpt_dir.glob("checkpoint-*"):
            if not (partial / "trainer_state.json").exists():
                shutil.rmtree(partial)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.exists() else None


def training_arguments(cfg: dict[str, Any], ckpt_dir: Path, *, seed: int, deepspeed: dict | None,
                       report_to: list[str], run_name: str) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        max_steps=cfg.get("max_steps", -1),
        num_train_epochs=cfg.get("num_train_epochs", 1),
        per_device_train_batch_size=cfg.get("per_device_batch_size", cfg.get("batch_size", 8)),
        gradient_accumulation_steps=cfg.get("gradient_accumulation_steps", 1),
        learning_rate=cfg["learning_rate"],
        warmup_steps=cfg.get("warmup_ratio", 0.0),  # a float < 1 is a ratio in transformers 5
        weight_decay=cfg.get("weight_decay", 0.0),
        lr_scheduler_type=cfg.get("lr_scheduler", "cosine"),
        logging_steps=cfg.get("logging_steps", 10),
        save_steps=cfg.get("save_steps", 100),
        save_strategy="steps",
        save_total_limit=2,
        bf16=bool(cfg.get("bf16", False)) and cuda,
        gradient_checkpointing=bool(cfg.get("gradient_checkpointing", False)),
        train_sampling_strategy="group_by_length" if cfg.get("group_by_length") else "random",
        use_cpu=not cuda,
        ddp_backend=(cfg.get("launcher") or {}).get("backend") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        deepspeed=deepspeed,
        remove_unused_columns=False,
        dataloader_num_workers=cfg.get("dataloader_num_workers", 0),
        report_to=report_to,
        run_name=run_name,
        seed=seed,
        disable_tqdm=True,
        logging_first_step=True,
    )


def train_stage(stage: str, params: dict[str, Any], meta_file: Path, base_dir: Path, out_dir: Path,
                report_to: list[str] | None = None, callbacks: list | None = None,
                cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one stage from the model in `base_dir`; the result is written to `out_dir/model`.

    For LoRA, `out_dir/adapter` holds the adapter alone; the merged model is made by the caller
    (a single process) once all ranks are done.
    """
    # `cfg` is given for the tiny preset's base pretraining, one phase at a time (tasks/align.py)
    if cfg is None and stage == "base":
        raise ValueError("train_stage('base') needs the phase's cfg (tasks.align.pretrain builds it)")
    cfg = cfg if cfg is not None else params[stage]
    processor = MedRegAProcessor.from_pretrained(base_dir)
    processor.config.max_length = params["model"]["max_length"]  # params win over the saved value
    if stage == "base":
        tasks = cfg["tasks"]
    elif stage == "align":
        tasks = ["caption"]
    else:  # the instruction mix: tune.tasks, or every task built but the stage-1 captions
        tasks = cfg.get("tasks") or [t for t in params["materialize"]["tasks"] if t != "caption"]
    dataset = InstructionDataset(meta_file, processor, tasks=tasks, seed=params["seed"],
                                 max_too_long_share=cfg.get("max_too_long_share", 0.0),
                                 base_prompt_share=cfg.get("base_prompt_share", 1.0))

    dtype = getattr(torch, params["model"].get("dtype", "float32"))
    if not torch.cuda.is_available():
        dtype = torch.float32  # bf16 on CPU is slow and unsupported by some kernels
    model = InternVLForConditionalGeneration.from_pretrained(
        str(base_dir), dtype=dtype, attn_implementation=params["model"].get("attn_implementation", "sdpa")
    )
    mode = {"base": "full", "align": "projector"}.get(stage) or cfg.get("mode", "lora")
    freeze_for_stage(model, stage, mode)
    if stage == "tune" and mode == "lora":
        # LoRA's A matrices are drawn at random here, before the Trainer seeds anything: without
        # this, two runs with the same inputs (or a killed run and the reference it resumes
        # towards) start from different adapters and drift apart once B leaves zero.
        set_seed(params["seed"])
        model = apply_lora(model, cfg["lora"])
    if cfg.get("gradient_checkpointing"):
        model.enable_input_require_grads()

    ckpt_dir = out_dir / "checkpoints"
    run_id = fingerprint(stage, cfg, params["model"], params["seed"], meta_file, base_dir / "model.safetensors")
    is_main = int(os.environ.get("RANK", "0")) == 0
    last = prepare_checkpoint_dir(ckpt_dir, run_id, is_main)
    ds_config = deepspeed_config(cfg) if stage == "tune" and cfg.get("deepspeed") else None
    args = training_arguments(cfg, ckpt_dir, seed=params["seed"], deepspeed=ds_config,
                              report_to=report_to or [], run_name=stage)
    final = out_dir / ("adapter" if stage == "tune" and mode == "lora" else "model")
    partial = final.with_name(final.name + ".partial")
    if is_main and partial.exists():
        shutil.rmtree(partial)
    done = finished_state(last, cfg.get("max_steps", -1))
    if done is not None:
        # Killed after its last save: the result is in that checkpoint. (Resuming the Trainer
        # from its final checkpoint would take one step past max_steps.)
        summary = {"stage": stage, "mode": mode, "resumed_from": Path(last).name, "train_samples": len(dataset),
                   "too_long": len(dataset.too_long), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                   "zero_stage": None, "global_step": done["global_step"], "log_history": done["log_history"]}
        if is_main:
            partial.mkdir(parents=True)
            for f in Path(last).iterdir():
                if f.suffix == ".safetensors" or f.name in WEIGHT_FILES:
                    shutil.copy2(f, partial / f.name)
            _publish(processor, partial, final, out_dir, summary)
        return summary

    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=Collator(processor.tokenizer.pad_token_id), callbacks=callbacks)
    result = trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(partial))  # gathers ZeRO-3 shards; rank 0 writes
    summary = {
        "stage": stage,
        "mode": mode,
        "resumed_from": Path(last).name if last else None,
        "train_samples": len(dataset),
        "too_long": len(dataset.too_long),
        "world_size": args.world_size,
        # what actually ran, read back from the engine rather than from params
        "zero_stage": trainer.deepspeed.zero_optimization_stage() if trainer.deepspeed is not None else None,
        "global_step": result.global_step,
        "train_loss": result.training_loss,
        **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        _publish(processor, partial, final, out_dir, summary)
    return summary


WEIGHT_FILES = {"config.json", "generation_config.json", "adapter_config.json"}


def finished_state(last: str | None, max_steps: int) -> dict | None:
    """The trainer state of a checkpoint that already reached max_steps, else None."""
    if not last or max_steps <= 0:
        return None
    state = json.loads((Path(last) / "trainer_state.json").read_text())
    return state if state["global_step"] >= max_steps else None


def _publish(processor: MedRegAProcessor, partial: Path, final: Path, out_dir: Path, summary: dict) -> None:
    processor.save_pretrained(partial)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)  # the final model appears whole or not at all
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> None:
    """Entry point for `torchrun -m model.train STAGE PARAMS META BASE OUT`."""
    import argparse

    from medrega.config import load_params

    parser = argparse.ArgumentParser()
    # base pretraining runs in one process, phase by phase, from tasks/align.py
    parser.add_argument("stage", choices=["align", "tune"])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--meta", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report-to", default="")
    a = parser.parse_args(argv)
    params = load_params(a.params)
    train_stage(a.stage, params, a.meta, a.base, a.out, report_to=[r for r in a.report_to.split(",") if r])


if __name__ == "__main__":
    main()
