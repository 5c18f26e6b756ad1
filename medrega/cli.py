"""`medrega`: every stage on its own, and the whole pipeline.

Each command reads `params.yaml` (or --params) with the active profile, and takes its input
and output paths from there unless given. `dvc.yaml` calls exactly these commands.
Exit codes: 0 ok, 3 bad input or configuration (deterministic: retrying will not help),
anything else an unexpected failure.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from medrega.config import ConfigError, load_params

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
console = Console(stderr=True, soft_wrap=True)  # never break a file name across lines
BAD_INPUT = 3

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="Params file.")
ProfileOpt = typer.Option(None, "--profile", help="Profile to apply (default: MEDREGA_PROFILE or params.yaml).")


def _params(params: Path, profile: Optional[str]) -> dict:
    return load_params(params, profile)


def _tracked(stage: str, fn, *args, **kwargs):
    """For stages that do not log to MLflow themselves: one nested run holding their summary."""
    from medrega import tracking

    p = args[-1]
    with tracking.stage_run(stage, {stage: p.get(stage, {})}):
        result = fn(*args, **kwargs)
        tracking.log_json(result, f"{stage}_summary.json")
    return result


def _run(fn, *args, **kwargs):
    """Run a stage; bad input ends with a clear message and exit code 3, not a traceback."""
    from model.data import DataError
    from tasks.validate import ValidationFailed

    try:
        result = fn(*args, **kwargs)
    except (ValidationFailed, DataError, ConfigError, ValueError, FileNotFoundError) as err:
        name = args[0] if fn is _tracked else f"{fn.__module__}.{fn.__name__}"
        console.print(f"[bold red]{name} failed:[/] {err}")
        raise typer.Exit(BAD_INPUT) from err
    typer.echo(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    return result


@app.command()
def generate(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
             out: Optional[Path] = typer.Option(None, help="Dataset root (default: data.root).")):
    """Write the embedded default raw data: synthetic scans in the SA-Med2D-20M layout, the real
    package scans (data.package_scans) and the bilingual reports file."""
    from medrega.sources.embedded import build_default

    p = _params(params, profile)["data"]
    _run(build_default, out or Path(p["root"]), p)


@app.command()
def validate(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
             data: Optional[Path] = None, out: Optional[Path] = None):
    """Great Expectations suites over the raw data; fails naming each file and rule."""
    from tasks.validate import validate as run

    p = _params(params, profile)
    _run(_tracked, "validate", run, data or Path(p["data"]["root"]), out or Path(p["validate"]["out"]), p)


@app.command()
def materialize(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
                data: Optional[Path] = None, out: Optional[Path] = None):
    """Raw data -> MedRegInstruct JSONL and meta_file.json (R2T, T2R, captions; en and zh)."""
    from tasks.materialize import materialize as run

    p = _params(params, profile)
    _run(_tracked, "materialize", run, data or Path(p["data"]["root"]), out or Path(p["materialize"]["out"]), p)


@app.command()
def align(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
          instructions: Optional[Path] = None, out: Optional[Path] = None):
    """Stage 1: train the projector on captions (vision encoder and LLM frozen)."""
    from tasks.align import align as run

    p = _params(params, profile)
    _run(run, instructions or Path(p["materialize"]["out"]), out or Path(p["align"]["out"]), p)


@app.command()
def tune(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
         instructions: Optional[Path] = None, aligned: Optional[Path] = None, out: Optional[Path] = None):
    """Stage 2: LoRA (or full) tuning of the LLM under DeepSpeed ZeRO-3, via torchrun or Slurm."""
    from tasks.tune import tune as run

    p = _params(params, profile)
    _run(run, instructions or Path(p["materialize"]["out"]), aligned or Path(p["align"]["out"]),
         out or Path(p["tune"]["out"]), p, params_file=params)


@app.command()
def evaluate(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
             instructions: Optional[Path] = None, model: Optional[Path] = None, out: Optional[Path] = None):
    """Generate answers on the held-out split and score them (region-aligned evaluation)."""
    from tasks.evaluate import evaluate as run

    p = _params(params, profile)
    _run(run, instructions or Path(p["materialize"]["out"]), model or Path(p["tune"]["out"]) / "model",
         out or Path(p["evaluate"]["out"]), p)


@app.command()
def register(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
             model: Optional[Path] = None, evaluation: Optional[Path] = None, out: Optional[Path] = None):
    """Log the tuned model to MLflow and register a new version with alias `challenger`."""
    from tasks.register import register as run

    p = _params(params, profile)
    example = next(iter(sorted((Path(p["data"]["root"]) / "images").glob("*.png"))), None)
    _run(run, model or Path(p["tune"]["out"]) / "model", evaluation or Path(p["evaluate"]["out"]),
         out or Path(p["register"]["out"]), p, example_image=example)


@app.command()
def pipeline(profile: Optional[str] = ProfileOpt,
             push: bool = typer.Option(True, help="dvc push after a successful run.")):
    """Run every stage as one Prefect flow (stages DVC knows are up to date are skipped)."""
    from flows.pipeline import PipelineFailed, medrega_pipeline

    try:
        medrega_pipeline(profile=profile, push=push)
    except PipelineFailed as err:
        console.print(f"[bold red]pipeline failed:[/] {err}")
        raise typer.Exit(err.exit_code) from err


import medrega.commands.registry  # noqa: E402,F401  (promote, rollback, serve, predict)

import medrega.commands.evaluation  # noqa: E402,F401  (score)

import medrega.commands.ops  # noqa: E402,F401  (status, remote s3)


if __name__ == "__main__":
    sys.exit(app())
