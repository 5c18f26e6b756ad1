"""The six stages, one command each (what dvc.yaml runs), the raw-data generator and `pipeline`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer

from cli.app import ConfigOpt, ParamsOpt, ProfileOpt, app, echo_json, fail, load
from medrega import config as config_mod
from medrega import errors, stages
from medrega.config import Config
from medrega.errors import MedregaError


def run_stage(stage: str, cfg: Config, fn: Callable[..., dict], *args, out: Path, tracked: bool = False) -> dict:
    """Run a stage function; record its result, or its failure, as a file (medrega.stages)."""
    from medrega import tracking

    errors.clear_failure(stage)
    try:
        if tracked:  # stages that do not log to MLflow themselves: one run holding their summary
            with tracking.stage_run(stage, {stage: cfg.section(stage)}):
                result = fn(*args)
                tracking.log_json(result, f"{stage}_summary.json")
        else:
            result = fn(*args)
    except MedregaError as err:
        errors.record_failure(stage, err)
        fail(err, stage)
    stages.write_result(cfg, stage, result, out)
    echo_json(result)
    return result


@app.command()
def generate(config: Optional[Path] = ConfigOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
             out: Optional[Path] = typer.Option(None, help="Dataset root (default: data.root).")):
    """Write the embedded default raw data: synthetic scans in the SA-Med2D-20M layout, the real
    package scans (data.package_scans) and the bilingual reports file."""
    from medrega.sources.embedded import build_default

    cfg = load(config, params, profile)
    echo_json(build_default(out or cfg.data.root, cfg.data))


@app.command()
def validate(config: Optional[Path] = ConfigOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
             data: Optional[Path] = None, out: Optional[Path] = None):
    """Great Expectations suites over the raw data; fails naming each file and rule."""
    from tasks.validate import validate as run

    cfg = load(config, params, profile)
    out = out or cfg.validate_.out
    run_stage("validate", cfg, run, data or cfg.data.root, out, cfg.validate_, out=out, tracked=True)


@app.command()
def materialize(config: Optional[Path] = ConfigOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
                data: Optional[Path] = None, out: Optional[Path] = None):
    """Raw data -> MedRegInstruct JSONL and meta files (every task in materialize.tasks; en and zh)."""
    from tasks.materialize import materialize as run

    cfg = load(config, params, profile)
    out = out or cfg.materialize.out
    run_stage("materialize", cfg, run, data or cfg.data.root, out, cfg, out=out, tracked=True)


@app.command()
def align(config: Optional[Path] = ConfigOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
          instructions: Optional[Path] = None, out: Optional[Path] = None):
    """Stage 1: build the base model, then train the projector on captions (all else frozen)."""
    from tasks.align import align as run

    cfg = load(config, params, profile)
    out = out or cfg.align.out
    run_stage("align", cfg, run, instructions or cfg.materialize.out, out, cfg, out=out)


@app.command()
def tune(config: Optional[Path] = ConfigOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
         instructions: Optional[Path] = None, aligned: Optional[Path] = None, out: Optional[Path] = None):
    """Stage 2: LoRA (or full) tuning of the LLM under DeepSpeed ZeRO-3, via torchrun or Slurm."""
    from tasks.tune import tune as run

    cfg = load(config, params, profile)
    out = out or cfg.tune.out
    run_stage("tune", cfg, run, instructions or cfg.materialize.out, aligned or cfg.align.out, out, cfg, out=out)


def external_out(cfg: Config, model: str) -> Path:
    """Where an evaluation of a model other than the pipeline's goes by default: beside the
    pipeline's own (which DVC tracks and this must not overwrite), one folder per model."""
    import re

    slug = re.sub(r"[^A-Za-z0-9@._-]+", "_", model.removeprefix("models:/").removeprefix("runs:/")).strip("_.")
    return cfg.evaluate.out.with_name(cfg.evaluate.out.name + "-models") / (slug or "model")


@app.command()
def evaluate(config: Optional[Path] = ConfigOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
             instructions: Optional[Path] = None,
             model: Optional[str] = typer.Option(
                 None, help="Any model instead of the tuned one: a Hugging Face InternVL folder, an InternVL "
                            "remote-layout checkpoint (imported first), or a registered model (models:/NAME@ALIAS). "
                            "Its results go to <evaluate.out>-models/<model> unless --out is given."),
             out: Optional[Path] = None):
    """Generate answers on the held-out split and score them (region-aligned evaluation)."""
    from tasks.evaluate import evaluate as run
    from tasks.evaluate import model_folder

    cfg = load(config, params, profile)
    data = instructions or cfg.materialize.out
    if model is None:
        out = out or cfg.evaluate.out
        run_stage("evaluate", cfg, run, data, cfg.tune.out / "model", out, cfg, out=out)
        return
    out = out or external_out(cfg, model)
    run_stage("evaluate", cfg, lambda: run(data, model_folder(model, out / "weights", cfg.model.max_length), out, cfg,
                                           model_ref=model), out=out)


@app.command()
def register(config: Optional[Path] = ConfigOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
             model: Optional[Path] = None, evaluation: Optional[Path] = None, out: Optional[Path] = None):
    """Log the tuned model to MLflow and register a new version with alias `challenger`."""
    from tasks.register import register as run

    cfg = load(config, params, profile)
    out = out or cfg.register_.out
    example = next(iter(sorted((cfg.data.root / "images").glob("*.png"))), None)
    run_stage("register", cfg, lambda: run(model or cfg.tune.out / "model", evaluation or cfg.evaluate.out, out, cfg,
                                           example_image=example), out=out)


@app.command()
def pipeline(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
             push: bool = typer.Option(True, help="dvc push after a successful run.")):
    """Run every stage as one Prefect flow (stages DVC knows are up to date are skipped)."""
    from flows.pipeline import PipelineFailed, medrega_pipeline

    try:  # a bad params file or profile exits 3 here, before Prefect starts, as the flow reports it
        config_mod.resolve(params, profile)
    except MedregaError as err:
        fail(PipelineFailed("config", str(err), err.exit_code), "pipeline")
    try:
        medrega_pipeline(profile=profile, push=push, params_file=str(params))
    except PipelineFailed as err:
        fail(err, "pipeline")


@app.command()
def plan(config: Optional[Path] = ConfigOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
         gpu_memory_gib: Optional[float] = typer.Option(None, help="Memory of one GPU (default: "
                                                        "tune.launcher.gpu_memory_gib, else 80)."),
         tokens: Optional[int] = typer.Option(None, help="Tokens per sample (default: model.max_length, the worst case).")):
    """Per-GPU memory plan for align and tune: parameters, gradients, optimizer states, activations."""
    from model.plan import GIB, format_plan, plans_for_config

    cfg = load(config, params, profile)
    gib = gpu_memory_gib or cfg.tune.launcher.gpu_memory_gib or 80
    try:
        plans = plans_for_config(cfg, int(gib * GIB), tokens_per_sample=tokens)
    except MedregaError as err:
        fail(err, "plan")
    for stage, p in plans.items():
        typer.echo(f"== {stage}\n{format_plan(p)}\n")
    if not all(p.fits for p in plans.values()):
        raise typer.Exit(1)
