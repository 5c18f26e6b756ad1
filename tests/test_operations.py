"""Day-2 operations end to end, on one reduced workspace whose pipeline runs once (CPU budget):

- two pipeline runs started together in one workspace: the second waits for the run lock, both
  succeed, DVC's workspace and remote are clean afterwards;
- DVC remote and MLflow artifacts on S3 (moto's server on loopback), credentials only in the
  environment; the server going away mid-push fails the run naming the `push` stage, the local
  cache stays intact and the next run pushes what is missing;
- a fresh clone: `dvc pull` restores everything and `dvc repro` finds it all up to date;
- `medrega status`;
- a real Prefect server + process worker running the nightly deployment from prefect.yaml.

Tests share the module's workspace (the `ran` fixture) and each leaves the remote in sync.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import boto3
import httpx
import pytest
import yaml

from tests.conftest import BIN, REPO, isolated_env, make_workspace
from tests.servers import free_port, wait_http

pytestmark = pytest.mark.slow

KEY_ID, SECRET = "AKIAMEDREGATEST00001", "medrega-test-secret-do-not-leak-7f3a"
DATA_BUCKET, MLFLOW_BUCKET = "medrega-dvc", "medrega-mlflow"


class S3:
    """moto's S3 server on a fixed loopback port; its state survives stop/start (same process)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._cls = ThreadedMotoServer
        self.server = None
        self.start()

    def start(self):
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        self.server.stop()

    def client(self):
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=KEY_ID,
                            aws_secret_access_key=SECRET, region_name="us-east-1")

    def count(self, bucket: str, prefix: str = "") -> int:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sum(page.get("KeyCount", 0) for page in pages)


@pytest.fixture(scope="module")
def s3():
    server = S3()
    for bucket in (DATA_BUCKET, MLFLOW_BUCKET):
        server.client().create_bucket(Bucket=bucket)
    yield server
    try:
        server.stop()
    except Exception:  # noqa: BLE001 - already stopped by a test
        pass


def env_for(ws: Path, s3: S3) -> dict[str, str]:
    env = isolated_env(ws)
    env.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1",
               MLFLOW_S3_ENDPOINT_URL=s3.url, MEDREGA_ARTIFACT_ROOT=f"s3://{MLFLOW_BUCKET}/artifacts",
               AWS_CONFIG_FILE=str(ws.parent / "no-aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(ws.parent / "no-aws-creds"))
    return env


def sh(ws: Path, s3: S3, *cmd: str, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
    return subprocess.run([exe, *cmd[1:]], cwd=ws, env=env or env_for(ws, s3), capture_output=True, text=True, timeout=timeout)


def out(p: subprocess.CompletedProcess) -> str:
    return p.stdout[-5000:] + "\n--- stderr ---\n" + p.stderr[-5000:]


def dvc_json(ws: Path, s3: S3, *args: str) -> dict:
    p = sh(ws, s3, "dvc", *args, "--json")
    assert p.returncode == 0, out(p)
    return json.loads(p.stdout.strip() or "{}")


@pytest.fixture(scope="module")
def ran(tmp_path_factory, s3):
    """Configure S3 as the default DVC remote, then start two pipeline runs at the same moment."""
    ws = make_workspace(tmp_path_factory.mktemp("ops") / "ws")
    conf = sh(ws, s3, "medrega", "remote", "s3", "--bucket", DATA_BUCKET, "--prefix", "dvc",
              "--endpoint", s3.url, "--region", "us-east-1")
    assert conf.returncode == 0, out(conf)
    env = env_for(ws, s3)
    cmd = [str(BIN / "medrega"), "pipeline"]
    procs = [subprocess.Popen(cmd, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=1500) for p in procs]
    return {"ws": ws, "runs": [(p.returncode, o, e) for p, (o, e) in zip(procs, results)]}


def stage_rows(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) == 2 and parts[0] in ("validate", "materialize", "align", "tune", "evaluate", "register"):
            rows[parts[0]] = parts[1]
    return rows


def test_two_runs_at_once_one_waits_and_dvc_stays_clean(ran, s3):
    ws, runs = ran["ws"], ran["runs"]
    for code, o, e in runs:
        assert code == 0, o[-4000:] + e[-4000:]
    texts = [o + e for _, o, e in runs]
    waited = [t for t in texts if "waiting for the workspace run lock held by pid" in t]
    assert len(waited) == 1, "exactly one run should have waited for the other"
    # the one that waited found everything the other had just built
    assert set(stage_rows(waited[0]).values()) == {"up to date (skipped)"}
    other = texts[1 - texts.index(waited[0])]
    assert set(stage_rows(other).values()) == {"ran"}
    assert dvc_json(ws, s3, "status") == {}
    assert dvc_json(ws, s3, "status", "--cloud") == {}
    assert s3.count(DATA_BUCKET, "dvc/") > 0
    # MLflow's artifacts went to S3 too (the registered model)
    assert s3.count(MLFLOW_BUCKET, "artifacts/") > 0


def test_no_credentials_written_anywhere(ran, s3):
    ws = ran["ws"]
    config = (ws / ".dvc" / "config").read_text()
    assert "s3://medrega-dvc/dvc" in config and s3.url in config
    assert not (ws / ".dvc" / "config.local").exists()
    leaks = []
    for path in ws.rglob("*"):
        if path.is_file() and ".git" not in path.parts and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            if SECRET.encode() in data or KEY_ID.encode() in data:
                leaks.append(str(path.relative_to(ws)))
    assert leaks == []


def test_s3_server_gone_mid_push_then_next_run_pushes_the_rest(ran, s3):
    ws = ran["ws"]
    # an empty prefix as the default remote, one upload at a time: the whole cache must go up
    conf = sh(ws, s3, "medrega", "remote", "s3", "--bucket", DATA_BUCKET, "--prefix", "dvc2",
              "--endpoint", s3.url, "--region", "us-east-1")
    assert conf.returncode == 0, out(conf)
    assert sh(ws, s3, "dvc", "remote", "modify", "s3", "jobs", "1").returncode == 0
    proc = subprocess.Popen([str(BIN / "medrega"), "pipeline"], cwd=ws, env=env_for(ws, s3),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = threading.Event()

    def kill_when_upload_starts():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if s3.count(DATA_BUCKET, "dvc2/") > 0:
                    s3.stop()
                    stopped.set()
                    return
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.2)  # jobs=1 over a few thousand objects: the push lasts minutes

    watcher = threading.Thread(target=kill_when_upload_starts, daemon=True)
    watcher.start()
    o, e = proc.communicate(timeout=900)
    watcher.join(5)
    assert stopped.is_set(), "the push finished before the server could be stopped\n" + o[-3000:] + e[-3000:]
    text = o + e
    assert proc.returncode == 1, text[-5000:]
    assert "stage 'push' failed" in text and "still in the local DVC cache" in text

    # the local side is untouched: workspace and cache match dvc.lock
    s3.start()
    assert dvc_json(ws, s3, "status") == {}
    partial = s3.count(DATA_BUCKET, "dvc2/")
    missing = dvc_json(ws, s3, "status", "--cloud")
    assert partial > 0 and missing, "expected a partial upload"

    # the failed flow run's state names the stage, as the Prefect UI shows it
    probe = ("import asyncio\nfrom prefect.client.orchestration import get_client\n"
             "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType\n"
             "from prefect.client.schemas.objects import StateType\n"
             "async def main():\n"
             "    async with get_client() as c:\n"
             "        f = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.FAILED])))\n"
             "        runs = await c.read_flow_runs(flow_run_filter=f)\n"
             "        print('\\n'.join(r.state.message for r in runs))\n"
             "asyncio.run(main())\n")
    msg = sh(ws, s3, "python", "-c", probe)
    assert msg.returncode == 0, out(msg)
    assert "stage 'push' failed" in msg.stdout, msg.stdout

    # the rest goes up with parallel uploads again (one at a time was only for the interruption)
    assert sh(ws, s3, "dvc", "remote", "modify", "s3", "jobs", "4").returncode == 0
    again = sh(ws, s3, "medrega", "pipeline")
    assert again.returncode == 0, out(again)
    assert dvc_json(ws, s3, "status", "--cloud") == {}
    assert s3.count(DATA_BUCKET, "dvc2/") > partial


def test_fresh_clone_pulls_everything_and_repro_is_up_to_date(ran, s3, tmp_path):
    ws = ran["ws"]
    git = ["git", "-c", "user.email=t@example.org", "-c", "user.name=test"]
    assert sh(ws, s3, *git, "add", "-A").returncode == 0
    commit = sh(ws, s3, *git, "commit", "-q", "-m", "snapshot")
    assert commit.returncode == 0, out(commit)
    tracked = sh(ws, s3, "git", "ls-files").stdout.split()
    assert "dvc.lock" in tracked and "data.dvc" in tracked
    assert not any(t.startswith(("artifacts/", "data/")) for t in tracked)  # outputs live in DVC

    clone = tmp_path / "clone"
    assert subprocess.run(["git", "clone", "-q", str(ws), str(clone)], capture_output=True).returncode == 0
    pull = sh(clone, s3, "dvc", "pull")
    assert pull.returncode == 0, out(pull)
    assert (clone / "artifacts/tune/model").is_dir() and (clone / "data").is_dir()
    assert (clone / "artifacts/eval/metrics.json").is_file()
    repro = sh(clone, s3, "dvc", "repro")
    assert repro.returncode == 0, out(repro)
    assert "Data and pipelines are up to date" in repro.stdout, repro.stdout
    assert dvc_json(clone, s3, "status") == {}


def test_status_summarises_stages_registry_and_remote(ran, s3):
    ws = ran["ws"]
    p = sh(ws, s3, "medrega", "status", "--json", "--check")
    assert p.returncode == 0, out(p)
    report = json.loads(p.stdout)
    assert {s["state"] for s in report["stages"].values()} == {"up to date"}
    assert report["mlflow"]["pipeline"]["status"] == "FINISHED"
    assert set(report["mlflow"]["stages"]) == {"validate", "materialize", "align", "tune", "evaluate", "register"}
    assert report["mlflow"]["registry"]["challenger"]["version"]
    assert report["remote"]["name"] == "s3" and report["remote"]["in_sync"] is True
    text = sh(ws, s3, "medrega", "status")
    assert text.returncode == 0 and "registry challenger: version" in text.stdout and ": in sync" in text.stdout


def test_nightly_deployment_runs_on_a_real_prefect_server_and_worker(ran, s3, tmp_path):
    ws = ran["ws"]
    # a knob of the evaluate stage: the scheduled run re-runs evaluate and register, skips the rest
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["evaluate"]["max_new_tokens"] += 1
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = env_for(ws, s3)
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api, MEDREGA_WORKDIR=str(ws),
               PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_SERVER_API_HOST="127.0.0.1")
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, env=server_env, stdout=log, stderr=subprocess.STDOUT)
    worker = None
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)

        pool = sh(ws, s3, "prefect", "work-pool", "create", "medrega-process", "--type", "process", env=env)
        assert pool.returncode == 0, out(pool)
        deploy = sh(ws, s3, "prefect", "--no-prompt", "deploy", "--all", env=env)
        assert deploy.returncode == 0, out(deploy)

        nightly = httpx.get(f"{api}/deployments/name/medrega-pipeline/nightly").json()
        assert nightly["entrypoint"] == "flows/pipeline.py:medrega_pipeline"
        assert nightly["work_pool_name"] == "medrega-process"
        assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
        assert nightly["parameters"]["profile"] == "tiny"
        promote = httpx.get(f"{api}/deployments/name/medrega-promote/promote").json()
        assert promote["entrypoint"] == "flows/promote.py:promote_flow"

        worker_log = (tmp_path / "worker.log").open("w")
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "medrega-process"],
                                  cwd=tmp_path, env=env, stdout=worker_log, stderr=subprocess.STDOUT)
        trigger = sh(ws, s3, "prefect", "deployment", "run", "medrega-pipeline/nightly", env=env)
        assert trigger.returncode == 0, out(trigger)
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", trigger.stdout).group(1)
        deadline = time.monotonic() + 900
        while True:
            state = httpx.get(f"{api}/flow_runs/{run_id}").json()["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.monotonic() < deadline, f"flow run stuck in {state}"
            time.sleep(3)
        assert state["type"] == "COMPLETED", f"{state}\n{(tmp_path / 'worker.log').read_text()[-5000:]}"
        rows = stage_rows((tmp_path / "worker.log").read_text())
        assert rows.get("evaluate") == "ran" and rows.get("tune") == "up to date (skipped)", rows
        assert dvc_json(ws, s3, "status") == {}
        assert dvc_json(ws, s3, "status", "--cloud") == {}
    finally:
        for proc in (worker, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_make_ui_serves_both_uis_on_loopback_and_ctrl_c_stops_both(tmp_path):
    """`make ui` as an operator runs it: both servers answer, their addresses are printed, and
    Ctrl-C (SIGINT to the terminal's process group) leaves neither running."""
    prefect_port, mlflow_port = free_port(), free_port()
    env = isolated_env(tmp_path)
    log = tmp_path / "ui.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "ui", f"PREFECT_UI_PORT={prefect_port}",
             f"MLFLOW_UI_PORT={mlflow_port}", f"MLFLOW_DB={tmp_path / 'mlflow' / 'mlflow.db'}"],
            cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    urls = {"prefect": f"http://127.0.0.1:{prefect_port}/api/health", "mlflow": f"http://127.0.0.1:{mlflow_port}/health"}
    try:
        for url in urls.values():
            wait_http(url, proc, 240, log)
        text = log.read_text()
        assert f"Prefect UI: http://127.0.0.1:{prefect_port}" in text
        assert f"MLflow UI: http://127.0.0.1:{mlflow_port}" in text
        assert (tmp_path / "mlflow" / "mlflow.db").exists()  # the store named, not the repo's
        assert (tmp_path / ".prefect").exists()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # The servers' workers shut down gracefully, so give them a moment; a server that is still
    # answering after a minute was left behind.
    deadline = time.monotonic() + 60
    for url in urls.values():
        while True:
            try:
                httpx.get(url, timeout=2)
            except httpx.TransportError:
                break
            assert time.monotonic() < deadline, f"{url} still answers after Ctrl-C"
            time.sleep(1)
