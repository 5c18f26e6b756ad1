"""`medrega status`: what an operator wants to know on day 2, gathered read-only.

- each stage: is its output up to date (`dvc status`), what dvc.lock recorded, when its summary
  file was last written, and the latest MLflow run for it (status, when);
- the latest pipeline run in MLflow (and the stage it failed at, if it did);
- the registry: which versions hold `champion` and `challenger`;
- the DVC remote: whether every cached output is on it (`dvc status -c`).
Every part is best effort: a missing store or an unreachable remote is reported, not raised.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from medrega import errors, runlock, storage, tracking
from medrega.config import Config
from medrega.stages import NAMES as STAGES
from medrega.stages import RESULT_FILE, out_dir


def _when(ts_ms: float | None) -> str | None:
    if not ts_ms:
        return None
    return datetime.fromtimestamp(ts_ms / 1000, timezone.utc).isoformat(timespec="seconds")


def stages(cfg: Config, cwd: Path) -> dict[str, dict[str, Any]]:
    lock_path = cwd / "dvc.lock"
    lock = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {}) if lock_path.exists() else {}
    proc = storage.dvc("status", "--json", cwd=cwd, check=False)
    try:
        changed = json.loads(proc.stdout.strip() or "{}") if proc.returncode == 0 else None
    except ValueError:
        changed = None
    out = {}
    for stage in STAGES:
        summary = cwd / out_dir(cfg, stage) / RESULT_FILE
        entry: dict[str, Any] = {"in_dvc_lock": stage in lock}
        if stage in lock:
            entry["outs"] = {o["path"]: o.get("md5") for o in lock[stage].get("outs", [])}
        entry["state"] = ("unknown (dvc status failed)" if changed is None
                          else "changed" if stage in changed else "up to date" if stage in lock else "never run")
        if summary.exists():
            entry["last_written"] = datetime.fromtimestamp(summary.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
        failure = errors.read_failure(stage, cwd)
        if failure:
            entry["last_failure"] = f"{failure['kind']}: {failure['message'].splitlines()[0]}"
        out[stage] = entry
    return out


def mlflow_view(cfg: Config) -> dict[str, Any]:
    """Latest pipeline run, latest run per stage, champion and challenger."""
    import mlflow

    view: dict[str, Any] = {"tracking_uri": tracking.tracking_uri()}
    try:
        mlflow.set_tracking_uri(view["tracking_uri"])
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name(tracking.EXPERIMENT)
        if exp is not None:
            runs = client.search_runs([exp.experiment_id], "attributes.run_name LIKE 'pipeline-%'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
            if runs:
                r = runs[0]
                view["pipeline"] = {"run_id": r.info.run_id, "status": r.info.status, "started": _when(r.info.start_time),
                                    "profile": r.data.tags.get("medrega.profile"),
                                    "failed_stage": r.data.tags.get("medrega.failed_stage"),
                                    "skipped": r.data.tags.get("medrega.skipped_stages")}
            view["stages"] = {}
            for stage in STAGES:
                rs = client.search_runs([exp.experiment_id], f"tags.`medrega.stage` = '{stage}'",
                                        order_by=["attributes.start_time DESC"], max_results=1)
                if rs:
                    view["stages"][stage] = {"status": rs[0].info.status, "started": _when(rs[0].info.start_time),
                                             "run_id": rs[0].info.run_id}
        reg = cfg.register_
        view["registry"] = {}
        for alias in (reg.champion_alias, reg.alias):
            try:
                mv = client.get_model_version_by_alias(reg.model_name, alias)
                view["registry"][alias] = {"version": mv.version, "created": _when(mv.creation_timestamp), "run_id": mv.run_id}
            except Exception:  # noqa: BLE001 - no such model or alias yet
                view["registry"][alias] = None
    except Exception as err:  # noqa: BLE001 - an unreachable tracking server is a status, not a crash
        view["error"] = f"{type(err).__name__}: {err}"
    return view


def gather(cfg: Config, cwd: Path = Path("."), remote: bool = True) -> dict[str, Any]:
    cwd = Path(cwd)
    lock_file = cwd / runlock.LOCK_FILE
    running = runlock.is_held(lock_file)
    report: dict[str, Any] = {"profile": cfg.profile,
                              "run_in_progress": runlock.describe(runlock.holder(lock_file)) if running else None}
    if running:
        # DVC's own repo lock is held by the running pipeline; asking DVC now would only fail
        report["stages"] = {s: {"state": "run in progress"} for s in STAGES}
    else:
        report["stages"] = stages(cfg, cwd)
    report["mlflow"] = mlflow_view(cfg)
    name, url = storage.default_remote(cwd)
    report["remote"] = {"name": name, "url": url}
    if remote and name and not running:
        report["remote"].update(storage.remote_sync(cwd))
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"profile: {report['profile']}"]
    if report.get("run_in_progress"):
        lines.append(f"RUN IN PROGRESS: {report['run_in_progress']}")
    ml = report["mlflow"]
    p = ml.get("pipeline")
    if p:
        tail = f", FAILED at {p['failed_stage']}" if p.get("failed_stage") else ""
        lines.append(f"latest pipeline run: {p['status']} started {p['started']} (profile {p['profile']}{tail})")
    else:
        lines.append("latest pipeline run: none recorded")
    lines.append("stages:")
    for stage, s in report["stages"].items():
        run = (ml.get("stages") or {}).get(stage)
        mlrun = f"; last MLflow run {run['status']} {run['started']}" if run else ""
        written = f"; output written {s['last_written']}" if s.get("last_written") else ""
        failed = f"; last failure {s['last_failure']}" if s.get("last_failure") else ""
        lines.append(f"  {stage:<12} {s['state']}{written}{mlrun}{failed}")
    reg = ml.get("registry") or {}
    for alias, mv in reg.items():
        lines.append(f"registry {alias}: " + (f"version {mv['version']} (created {mv['created']})" if mv else "none"))
    if ml.get("error"):
        lines.append(f"mlflow: unreachable ({ml['error']})")
    r = report["remote"]
    if not r.get("name"):
        sync = "no default DVC remote"
    elif r.get("in_sync") is True:
        sync = "in sync"
    elif r.get("in_sync") is False:
        sync = f"NOT in sync: {len(r['missing'])} output(s) not pushed ({', '.join(r['missing'][:5])}); run `dvc push`"
    else:
        sync = f"unknown ({r.get('error') or 'not checked'})"
    lines.append(f"dvc remote {r.get('name')} ({r.get('url')}): {sync}")
    return "\n".join(lines)
