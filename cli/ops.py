"""Day-2 commands: `medrega status` and `medrega remote s3`.

Exit codes follow the CLI's convention: 3 for a bad request (deterministic), 1 otherwise.
`status --check` exits 1 when the DVC remote is not in sync, so cron/CI can alert on it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cli.app import ConfigOpt, ParamsOpt, ProfileOpt, app, console, load
from medrega.errors import BadInput

remote_app = typer.Typer(no_args_is_help=True, help="Configure the DVC remote (S3: AWS, MinIO, Ceph).")
app.add_typer(remote_app, name="remote")


@remote_app.command("s3")
def remote_s3(bucket: str = typer.Option(..., help="Bucket name (no s3:// and no path)."),
              prefix: str = typer.Option("medrega", help="Key prefix inside the bucket."),
              endpoint: Optional[str] = typer.Option(None, help="S3 endpoint URL for MinIO/Ceph (none: AWS)."),
              region: Optional[str] = typer.Option(None, help="Bucket region."),
              aws_profile: Optional[str] = typer.Option(None, "--aws-profile", help="Profile in ~/.aws to take credentials from."),
              credentialpath: Optional[str] = typer.Option(
                  None, help="This machine's AWS credentials file; written only to the git-ignored .dvc/config.local."),
              name: str = typer.Option("s3", help="DVC remote name."),
              default: bool = typer.Option(True, help="Make it the default remote (what `dvc push` and the pipeline use).")):
    """Point DVC at an S3 bucket. Credentials come from the environment or AWS config, never from here."""
    from medrega.storage import S3Remote, StorageError, configure_s3

    remote = S3Remote(bucket=bucket, prefix=prefix, name=name, endpoint=endpoint, region=region,
                      profile=aws_profile, credentialpath=credentialpath, default=default)
    try:
        cmds = configure_s3(remote)
    except StorageError as err:
        console.print(f"[bold red]remote s3 failed:[/] {err}")
        raise typer.Exit(BadInput.exit_code) from err
    for cmd in cmds:
        typer.echo("dvc " + " ".join(cmd))
    typer.echo(f"DVC remote {name!r} -> {remote.url}{' (default)' if default else ''}; "
               "credentials: AWS_* environment variables or ~/.aws (not stored by medrega)")


@app.command()
def status(config: Optional[Path] = ConfigOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
           remote: bool = typer.Option(True, help="Compare the local cache with the DVC remote (dvc status -c)."),
           check: bool = typer.Option(False, help="Exit 1 when the DVC remote is not in sync.")):
    """Latest run of each stage, the registry's champion and challenger, and the DVC remote's sync."""
    from medrega.status import gather, render

    report = gather(load(config, params, profile), Path("."), remote=remote)
    typer.echo(json.dumps(report, indent=2, default=str) if as_json else render(report))
    if check and report["remote"].get("in_sync") is not True:
        raise typer.Exit(1)
