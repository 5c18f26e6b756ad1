"""Registry commands: promote, rollback, serve, predict.

They read the registry named by `MLFLOW_TRACKING_URI` (default: the local SQLite store), and
the model name, aliases and gate from params.yaml's `register:` section.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cli.app import ConfigOpt, ParamsOpt, ProfileOpt, app, console, fail, load
from medrega.errors import BadInput, MedregaError


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(BadInput.exit_code)


@app.command()
def promote(params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
            version: Optional[str] = typer.Option(None, help="Version to promote (default: the challenger)."),
            force: bool = typer.Option(False, "--force", help="Promote even if a gate metric regressed."),
            reason: Optional[str] = typer.Option(None, help="Why (required with --force); recorded on the version.")):
    """Compare the challenger with the champion on the gate metrics; move `champion` if none regresses."""
    from flows.promote import promote_flow

    if force and not (reason or "").strip():
        _fail("--force needs --reason: a manual override is recorded with its reason")
    try:
        result = promote_flow(params_file=str(params), profile=profile, version=version,
                              override_reason=reason if force else None)
    except MedregaError as err:
        fail(err, "promote")
    typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
    if result["decision"] in ("refused", "not comparable"):
        console.print(f"[yellow]not promoted:[/] {result['reason']} (override: --force --reason '...')")
        raise typer.Exit(1)


@app.command()
def rollback(config: Optional[Path] = ConfigOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
             to: Optional[str] = typer.Option(None, help="Version to restore (default: the one the champion replaced)."),
             reason: str = typer.Option("rollback", help="Why; recorded on both versions.")):
    """Move `champion` back to the previous champion (or to --to VERSION)."""
    import mlflow

    from medrega import registry, tracking

    cfg = load(config, params, profile).register_
    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        result = registry.rollback(mlflow.MlflowClient(), cfg.model_name, champion_alias=cfg.champion_alias,
                                   to=to, reason=reason)
    except MedregaError as err:  # PromotionError (exit 3), RegistryUnavailable (exit 75)
        fail(err, "rollback")
    except mlflow.exceptions.MlflowException as err:
        _fail(str(getattr(err, "message", err)))
    typer.echo(json.dumps(result, indent=2))


def _model_uri(cfg, model: Optional[str]) -> str:
    return model or f"models:/{cfg.model_name}@{cfg.champion_alias}"


def _placement(cfg) -> dict:
    """The active profile's dtype and device map: the served model places itself as evaluation does."""
    return {"dtype": cfg.model.dtype, "device_map": cfg.model.device_map}


@app.command()
def serve(config: Optional[Path] = ConfigOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
          model: Optional[str] = typer.Option(None, help="Model URI (default: models:/<name>@champion)."),
          host: str = "127.0.0.1", port: int = 5001):
    """Serve the champion over HTTP (model.serve: MLflow's /invocations contract, hardened), in this process."""
    import mlflow

    from medrega import tracking
    from model.serve import load as load_model
    from model.serve import serve as run_server

    cfg = load(config, params, profile)
    uri = _model_uri(cfg.register_, model)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        python_model = load_model(uri, _placement(cfg))
    except MedregaError as err:  # weights by reference: missing/corrupt (exit 3), remote down (exit 75);
        fail(err, f"loading {uri}")  # a model that does not fit the devices the profile gives it (exit 3)
    except (mlflow.exceptions.MlflowException, OSError, ValueError) as err:
        _fail(f"cannot load {uri}: {getattr(err, 'message', None) or err}")
    console.print(f"serving {uri} on http://{host}:{port}/invocations")
    raise typer.Exit(run_server(uri, host, port, cfg.serve, python_model=python_model))


@app.command()
def predict(image: Path = typer.Option(..., help="PNG, JPEG or DICOM file."),
            question: str = typer.Option(..., help="e.g. 'Where is the <ref>liver</ref>?'"),
            out: Optional[Path] = typer.Option(None, help="Write the image with the regions drawn and named."),
            task: Optional[str] = typer.Option(None, help="r2t | t2r | caption: picks the tuned base prompt."),
            config: Optional[Path] = ConfigOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
            model: Optional[str] = typer.Option(None, help="Model URI or local path (default: models:/<name>@champion).")):
    """Ask the champion a question about a scan; print the answer and regions, optionally draw them."""
    import base64
    import io

    import mlflow
    import pandas as pd

    from medrega import tracking
    from medrega.scans import ScanError, draw_regions, read_scan

    full = load(config, params, profile)
    cfg = full.register_
    try:
        scan = read_scan(image)
    except ScanError as err:
        _fail(str(err))
    buffer = io.BytesIO()
    scan.save(buffer, format="PNG")  # DICOM and JPEG alike reach the model as PNG
    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        loaded = mlflow.pyfunc.load_model(_model_uri(cfg, model), model_config=_placement(full))
        row = {"image": [base64.b64encode(buffer.getvalue()).decode()], "question": [question]}
        if task:
            row["task"] = [task]
        result = loaded.predict(pd.DataFrame(row))
    except MedregaError as err:  # weights by reference: missing/corrupt (exit 3), remote down (exit 75);
        fail(err, "predict")     # a model that does not fit the devices the profile gives it (exit 3)
    except mlflow.exceptions.MlflowException as err:
        _fail(err.message)
    regions = json.loads(result["regions"][0])
    typer.echo(result["answer"][0])
    typer.echo(json.dumps(regions, ensure_ascii=False))
    if out:
        draw_regions(scan, regions).save(out)
        console.print(f"overlay written to {out}")
