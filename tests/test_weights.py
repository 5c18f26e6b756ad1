"""Weights by reference (`register.weights: reference`) against a DVC remote on moto's S3 server.

A tiny tuned checkpoint goes through a real DVC stage into dvc.lock and is pushed to the remote;
the registered version holds no weights, only where they are and their hashes. Loading it fetches
and verifies them through DVC and answers as the original does; a corrupted or a deleted object on
the remote is a clear error naming the file, through the pyfunc and through `medrega predict`.
"""
from __future__ import annotations

import base64
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from cli import app
from medrega import weights
from medrega.storage import S3Remote, configure_s3, dvc
from tests.servers import free_port

BUCKET = "medrega-dvc"
pytestmark = pytest.mark.slow  # about 35 s of CPU: a tiny model through DVC, S3 and MLflow


@pytest.fixture
def s3(monkeypatch, tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # credentials from the environment only, as on a serving host (no ~/.aws of this machine)
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                       "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}.items():
        monkeypatch.setenv(key, value)
    url = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=url)
    client.create_bucket(Bucket=BUCKET)
    try:
        yield SimpleNamespace(url=url, client=client)
    finally:
        server.stop()


def tuned_workspace(root: Path, s3) -> tuple[Path, Path, dict]:
    """A DVC workspace whose `tune` stage output (model/ + adapter/ + a log) is in dvc.lock."""
    from tests.test_registry import tiny_model

    ws = root / "ws"
    ws.mkdir()
    dvc("init", "--no-scm", "-q", cwd=ws)
    configure_s3(S3Remote(bucket=BUCKET, prefix="dvc", endpoint=s3.url), cwd=ws)  # region: from the env
    merged, _, adapter, params = tiny_model(root)
    tune = ws / "artifacts" / "tune"
    shutil.copytree(merged, tune / "model")
    shutil.copytree(adapter, tune / "adapter")
    (tune / "train.log").write_text("not part of the model\n")
    (ws / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"tune": {
        "cmd": "true", "outs": [{"artifacts/tune": {"persist": True}}]}}}))
    dvc("repro", "-q", "tune", cwd=ws)
    params = params.merged({"register": {"weights": "reference"}})
    (ws / "params.yaml").write_text(yaml.safe_dump(params.as_dict(), allow_unicode=True))
    return ws, merged, params


def test_weights_by_reference_load_verified_and_refuse_a_different_model(s3, tmp_path, monkeypatch):
    import mlflow

    from model.pyfunc import MedRegAModel
    from tasks.register import register
    from tests.test_registry import eval_dir

    ws, merged, params = tuned_workspace(tmp_path, s3)
    monkeypatch.chdir(ws)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    evaluation = eval_dir(tmp_path, "eval", 0.3, 0.5)

    # not on the remote yet: nothing is registered that could not load
    with pytest.raises(weights.WeightsError, match=r"not found at .*: push the tuned checkpoint first"):
        register(ws / "artifacts/tune/model", evaluation, tmp_path / "r0", params)
    dvc("push", "-q", "tune", cwd=ws)
    result = register(ws / "artifacts/tune/model", evaluation, tmp_path / "r1", params)
    lock_md5 = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["tune"]["outs"][0]["md5"]
    assert result["checkpoint"] == {"remote": f"s3://{BUCKET}/dvc", "md5": lock_md5}
    tags = mlflow.MlflowClient().get_model_version("medrega", result["version"]).tags
    assert tags["weights"] == "reference" and tags["dvc.checkpoint"] == lock_md5

    # the MLflow model holds the record, not a second copy of the weights
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/medrega/{result['version']}"))
    shipped = {p.name for p in model_dir.rglob("*") if p.is_file()}
    assert "weights_ref.json" in shipped and not any(n.endswith(".safetensors") for n in shipped), shipped
    reference = yaml.safe_load((model_dir / "artifacts" / "weights_ref.json").read_text())
    assert set(reference["files"]) == {f"{d}/{p.relative_to(ws / 'artifacts/tune' / d)}"
                                       for d in ("model", "adapter") for p in (ws / "artifacts/tune" / d).rglob("*")
                                       if p.is_file()}  # train.log is not part of the model
    assert "testing" not in (model_dir / "artifacts" / "weights_ref.json").read_text()  # no credential

    # loaded through DVC: the same bytes as the tuned checkpoint, the same answers as the original
    scan = tmp_path / "scan.png"
    Image.fromarray((np.random.default_rng(0).random((64, 48)) * 255).astype(np.uint8)).save(scan)
    question = pd.DataFrame({"image": [base64.b64encode(scan.read_bytes()).decode()],
                             "question": ["Where is the <ref>liver</ref>?"], "task": ["t2r"]})
    uri = f"models:/medrega/{result['version']}"
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache-1"))
    answer = mlflow.pyfunc.load_model(uri).predict(question)
    fetched = tmp_path / "cache-1" / lock_md5.removesuffix(".dir") / "model"
    assert {p.name: weights.md5_file(p) for p in fetched.iterdir()} == \
        {p.name: weights.md5_file(p) for p in merged.iterdir()}
    original = MedRegAModel()
    original.load_context(SimpleNamespace(artifacts={"model": str(merged),
                                                     "base_prompts": str(model_dir / "artifacts" / "base_prompts.json")}))
    pd.testing.assert_frame_equal(answer, original.predict(None, question))

    # an object replaced on the remote: refused, naming the file, never a different model
    objects = {rel: f"dvc/files/md5/{h[:2]}/{h[2:]}" for rel, h in reference["files"].items()}
    good = s3.client.get_object(Bucket=BUCKET, Key=objects["model/config.json"])["Body"].read()
    s3.client.put_object(Bucket=BUCKET, Key=objects["model/config.json"], Body=good.replace(b"}", b', "x": 1}', 1))
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache-2"))
    with pytest.raises(weights.WeightsError, match=r"weight file model/config\.json: the object at .* has md5 \w+, "
                                                   r"the version records " + reference["files"]["model/config.json"]):
        mlflow.pyfunc.load_model(uri)
    assert not (tmp_path / "cache-2" / lock_md5.removesuffix(".dir") / "model" / "config.json").exists()
    s3.client.put_object(Bucket=BUCKET, Key=objects["model/config.json"], Body=good)

    # an object deleted from the remote: `medrega predict` (in this process: the same command, without
    # a second interpreter importing torch) exits 3 (bad input, never retried) naming it
    s3.client.delete_object(Bucket=BUCKET, Key=objects["model/model.safetensors"])
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache-3"))
    pred = CliRunner().invoke(app, ["predict", "--model", uri, "--image", str(scan),
                                    "--question", "Where is the <ref>liver</ref>?"])
    assert pred.exit_code == 3, pred.output
    assert "weight file model/model.safetensors (md5 " in pred.stderr and f"not found at s3://{BUCKET}/" in pred.stderr

    # a remote that does not answer is Transient (exit 75, worth a retry), not a missing object
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(weights.RemoteUnavailable, match="cannot reach"):
        weights.fetch(reference, tmp_path / "cache-4")
