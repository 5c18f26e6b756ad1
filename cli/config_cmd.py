"""`medrega config resolve|show`: the one resolved config every process reads."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.app import ParamsOpt, ProfileOpt, app, load
from medrega import config as config_mod

config_app = typer.Typer(no_args_is_help=True, help="Resolve and show the active profile's configuration.")
app.add_typer(config_app, name="config")


@config_app.command("resolve")
def resolve(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
            out: Path = typer.Option(config_mod.RESOLVED, help="Where to write it."),
            env: bool = typer.Option(True, "--env/--no-env", help="Honour MEDREGA_PROFILE (--no-env: only "
                                     "params.yaml's `profile:`, so the result depends on the file alone; DVC's stage).")):
    """Validate params.yaml (every profile) and write the active profile, fully resolved."""
    import os

    if not env and profile is None:
        os.environ.pop(config_mod.PROFILE_ENV, None)
    cfg = load(None, params, profile)
    config_mod.write_resolved(cfg, out)
    typer.echo(f"{out}: profile {cfg.profile}")


@config_app.command("show")
def show(config: Optional[Path] = typer.Option(None, "--config"), params: Path = ParamsOpt,
         profile: Optional[str] = ProfileOpt):
    """Print the resolved configuration (YAML)."""
    import yaml

    typer.echo(yaml.safe_dump(load(config, params, profile).as_dict(), sort_keys=False, allow_unicode=True))
