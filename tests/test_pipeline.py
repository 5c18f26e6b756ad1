"""The whole flow on a reduced profile, in an isolated git + DVC workspace.

Real components throughout: Prefect's ephemeral API, DVC with a local remote, MLflow on
SQLite, DeepSpeed ZeRO-3 over two torchrun CPU ranks.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, isolated_env
from tests.phi import leaks, phi_values

pytestmark = pytest.mark.slow


def run(cmd: list[str], ws: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ws, env=isolated_env(ws), capture_output=True, text=True, timeout=timeout)


def medrega(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return run([str(BIN / "medrega"), *args], ws)


def dvc(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], ws)


def stage_lines(output: str) -> dict[str, str]:
    """`| stage | status |` rows of the flow's final report."""
    rows = {}
    for line in output.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) == 2 and parts[0] in ("validate", "materialize", "align", "tune", "evaluate", "register"):
            rows[parts[0]] = parts[1]
    return rows


def test_pipeline_end_to_end_then_skip_then_partial_rerun(workspace: Path):
    ws = workspace
    assert (ws / ".dvc" / "config").exists()  # the repository's DVC setup, default remote included

    first = medrega(ws, "pipeline")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert set(stage_lines(first.stdout).values()) == {"ran"}

    # outputs of every stage, metrics DVC can read, and a clean DVC status
    reg = json.loads((ws / "artifacts/register/registered.json").read_text())
    metrics = json.loads((ws / "artifacts/eval/metrics.json").read_text())
    assert {"t2r", "r2t"} <= set(metrics) and metrics["t2r"]["n"] > 0
    assert "region_f1" in metrics["t2r"] and "accuracy" in metrics["r2t"]
    status = dvc(ws, "status", "--json")
    assert json.loads(status.stdout or "{}") == {}, status.stdout
    dag = dvc(ws, "dag")
    for stage in ("validate", "materialize", "align", "tune", "evaluate", "register"):
        assert stage in dag.stdout
    # the flow pushed to the default (local) remote
    assert any((ws / ".dvc-remote").rglob("*")), "nothing was pushed"

    # the registry holds the model as challenger, and it loads and answers through pyfunc
    probe = f"""
import json, mlflow, pandas as pd, base64
mlflow.set_tracking_uri({reg['tracking_uri']!r})
client = mlflow.MlflowClient()
mv = client.get_model_version_by_alias({reg['model_name']!r}, 'challenger')
model = mlflow.pyfunc.load_model('models:/{reg['model_name']}@challenger')
img = base64.b64encode(open(sorted(__import__('glob').glob('data/samed2d/images/*.png'))[0], 'rb').read()).decode()
out = model.predict(pd.DataFrame({{'image': [img], 'question': ['Where is the <ref>liver</ref>?'], 'task': ['t2r']}}))
parent = client.get_run(client.get_run(mv.run_id).data.tags['mlflow.parentRunId'])
children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{{parent.info.run_id}}'")
print(json.dumps({{'version': mv.version, 'cols': list(out.columns), 'regions': out['regions'][0],
                  'tags': mv.tags, 'stages': sorted(r.data.tags.get('medrega.stage', '') for r in children)}}))
"""
    loaded = run([sys.executable, "-c", probe], ws)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    info = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert str(info["version"]) == str(reg["version"])
    assert info["cols"] == ["answer", "regions"]
    assert isinstance(json.loads(info["regions"]), list)
    assert info["tags"]["git_commit"] and any(k.startswith("dvc.") for k in info["tags"])
    assert {"validate", "materialize", "align", "tune", "evaluate", "register"} <= set(info["stages"])

    # the shipped head CTs went in (their headers name patients, dates, institutions, UIDs):
    # none of those values is anywhere in what the run wrote, MLflow's and Prefect's stores
    # and the DVC cache and remote included, nor in its log
    from medrega.sources.embedded import PYDICOM_HEAD_CTS
    secrets = phi_values(*PYDICOM_HEAD_CTS)
    assert len(secrets) >= 5, secrets
    written = [p for d in ("data", "artifacts", "mlflow", ".prefect", ".dvc", ".dvc-remote") if (ws / d).exists()
               for p in (ws / d).rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" and "mlflow" in p.parts for p in written)
    assert leaks(written, secrets, ws, binary_min_len=8) == []
    assert [s for s in secrets if s in first.stdout + first.stderr] == []

    # nothing changed: every stage is reported up to date
    second = medrega(ws, "pipeline")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert set(stage_lines(second.stdout).values()) == {"up to date (skipped)"}

    # one evaluate knob changed: evaluate re-runs, and register after it (the threshold is
    # written into metrics.json, so its input changes); everything upstream is skipped
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["evaluate"]["iou_threshold"] = 0.25
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    # ...and register's first attempt meets a transient outage (its command fails once, the way
    # an unreachable S3 or MLflow server makes it fail): the flow retries that stage alone
    dvc_yaml = yaml.safe_load((ws / "dvc.yaml").read_text())
    assert dvc_yaml["stages"]["register"]["cmd"] == "medrega register --config params.resolved.yaml"
    dvc_yaml["stages"]["register"]["cmd"] = (
        "sh -c 'test -e .outage-seen || { touch .outage-seen; "
        "echo \"EndpointConnectionError: could not connect to the endpoint URL\" >&2; exit 1; }; exec medrega register --config params.resolved.yaml'")
    (ws / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False, allow_unicode=True))
    third = medrega(ws, "pipeline")
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    rows = stage_lines(third.stdout)
    assert rows == {"validate": "up to date (skipped)", "materialize": "up to date (skipped)",
                    "align": "up to date (skipped)", "tune": "up to date (skipped)",
                    "evaluate": "ran", "register": "ran"}
    log = third.stdout + third.stderr
    assert (ws / ".outage-seen").exists()
    assert "EndpointConnectionError" in log
    assert log.count("Retry 1/2") == 1 and "Retry 2/2" not in log  # one retry, of register only
    retried = [line for line in log.splitlines() if "Retry 1/2" in line]
    assert "register" in retried[0], retried
    assert json.loads((ws / "artifacts/register/registered.json").read_text())["version"] != reg["version"]


def test_failing_validation_stops_the_flow_and_writes_nothing_downstream(workspace: Path):
    ws = workspace
    assert medrega(ws, "generate").returncode == 0
    images = sorted((ws / "data/samed2d/images").glob("*.png"))
    victim = images[len(images) // 2]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated PNG

    result = medrega(ws, "pipeline")
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout + result.stderr
    assert victim.name in text and "image decodes" in text
    assert "stage 'validate' failed" in text
    assert not (ws / "artifacts/instructions").exists()
    assert not (ws / "artifacts/align").exists()
    # deterministic failures are not retried
    assert "Retry 1/2" not in text
