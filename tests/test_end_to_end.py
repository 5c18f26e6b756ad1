"""The pipeline end to end, on one reduced workspace whose first run every test here shares (the CPU
budget allows one): real Prefect (one server for the module), DVC with its remote on an S3 server
(moto, loopback), MLflow on SQLite with its artifacts on that S3, DeepSpeed ZeRO-3 over two torchrun
CPU ranks. The tests run in file order; each leaves the workspace and the remote consistent for the
next, so any of them can be read on its own:

- two runs started together: one waits for the workspace lock and finds everything built;
- what the run wrote: metrics, the registered model answering through pyfunc, lineage, the tuned
  checkpoint (ZeRO-3, two ranks, merged = base + adapter), no patient identifier and no credential
  anywhere, `medrega status`;
- the nightly deployment on a Prefect server and process worker;
- profiles: switching re-runs exactly what differs and registers under the new profile (with a
  transient failure retried once);
- the S3 server going away mid-push, then the next run pushing the rest (after an edit of an
  inactive profile, which re-runs nothing);
- a fresh clone: `dvc pull` restores everything and `dvc repro` finds it up to date.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import httpx
import pytest
import yaml

from tests.conftest import BIN, isolated_env, make_workspace, publish_trained
from tests.phi import leaks, phi_values
from tests.servers import free_port, stop

pytestmark = pytest.mark.slow

KEY_ID, SECRET = "AKIAMEDREGATEST00001", "medrega-test-secret-do-not-leak-7f3a"
DATA_BUCKET, MLFLOW_BUCKET = "medrega-dvc", "medrega-mlflow"
STAGES = ("validate", "materialize", "align", "tune", "evaluate", "register")


class S3:
    """moto's S3 server on a fixed loopback port; its state survives stop/start (same process)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._cls = ThreadedMotoServer
        self.start()
        for bucket in (DATA_BUCKET, MLFLOW_BUCKET):
            self.client().create_bucket(Bucket=bucket)

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
    yield server
    try:
        server.stop()
    except Exception:  # noqa: BLE001 - already stopped by a test
        pass


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """One Prefect server for every flow run of the module (each run would otherwise start its own
    ephemeral API, tens of seconds on two cores)."""
    home = tmp_path_factory.mktemp("prefect")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(isolated_env(home), PREFECT_HOME=str(home), PREFECT_SERVER_API_HOST="127.0.0.1")
    log = home / "server.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=home, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield api
    finally:
        stop(proc)


def env_for(ws: Path, s3: S3, api: str) -> dict[str, str]:
    env = isolated_env(ws)
    env.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1",
               MLFLOW_S3_ENDPOINT_URL=s3.url, MEDREGA_ARTIFACT_ROOT=f"s3://{MLFLOW_BUCKET}/artifacts",
               AWS_CONFIG_FILE=str(ws.parent / "no-aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(ws.parent / "no-aws-creds"),
               PREFECT_API_URL=api)
    return env


def sh(ws: Path, env: dict, *cmd: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
    return subprocess.run([exe, *cmd[1:]], cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)


def out(p: subprocess.CompletedProcess) -> str:
    return p.stdout[-5000:] + "\n--- stderr ---\n" + p.stderr[-5000:]


def dvc_json(ws: Path, env: dict, *args: str) -> dict:
    p = sh(ws, env, "dvc", *args, "--json")
    assert p.returncode == 0, out(p)
    return json.loads(p.stdout.strip() or "{}")


def stage_rows(text: str) -> dict[str, str]:
    """`| stage | status |` rows of the flow's final report."""
    rows = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) == 2 and parts[0] in STAGES:
            rows[parts[0]] = parts[1]
    return rows


@pytest.fixture(scope="module")
def run(request, tmp_path_factory):
    """The workspace: S3 as its default DVC remote, a second profile `short-answers` (the evaluate
    section only), then two pipeline runs started at the same moment. Other modules work on a copy
    of the workspace as these runs left it (tests.conftest.TRAINED): published here, or a note
    that it failed, so none of them waits for nothing."""
    try:
        s3, prefect_api = request.getfixturevalue("s3"), request.getfixturevalue("prefect_api")
        ws = make_workspace(tmp_path_factory.mktemp("e2e") / "ws")
        params = yaml.safe_load((ws / "params.yaml").read_text())
        params["profiles"]["short-answers"] = {"evaluate": {"max_new_tokens": 6}}
        (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
        env = env_for(ws, s3, prefect_api)
        conf = sh(ws, env, "medrega", "remote", "s3", "--bucket", DATA_BUCKET, "--prefix", "dvc",
                  "--endpoint", s3.url, "--region", "us-east-1")
        assert conf.returncode == 0, out(conf)
        procs = [subprocess.Popen([str(BIN / "medrega"), "pipeline"], cwd=ws, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        runs = [(p.returncode, o + e) for p, (o, e) in ((p, p.communicate(timeout=1800)) for p in procs)]
    except BaseException as err:
        publish_trained(tmp_path_factory, None, f"the end-to-end module's pipeline runs did not end: {err!r}")
        raise
    failed = [text for code, text in runs if code != 0]
    publish_trained(tmp_path_factory, None if failed else ws, failed[0][-3000:] if failed else "")
    return {"ws": ws, "env": env, "runs": runs}


def test_two_runs_at_once_build_everything_once(run, s3):
    ws, env = run["ws"], run["env"]
    for code, text in run["runs"]:
        assert code == 0, text[-6000:]
    texts = [text for _, text in run["runs"]]
    waited = [t for t in texts if "waiting for the workspace run lock held by pid" in t]
    assert len(waited) == 1, "exactly one run should have waited for the other"
    # the one that waited found everything the other had just built
    assert set(stage_rows(waited[0]).values()) == {"up to date (skipped)"}
    assert set(stage_rows(texts[1 - texts.index(waited[0])]).values()) == {"ran"}
    assert dvc_json(ws, env, "status") == {}
    assert dvc_json(ws, env, "status", "--cloud") == {}
    assert s3.count(DATA_BUCKET, "dvc/") > 0
    assert s3.count(MLFLOW_BUCKET, "artifacts/") > 0  # MLflow's artifacts (the registered model) on S3 too
    dag = sh(ws, env, "dvc", "dag")
    assert all(stage in dag.stdout for stage in ("resolve", *STAGES))


def test_what_the_run_wrote_and_the_registered_model_answers(run):
    from medrega import config, stages

    ws, env = run["ws"], run["env"]
    metrics = json.loads((ws / "artifacts/eval/metrics.json").read_text())
    assert {"t2r", "r2t"} <= set(metrics) and metrics["t2r"]["n"] > 0
    assert "region_f1" in metrics["t2r"] and "accuracy" in metrics["r2t"]
    cfg = config.load_resolved(ws / "params.resolved.yaml")
    for stage in STAGES:  # every stage left its typed result where the stage table says
        result = json.loads((ws / stages.out_dir(cfg, stage) / stages.RESULT_FILE).read_text())
        assert result["stage"] == stage and result["outputs"]
    reg = json.loads((ws / "artifacts/register/registered.json").read_text())
    probe = f"""
import json, mlflow, pandas as pd, base64, glob
client = mlflow.MlflowClient()
mv = client.get_model_version_by_alias({reg['model_name']!r}, 'challenger')
model = mlflow.pyfunc.load_model('models:/{reg['model_name']}@challenger')
img = base64.b64encode(open(sorted(glob.glob('data/samed2d/images/*.png'))[0], 'rb').read()).decode()
out = model.predict(pd.DataFrame({{'image': [img], 'question': ['Where is the <ref>liver</ref>?'], 'task': ['t2r']}}))
parent = client.get_run(client.get_run(mv.run_id).data.tags['mlflow.parentRunId'])
children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{{parent.info.run_id}}'")
print(json.dumps({{'version': mv.version, 'cols': list(out.columns), 'regions': out['regions'][0],
                  'tags': mv.tags, 'stages': sorted(r.data.tags.get('medrega.stage', '') for r in children)}}))
"""
    loaded = sh(ws, dict(env, MLFLOW_TRACKING_URI=reg["tracking_uri"]), sys.executable, "-c", probe)
    assert loaded.returncode == 0, out(loaded)
    info = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert str(info["version"]) == str(reg["version"]) and info["cols"] == ["answer", "regions"]
    assert isinstance(json.loads(info["regions"]), list)
    assert info["tags"]["git_commit"] and info["tags"]["profile"] == "tiny" and any(k.startswith("dvc.") for k in info["tags"])
    assert set(STAGES) <= set(info["stages"])


def test_tuned_under_zero3_on_two_ranks_and_merged_equals_base_plus_adapter(run):
    from peft import PeftModel
    from transformers import InternVLForConditionalGeneration

    from medrega import config
    from model.infer import Generator, Query

    ws = run["ws"]
    summary = json.loads((ws / "artifacts/tune/train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3 and summary["mode"] == "lora"
    log = (ws / "artifacts/tune/train.log").read_text()
    # every rank read the resolved config the stage wrote, which is the workspace's
    assert "--nproc-per-node=2" in log and "--config artifacts/tune/config.yaml" in log
    assert config.load_resolved(ws / "artifacts/tune/config.yaml") == config.load_resolved(ws / "params.resolved.yaml")
    image = sorted((ws / "data/samed2d/images").glob("*.png"))[0]
    queries = [Query(image, "<image>\nWhere is the <ref>liver</ref>?", None),
               Query(image, "<image>\n这是什么结构？<box>[[100, 100, 400, 400]]</box>", None)]
    merged = Generator.from_pretrained(ws / "artifacts/tune/model")
    base = InternVLForConditionalGeneration.from_pretrained(str(ws / "artifacts/align/model"))
    adapted = Generator(PeftModel.from_pretrained(base, str(ws / "artifacts/tune/adapter")), merged.processor)
    assert merged.generate(queries, max_new_tokens=12) == adapted.generate(queries, max_new_tokens=12)


def test_no_patient_identifier_and_no_credential_anywhere(run):
    """The shipped head CTs went in (their headers name patients, dates, institutions, UIDs): none
    of those values is anywhere the run wrote (MLflow's and Prefect's stores, the DVC cache and
    artifacts), nor in its log; the AWS secret is in no file."""
    from medrega.sources.embedded import PYDICOM_HEAD_CTS

    ws = run["ws"]
    secrets = phi_values(*PYDICOM_HEAD_CTS)
    assert len(secrets) >= 5, secrets
    written = [p for d in ("data", "artifacts", "mlflow", ".prefect", ".dvc") if (ws / d).exists()
               for p in (ws / d).rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" and "mlflow" in p.parts for p in written)
    assert leaks(written, secrets, ws, binary_min_len=8) == []
    assert [s for s in secrets if any(s in text for _, text in run["runs"])] == []
    config = (ws / ".dvc" / "config").read_text()
    assert "s3://medrega-dvc/dvc" in config and not (ws / ".dvc" / "config.local").exists()
    every = [p for p in ws.rglob("*") if p.is_file() and ".git" not in p.parts and p.stat().st_size < 50_000_000]
    assert [str(p) for p in every if SECRET.encode() in p.read_bytes() or KEY_ID.encode() in p.read_bytes()] == []


def test_status_summarises_stages_registry_and_remote(run):
    ws, env = run["ws"], run["env"]
    p = sh(ws, env, "medrega", "status", "--json", "--check")
    assert p.returncode == 0, out(p)
    report = json.loads(p.stdout)
    assert {s["state"] for s in report["stages"].values()} == {"up to date"}
    assert report["mlflow"]["pipeline"]["status"] == "FINISHED"
    assert set(report["mlflow"]["stages"]) == set(STAGES)
    assert report["mlflow"]["registry"]["challenger"]["version"]
    assert report["remote"]["name"] == "s3" and report["remote"]["in_sync"] is True
    text = sh(ws, env, "medrega", "status")
    assert text.returncode == 0 and "registry challenger: version" in text.stdout and ": in sync" in text.stdout


def test_nightly_deployment_runs_on_a_prefect_server_and_worker(run, prefect_api, tmp_path):
    """prefect.yaml's deployments on the module's Prefect server, run by a process worker: the
    nightly run gets the deployment's parameters (profile tiny) and runs the pipeline in the
    workspace, where that profile is up to date, so every stage is checked and skipped (what
    re-runs on a change is the next test's)."""
    ws, env = run["ws"], dict(run["env"], MEDREGA_WORKDIR=str(run["ws"]), PREFECT_WORKER_QUERY_SECONDS="2")
    assert sh(ws, env, "prefect", "work-pool", "create", "medrega-process", "--type", "process").returncode == 0
    deploy = sh(ws, env, "prefect", "--no-prompt", "deploy", "--all")
    assert deploy.returncode == 0, out(deploy)
    nightly = httpx.get(f"{prefect_api}/deployments/name/medrega-pipeline/nightly").json()
    assert nightly["entrypoint"] == "flows/pipeline.py:medrega_pipeline" and nightly["work_pool_name"] == "medrega-process"
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["parameters"]["profile"] == "tiny"
    assert httpx.get(f"{prefect_api}/deployments/name/medrega-promote/promote").json()["entrypoint"] == \
        "flows/promote.py:promote_flow"
    worker_log = tmp_path / "worker.log"
    with worker_log.open("w") as fh:
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "medrega-process"],
                                  cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        trigger = sh(ws, env, "prefect", "deployment", "run", "medrega-pipeline/nightly")
        assert trigger.returncode == 0, out(trigger)
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", trigger.stdout).group(1)
        deadline = time.monotonic() + 900
        while True:
            state = httpx.get(f"{prefect_api}/flow_runs/{run_id}").json()["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.monotonic() < deadline, f"flow run stuck in {state}"
            time.sleep(3)
    finally:
        stop(worker)
    assert state["type"] == "COMPLETED", f"{state}\n{worker_log.read_text()[-5000:]}"
    assert httpx.get(f"{prefect_api}/flow_runs/{run_id}").json()["parameters"]["profile"] == "tiny"
    assert stage_rows(worker_log.read_text()) == dict.fromkeys(STAGES, "up to date (skipped)"), \
        worker_log.read_text()[-5000:]
    assert dvc_json(ws, env, "status") == {} and dvc_json(ws, env, "status", "--cloud") == {}


def test_a_profile_switch_reruns_what_differs_and_registers_under_it(run):
    """`--profile short-answers` changes the evaluate section only: evaluate and register re-run,
    everything upstream is skipped, and the new version is tagged with the profile. Register's
    first attempt meets a transient outage (its command fails once, as an unreachable S3 or MLflow
    server makes it fail): the flow retries that stage alone."""
    ws, env = run["ws"], run["env"]
    before = json.loads((ws / "artifacts/register/registered.json").read_text())
    original = (ws / "dvc.yaml").read_text()
    dvc_yaml = yaml.safe_load(original)
    cmd = dvc_yaml["stages"]["register"]["cmd"]
    dvc_yaml["stages"]["register"]["cmd"] = (
        "sh -c 'test -e .outage-seen || { touch .outage-seen; "
        f"echo \"EndpointConnectionError: could not connect to the endpoint URL\" >&2; exit 1; }}; exec {cmd}'")
    (ws / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False, allow_unicode=True))
    try:
        switched = sh(ws, env, "medrega", "pipeline", "--profile", "short-answers")
    finally:
        (ws / "dvc.yaml").write_text(original)
        assert sh(ws, env, "dvc", "commit", "-f", "register").returncode == 0  # the lock records the real command
    log = out(switched) + "\n--- params.resolved.yaml ---\n" + (ws / "params.resolved.yaml").read_text()[:3000]
    assert switched.returncode == 0, log
    assert stage_rows(switched.stdout) == {"validate": "up to date (skipped)", "materialize": "up to date (skipped)",
                                           "align": "up to date (skipped)", "tune": "up to date (skipped)",
                                           "evaluate": "ran", "register": "ran"}, log
    assert (ws / ".outage-seen").exists() and "EndpointConnectionError" in log
    assert log.count("Retry 1/2") == 1 and "Retry 2/2" not in log  # one retry, of register only
    assert "register" in next(line for line in log.splitlines() if "Retry 1/2" in line)
    after = json.loads((ws / "artifacts/register/registered.json").read_text())
    assert after["version"] != before["version"]
    tags = sh(ws, dict(env, MLFLOW_TRACKING_URI=after["tracking_uri"]), sys.executable, "-c",
              "import json, mlflow; print(json.dumps(mlflow.MlflowClient()"
              f".get_model_version({after['model_name']!r}, {after['version']!r}).tags))")
    assert json.loads(tags.stdout.strip().splitlines()[-1])["profile"] == "short-answers", out(tags)
    assert "profile: short-answers" in (ws / "params.resolved.yaml").read_text()


def test_s3_server_gone_mid_push_then_next_run_pushes_the_rest(run, s3, prefect_api):
    ws, env = run["ws"], run["env"]
    # the remote loses its small objects (over a hundred files, a few MB: quick to send again, many
    # requests to interrupt), and uploads go one at a time, so the server can go mid-push
    client = s3.client()
    objects = [o for page in client.get_paginator("list_objects_v2").paginate(Bucket=DATA_BUCKET, Prefix="dvc/")
               for o in page.get("Contents", [])]
    small = [o["Key"] for o in objects if o["Size"] < 1_000_000]
    assert len(small) >= 50, len(small)
    for key in small:
        client.delete_object(Bucket=DATA_BUCKET, Key=key)
    left = s3.count(DATA_BUCKET, "dvc/")
    assert dvc_json(ws, env, "status", "--cloud"), "the remote should miss what was deleted"
    assert sh(ws, env, "dvc", "remote", "modify", "s3", "jobs", "1").returncode == 0
    # one attempt per request (botocore retries a refused connection with backoff, for every file
    # still to send): the push fails as soon as the server is gone instead of minutes later
    # the profile the workspace is at (the previous test's): nothing re-runs, the push is all there is
    proc = subprocess.Popen([str(BIN / "medrega"), "pipeline", "--profile", "short-answers"], cwd=ws,
                            env=dict(env, AWS_MAX_ATTEMPTS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = threading.Event()

    def stop_when_upload_starts():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if s3.count(DATA_BUCKET, "dvc/") > left:
                    s3.stop()
                    stopped.set()
                    return
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=stop_when_upload_starts, daemon=True)
    watcher.start()
    o, e = proc.communicate(timeout=900)
    watcher.join(5)
    assert stopped.is_set(), "the push finished before the server could be stopped\n" + o[-3000:] + e[-3000:]
    assert proc.returncode == 1, (o + e)[-5000:]
    assert "stage 'push' failed" in o + e and "still in the local DVC cache" in o + e

    # the local side is untouched: workspace and cache match dvc.lock
    s3.start()
    assert dvc_json(ws, env, "status") == {}
    partial = s3.count(DATA_BUCKET, "dvc/")
    assert partial > left and dvc_json(ws, env, "status", "--cloud"), "expected a partial upload"
    # the failed flow run's state names the stage, as the Prefect UI shows it
    failed = httpx.post(f"{prefect_api}/flow_runs/filter",
                        json={"flow_runs": {"state": {"type": {"any_": ["FAILED"]}}}}).json()
    assert any("stage 'push' failed" in (r["state"]["message"] or "") for r in failed), failed

    # the rest goes up with parallel uploads again (one at a time was only for the interruption),
    # by a run after an edit of a profile that is not the active one: it re-runs nothing
    assert sh(ws, env, "dvc", "remote", "modify", "s3", "jobs", "4").returncode == 0
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["profiles"]["h800-cluster"]["tune"]["learning_rate"] = 2.0e-5
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    again = sh(ws, env, "medrega", "pipeline", "--profile", "short-answers")
    assert again.returncode == 0, out(again)
    assert stage_rows(again.stdout) == dict.fromkeys(STAGES, "up to date (skipped)"), out(again)
    assert dvc_json(ws, env, "status") == {}
    assert dvc_json(ws, env, "status", "--cloud") == {}  # everything the workspace needs is back
    assert s3.count(DATA_BUCKET, "dvc/") > partial


def test_fresh_clone_pulls_everything_and_repro_is_up_to_date(run, tmp_path):
    ws, env = run["ws"], run["env"]
    git = ["git", "-c", "user.email=t@example.org", "-c", "user.name=test"]
    assert sh(ws, env, *git, "add", "-A").returncode == 0
    commit = sh(ws, env, *git, "commit", "-q", "-m", "snapshot")
    assert commit.returncode == 0, out(commit)
    tracked = sh(ws, env, "git", "ls-files").stdout.split()
    assert {"dvc.lock", "data.dvc", "params.resolved.yaml"} <= set(tracked)
    assert not any(t.startswith(("artifacts/", "data/")) for t in tracked)  # outputs live in DVC

    clone = tmp_path / "clone"
    assert subprocess.run(["git", "clone", "-q", str(ws), str(clone)], capture_output=True).returncode == 0
    pull = sh(clone, env, "dvc", "pull")
    assert pull.returncode == 0, out(pull)
    assert (clone / "artifacts/tune/model").is_dir() and (clone / "data").is_dir()
    assert (clone / "artifacts/eval/metrics.json").is_file()
    repro = sh(clone, env, "dvc", "repro")
    assert repro.returncode == 0, out(repro)
    assert "Data and pipelines are up to date" in repro.stdout, repro.stdout
    assert dvc_json(clone, env, "status") == {}


def test_failing_validation_stops_the_flow_and_writes_nothing_downstream(tmp_path, prefect_api):
    ws = make_workspace(tmp_path / "ws")
    env = dict(isolated_env(ws), PREFECT_API_URL=prefect_api)
    assert sh(ws, env, "medrega", "generate").returncode == 0
    images = sorted((ws / "data/samed2d/images").glob("*.png"))
    victim = images[len(images) // 2]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated PNG

    result = sh(ws, env, "medrega", "pipeline")
    text = out(result)
    assert result.returncode == 3, text
    assert victim.name in text and "image decodes" in text and "stage 'validate' failed" in text
    assert not (ws / "artifacts/instructions").exists() and not (ws / "artifacts/align").exists()
    assert "Retry 1/2" not in text  # deterministic failures are not retried
    failure = json.loads((ws / ".medrega/failures/validate.json").read_text())
    assert failure["kind"] == "bad_input" and victim.name in failure["message"]
