"""Model registry: promotion rules, input checks, and the whole story against real servers.

The integration test starts a real `mlflow server` (SQLite backend, artifacts proxied to an S3
bucket on moto's ThreadedMotoServer), registers tiny models built here, promotes, refuses,
overrides and rolls back, then serves the champion with `mlflow models serve` over HTTP.
"""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from medrega.registry import Evidence, compare, measured_tags, version_evidence, version_metrics
from model.pyfunc import BadInput, decode_image
from tests.servers import FaultyProxy, free_port, stop, wait_http

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GATES = ["t2r.region_f1", "t2r.en.region_f1", "r2t.accuracy", "grounded.align_f1"]
# what evaluate records in breakdown.json's `measured_on`, as registration tags it
MEASURED = {"protocol": "medrega", "iou_threshold": 0.5, "name_match": "strict", "max_new_tokens": 128,
            "tasks": {"t2r": {"n": 40, "items": "a" * 64}, "r2t": {"n": 40, "items": "b" * 64}}}


def evidence(figures: dict, measured: dict | None = MEASURED) -> Evidence:
    return version_evidence({**{f"metric.{k}": str(v) for k, v in figures.items()},
                             **(measured_tags(measured) if measured else {})})


def remeasured(**changes) -> dict:
    """MEASURED with settings or per-task records changed (`r2t={"n": 4}`)."""
    out = {**MEASURED, "tasks": {t: dict(m) for t, m in MEASURED["tasks"].items()}}
    for key, value in changes.items():
        if isinstance(value, dict):
            out["tasks"][key].update(value)
        else:
            out[key] = value
    return out


# -- the promotion rule ----------------------------------------------------------------------

def test_first_version_becomes_champion():
    decision = compare(evidence({"t2r.region_f1": 0.1}), None, GATES, 0.01)
    assert decision.promote and "first version" in decision.reason


def test_promotes_within_tolerance_and_ignores_unmeasured():
    old = evidence({"t2r.region_f1": 0.30, "t2r.en.region_f1": 0.30, "r2t.accuracy": 0.5})
    new = evidence({"t2r.region_f1": 0.295, "t2r.en.region_f1": 0.40, "r2t.accuracy": 0.6})
    decision = compare(new, old, GATES, 0.01)
    assert decision.promote, decision.reason
    status = {r.metric: r.status for r in decision.rows}
    assert status == {"t2r.region_f1": "ok", "t2r.en.region_f1": "ok", "r2t.accuracy": "ok",
                      "grounded.align_f1": "not measured"}


def test_refuses_any_regressed_or_missing_gate():
    old = evidence({"t2r.region_f1": 0.30, "t2r.en.region_f1": 0.30, "r2t.accuracy": 0.5})
    new = evidence({"t2r.region_f1": 0.50, "t2r.en.region_f1": 0.20})
    decision = compare(new, old, GATES, 0.01)
    assert not decision.promote and decision.comparable
    assert decision.regressed == ["t2r.en.region_f1", "r2t.accuracy"]


def test_figures_on_other_sample_counts_are_not_comparable():
    # the finding: a 20-sample accuracy of 0.95 was refused against a 4-sample 1.0
    old = evidence({"r2t.accuracy": 1.0, "t2r.region_f1": 0.3}, remeasured(r2t={"n": 4, "items": "c" * 64}))
    new = evidence({"r2t.accuracy": 0.95, "t2r.region_f1": 0.3}, remeasured(r2t={"n": 20}))
    decision = compare(new, old, ["r2t.accuracy", "t2r.region_f1"], 0.01)
    assert not decision.promote and not decision.comparable
    rows = {r.metric: r for r in decision.rows}
    assert rows["r2t.accuracy"].status == "not comparable" and "r2t.n 20 vs 4" in rows["r2t.accuracy"].note
    assert "r2t.items differ" in rows["r2t.accuracy"].note
    assert rows["t2r.region_f1"].status == "ok"  # the t2r figures were measured alike
    assert decision.reason.startswith("not comparable: r2t figures measured differently")
    assert "regressed" not in decision.reason  # 0.95 vs 1.0 is not read as a regression


@pytest.mark.parametrize("changed, words", [
    (remeasured(iou_threshold=0.75), "iou_threshold 0.75 vs 0.5"),
    (remeasured(name_match="lenient"), "name_match lenient vs strict"),
    (remeasured(protocol="release"), "protocol release vs medrega"),
    (remeasured(t2r={"items": "d" * 64}), "t2r.items differ"),
    (None, "the challenger does not record"),
])
def test_any_difference_in_how_figures_were_measured_is_named(changed, words):
    decision = compare(evidence({"t2r.region_f1": 0.5}, changed), evidence({"t2r.region_f1": 0.3}),
                       ["t2r.region_f1"], 0.01)
    assert not decision.promote and decision.rows[0].status == "not comparable"
    assert words in decision.reason


def test_measured_on_hashes_test_items_by_content_not_place(tmp_path):
    from medrega.config import EvaluateConfig
    from tasks.evaluate import measured_on

    def items(root: Path, pixels: bytes = b"\x89PNG one") -> list[dict]:
        root.mkdir(exist_ok=True)
        (root / "a.png").write_bytes(pixels)
        return [{"id": "a-r2t", "task": "r2t", "question": "What is <box>[[1, 2, 3, 4]]</box>?",
                 "ground_truth": "liver", "image": str(root / "a.png"), "width": 8, "height": 8, "lang": "en"}]

    cfg = EvaluateConfig()
    here = measured_on(items(tmp_path / "here"), cfg)
    assert here["tasks"]["r2t"]["n"] == 1 and here["iou_threshold"] == 0.5 and here["protocol"] == "medrega"
    assert measured_on(items(tmp_path / "moved"), cfg) == here  # the same split on another machine
    assert measured_on(items(tmp_path / "other", b"\x89PNG two"), cfg)["tasks"]["r2t"]["items"] != \
        here["tasks"]["r2t"]["items"]  # same text, other pixels: another test set


def test_version_metrics_reads_tags():
    tags = {"metric.t2r.region_f1": "0.25", "metric.t2r.n": "40", "git_commit": "abc", "metric.bad": "x"}
    assert version_metrics(tags) == {"t2r.region_f1": 0.25, "t2r.n": 40.0}


# -- input checks of the served model ---------------------------------------------------------

def _png(width: int = 32, height: int = 32) -> str:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("value, words", [
    ("", "missing"),
    (None, "missing"),
    ("not base64 at all!", "base64"),
    (base64.b64encode(b"just some text, not an image").decode(), "not a readable image"),
    (_png(8000, 6000), "more than"),  # a 48 Mpx header in a few kB: refused before decoding
])
def test_bad_images_are_invalid_parameter_errors(value, words):
    with pytest.raises(BadInput) as info:
        decode_image(value)
    assert words in info.value.message
    assert info.value.get_http_status_code() == 400


def test_good_image_decodes_also_as_data_url():
    assert decode_image("data:image/png;base64," + _png(20, 10)).size == (20, 10)


def test_dicom_is_read_without_identifiers(tmp_path):
    from pydicom.data import get_testdata_file

    from medrega.scans import read_scan

    path = Path(get_testdata_file("CT_small.dcm", download=False))
    image = read_scan(path)
    assert image.mode == "RGB" and image.size == (128, 128)
    assert np.asarray(image).std() > 0


# -- real servers ---------------------------------------------------------------------------------



# One S3 server and one MLflow server for the module (starting `mlflow server` is the slow part);
# each test registers its own model name.
@pytest.fixture(scope="module")
def s3():
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"]).create_bucket(Bucket="mlflow")
        try:
            yield env
        finally:
            server.stop()


@pytest.fixture(scope="module")
def mlflow_server(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = root / "mlflow-server.log"
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'registry.db'}",
           "--artifacts-destination", "s3://mlflow/artifacts", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ),
                                start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", proc, 120, log)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", uri)
            yield uri
    finally:
        stop(proc)


def tiny_model(root: Path) -> tuple[Path, Path, Path, dict]:
    """A random tiny InternVL saved as a merged checkpoint, and as base + LoRA adapter."""
    from peft import LoraConfig, get_peft_model

    from model.presets import build_model
    from model.processor import MedRegAProcessor, ProcessorConfig
    from model.tokenizer import train_tokenizer
    from tests.conftest import tiny

    params = tiny({"model": {"vision_layers": 1, "text_layers": 1, "text_intermediate_size": 128, "max_length": 256}})
    cfg = params.model
    texts = ["Where is the <ref>liver</ref>? <ref>liver</ref><box>[[1, 2, 3, 4]]</box> 0123456789"] * 20
    tok = train_tokenizer(texts, 400, 1)
    processor = MedRegAProcessor(tok, ProcessorConfig(image_size=cfg.image_size, num_image_tokens=cfg.num_image_tokens,
                                                      max_length=cfg.max_length))
    model = build_model(cfg, tok)
    merged, base, adapter = root / "merged", root / "base", root / "adapter"
    for out in (merged, base):
        model.save_pretrained(str(out))
        processor.save_pretrained(out)
    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(str(adapter))
    processor.save_pretrained(adapter)
    return merged, base, adapter, params


def eval_dir(root: Path, name: str, region_f1: float, accuracy: float, measured: dict = MEASURED) -> Path:
    out = root / name
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"t2r": {"region_f1": region_f1, "acc@0.5": 0.1, "n": 4},
                                                  "r2t": {"accuracy": accuracy, "n": 4}}))
    (out / "breakdown.json").write_text(json.dumps({
        "t2r": {"by": {"by_lang": {"en": {"region_f1": region_f1}, "zh": {"region_f1": region_f1}}}},
        "r2t": {"by": {"by_lang": {"en": {"accuracy": accuracy}, "zh": {"accuracy": accuracy}}}},
        "measured_on": measured}))
    return out


def cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFECT_HOME=str(cwd / ".prefect"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    return subprocess.run([str(BIN / "medrega"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_register_promote_rollback_and_serve(mlflow_server, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    from medrega import registry
    from tasks.register import register

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    merged, base, adapter, params = tiny_model(tmp_path)
    params = params.merged({"register": {"gate": {"tolerance": 0.01, "metrics": GATES}}})
    (work / "params.yaml").write_text(yaml.safe_dump(params.as_dict(), allow_unicode=True))
    (work / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "validate": {"deps": [{"path": str(params.data.root), "md5": "datahash.dir"}]},
        "tune": {"outs": [{"path": str(params.tune.out), "md5": "ckpthash.dir"}]}}}))
    scan = tmp_path / "scan.png"
    Image.fromarray((np.random.default_rng(0).random((64, 48)) * 255).astype(np.uint8)).save(scan)
    monkeypatch.setenv("MEDREGA_FLOW_RUN_ID", "flow-run-1")

    # registration: v1 good, v2 worse on a gate, v3 (base + adapter) as good as v1
    v1 = register(merged, eval_dir(tmp_path, "e1", 0.30, 0.50), tmp_path / "r1", params, example_image=scan)
    v2 = register(merged, eval_dir(tmp_path, "e2", 0.10, 0.50), tmp_path / "r2", params, example_image=scan)
    client = mlflow.MlflowClient()
    mv = client.get_model_version("medrega", v1["version"])
    assert mv.tags["dvc.dataset"] == "datahash.dir" and mv.tags["dvc.checkpoint"] == "ckpthash.dir"
    assert mv.tags["prefect_flow_run_id"] == "flow-run-1" and "git_commit" in mv.tags
    assert mv.tags["metric.t2r.en.region_f1"] == "0.3" and mv.tags["measured.t2r.n"] == "40"
    # a curated set of tags; every figure (acc@0.5 is neither a gate nor a headline) in registration.json
    assert "metric.t2r.acc_at_0.5" not in mv.tags and len(mv.tags) < 40, sorted(mv.tags)
    record = mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/registration.json")
    assert record["metrics"]["t2r.acc@0.5"] == 0.1 and record["measured_on"] == MEASURED
    assert "## Known limits" in mv.description and "| region_f1 |" in mv.description
    assert client.get_run(mv.run_id).data.params["tune.mode"] == params.tune.mode
    assert client.get_model_version_by_alias("medrega", "challenger").version == v2["version"]

    # promotion through the CLI and the Prefect flow: no champion yet, so the challenger (v2) wins
    first = cli("promote", cwd=work)
    assert first.returncode == 0, first.stderr[-3000:]
    assert client.get_model_version_by_alias("medrega", "champion").version == v2["version"]
    # v1 against champion v2: better, promoted; its figures are tags on the version
    up = registry.promote(client, "medrega", GATES, 0.01, version=v1["version"])
    assert up["decision"] == "promoted" and up["previous_champion"] == v2["version"]
    rows = {r["metric"]: r for r in json.loads(client.get_model_version("medrega", v1["version"]).tags["promotion.rows"])}
    assert rows["t2r.region_f1"]["champion"] == 0.1 and rows["t2r.region_f1"]["challenger"] == 0.3
    # v2 against champion v1: refused, champion unchanged, the refusal recorded
    down = registry.promote(client, "medrega", GATES, 0.01, version=v2["version"])
    assert down["decision"] == "refused" and "t2r.region_f1" in down["reason"]
    assert client.get_model_version_by_alias("medrega", "champion").version == v1["version"]
    rows = {r["metric"]: r for r in json.loads(client.get_model_version("medrega", v2["version"]).tags["promotion.rows"])}
    assert rows["t2r.region_f1"]["status"] == "regressed"
    # override needs a reason, which is recorded
    with pytest.raises(registry.PromotionError):
        registry.promote(client, "medrega", GATES, 0.01, version=v2["version"], override_reason=" ")
    forced = registry.promote(client, "medrega", GATES, 0.01, version=v2["version"], override_reason="hotfix for parser")
    assert forced["decision"] == "override"
    assert client.get_model_version("medrega", v2["version"]).tags["promotion.override_reason"] == "hotfix for parser"
    # rolling back is one command
    back = cli("rollback", "--reason", "bad override", cwd=work)
    assert back.returncode == 0, back.stderr[-3000:]
    assert client.get_model_version_by_alias("medrega", "champion").version == v1["version"]

    # a user loads the champion without this repo's training code and asks it a question
    model = mlflow.pyfunc.load_model("models:/medrega@champion")
    image = base64.b64encode(scan.read_bytes()).decode()
    out = model.predict(pd.DataFrame({"image": [image], "question": ["Where is the <ref>liver</ref>?"], "task": ["t2r"]}))
    assert list(out.columns) == ["answer", "regions"] and isinstance(json.loads(out["regions"][0]), list)

    # base + adapter layout loads and answers too
    params = params.merged({"register": {"weights": "adapter"}})
    v3 = register(merged, eval_dir(tmp_path, "e3", 0.30, 0.50), tmp_path / "r3", params,
                  adapter_dir=adapter, base_dir=base)
    assert v3["weights"] == "adapter"
    answer = mlflow.pyfunc.load_model(f"models:/medrega/{v3['version']}").predict(
        pd.DataFrame({"image": [image], "question": ["What is this?"]}))
    assert isinstance(answer["answer"][0], str)

    # `medrega predict` on a DICOM file: answer printed, overlay written, no identifier printed
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    dicom = get_testdata_file("CT_small.dcm", download=False)
    overlay = work / "overlay.png"
    pred = cli("predict", "--image", dicom, "--question", "Where is the <ref>liver</ref>?", "--out", str(overlay), cwd=work)
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert Image.open(overlay).size == (256, 256)
    name = str(dcmread(dicom).PatientName)
    assert name and name not in pred.stdout + pred.stderr

    # serving over HTTP: answers good requests, 400 with a message for bad ones, never crashes
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as fh:
        # `medrega serve`: the champion from the registry, behind our own hardened server
        server = subprocess.Popen([str(BIN / "medrega"), "serve", "--port", str(port)], cwd=work,
                                  stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ))
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", server, 180, log)

        def post(records) -> tuple[int, dict]:
            body = json.dumps({"dataframe_records": records}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read() or b"{}")

        status, body = post([{"image": image, "question": "Where is the <ref>liver</ref>?", "task": "t2r"}])
        assert status == 200, body
        assert set(body["predictions"][0]) == {"answer", "regions"}
        for record, words in [
            ({"image": base64.b64encode(b"%PDF-1.4").decode(), "question": "q"}, "not a readable image"),
            ({"image": _png(9000, 9000), "question": "q"}, "more than"),
            ({"image": image, "question": ""}, "question"),
            ({"question": "q"}, "image"),
        ]:
            status, body = post([record])
            assert status == 400, (record.keys(), status, body)
            assert words in body.get("message", ""), body
        assert server.poll() is None  # still up after the bad requests
        status, _ = post([{"image": image, "question": "Where?"}])
        assert status == 200
    finally:
        stop(server)


@pytest.mark.slow  # a real MLflow server and `medrega promote` (Prefect's ephemeral server): about a minute
def test_a_registry_that_errors_fails_the_promotion_and_champion_stays(mlflow_server, tmp_path, monkeypatch):
    """A registry that fails to answer must never read as "no such alias" (no champion yet: the
    challenger would win outright): the promotion fails as Transient (exit 75)."""
    import mlflow

    from medrega import registry
    from tests.conftest import tiny

    name = "medrega-faulty-registry"  # the module's server is shared: a model of this test's own
    client = mlflow.MlflowClient(mlflow_server)
    client.create_registered_model(name)
    versions = [client.create_model_version(name, f"s3://mlflow/artifacts/v{n}", tags={
        **{f"metric.{gate}": str(f1) for gate in GATES[:3]}, **measured_tags(MEASURED)}).version  # t2r, r2t
                for n, f1 in ((1, 0.3), (2, 0.5))]
    client.set_registered_model_alias(name, "champion", versions[0])
    client.set_registered_model_alias(name, "challenger", versions[1])
    # the champion's alias lookup fails; everything else (the challenger's lookup first) is answered
    proxy = FaultyProxy(mlflow_server, lambda method, path: "registered-models/alias" in path
                        and "alias=champion" in path)
    for key, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_TRACKING_URI": proxy.url}.items():
        monkeypatch.setenv(key, value)  # MLflow's own retries bounded: the failure shows at once
    work = tmp_path / "work"
    work.mkdir()
    params = tiny({"register": {"model_name": name, "gate": {"metrics": GATES}}})
    (work / "params.yaml").write_text(yaml.safe_dump(params.as_dict()))
    try:
        for mode in ("drop", "503"):
            proxy.mode = mode
            with pytest.raises(registry.RegistryUnavailable, match="cannot read alias 'champion'"):
                registry.promote(mlflow.MlflowClient(proxy.url), name, GATES, 0.01)
        promoted = cli("promote", cwd=work)
        assert promoted.returncode == 75, promoted.stdout[-2000:] + promoted.stderr[-3000:]
        assert "cannot read alias 'champion'" in promoted.stderr
        assert client.get_model_version_by_alias(name, "champion").version == versions[0]
        assert "promotion.decision" not in client.get_model_version(name, versions[1]).tags
        # the same promotion through a registry that answers: the better challenger wins
        proxy.mode = None
        assert registry.promote(mlflow.MlflowClient(proxy.url), name, GATES, 0.01)["decision"] == "promoted"
        assert client.get_model_version_by_alias(name, "champion").version == versions[1]
    finally:
        proxy.close()
