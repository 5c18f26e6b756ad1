"""The typer application and what every command shares: options, config, exit codes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from medrega import config as config_mod
from medrega.config import Config
from medrega.errors import MedregaError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train, evaluate and ship region-aware bilingual medical MLLMs (MedRegA).")
console = Console(stderr=True, soft_wrap=True)  # never break a file name across lines

ConfigOpt = typer.Option(None, "--config", help="A resolved config (params.resolved.yaml); takes no --profile.")
ParamsOpt = typer.Option(config_mod.DEFAULT_PARAMS, "--params", help="Params file to resolve.")
ProfileOpt = typer.Option(None, "--profile", help="Profile (default: MEDREGA_PROFILE, else params.yaml's `profile:`).")


def load(config: Optional[Path], params: Path, profile: Optional[str]) -> Config:
    try:
        return config_mod.load(config, params, profile)
    except MedregaError as err:
        fail(err)


def fail(err: MedregaError, what: str | None = None) -> None:
    console.print(f"[bold red]{what + ' failed' if what else 'error'}:[/] {err}")
    raise typer.Exit(err.exit_code)


def echo_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _register_commands() -> None:
    # each module adds its commands to `app`; imported here so `cli.app` alone is complete
    from cli import checkpoints, config_cmd, evaluation, export, ops, registry, stages  # noqa: F401


_register_commands()
