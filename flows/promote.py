"""Promotion as a Prefect flow: challenger vs champion on the gate metrics of params.yaml.

Orchestration only; the rule lives in medrega/registry.py. The flow adds the Prefect artifacts
(the decision and every compared figure), so each promotion is visible in the Prefect UI beside
the pipeline run that produced the version.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from medrega import config as config_mod
from medrega import registry, tracking
from medrega.config import RegisterConfig


@task(name="compare-and-promote")
def compare_and_promote(cfg: RegisterConfig, version: str | None, override_reason: str | None) -> dict[str, Any]:
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    return registry.promote(mlflow.MlflowClient(), cfg.model_name, list(cfg.gate.metrics), cfg.gate.tolerance,
                            challenger_alias=cfg.alias, champion_alias=cfg.champion_alias,
                            version=version, override_reason=override_reason)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}"


@flow(name="medrega-promote")
def promote_flow(params_file: str = "params.yaml", profile: str | None = None, version: str | None = None,
                 override_reason: str | None = None) -> dict[str, Any]:
    cfg = config_mod.resolve(params_file, profile).register_
    result = compare_and_promote(cfg, version, override_reason)
    rows = [{"metric": r["metric"], "challenger": _fmt(r["challenger"]), "champion": _fmt(r["champion"]),
             "delta": _fmt(r["delta"]), "status": r["status"], "note": r.get("note", "")} for r in result["rows"]]
    create_table_artifact(key="medrega-promotion", table=rows or [{"metric": "-", "status": result["decision"]}],
                          description=f"**{result['decision']}** version {result['version']}: {result['reason']}")
    create_markdown_artifact(key="medrega-promotion-decision", markdown=(
        f"# Promotion of `{cfg.model_name}` version {result['version']}: **{result['decision']}**\n\n"
        f"{result['reason']}\n\n`{cfg.champion_alias}` is now version {result['champion']}.\n"))
    get_run_logger().info("%s: version %s (%s)", result["decision"], result["version"], result["reason"])
    return result
