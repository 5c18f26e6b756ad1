"""A real InternVL architecture through the whole pipeline, on CPU (issue 13).

A replica of InternVL-Chat-V1-2 (the paper's base: Llama LM, InternViT with qk-norm, pixel
shuffle v1) in its published remote-code layout is the `model.checkpoint` of the shipped profile
`replica-internvl-chat-v1-2`, and `dvc repro` (every stage's command) takes it through: import -> projector
alignment under DeepSpeed ZeRO-3 on two CPU ranks -> LoRA tuning under ZeRO-3 on two ranks ->
evaluation on two ranks -> register; then `medrega predict` and `medrega serve` answer with boxes,
and `medrega evaluate --model` scores models the pipeline did not train. `dvc repro` runs in a
clone laid out as after `make install`, from a shell where nothing is activated. Few steps: this proves the
path, not quality. The replica's output head can only choose whole grounded answers (its weights
are random; tests/internvl_replicas.answering_in_boxes), so every answer carries a box.
The other published layouts are proved by tests/test_import_checkpoint.py.
"""
from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from medrega import config as config_mod
from medrega.config import deep_merge
from medrega.grammar import parse_regions
from tests.conftest import BIN, isolated_env, make_workspace, plain_env, stages_run
from tests.internvl_replicas import LAYOUTS, answering_in_boxes, build_replica
from tests.servers import free_port, stop, wait_http

pytestmark = pytest.mark.slow

PROFILE = "replica-internvl-chat-v1-2"
REPLICA = "replicas/internvl-chat-v1-2"  # where the profile's model.checkpoint points
T2R = "Could you specify the corner points for a bounding box surrounding <ref>liver</ref>?"
# the shipped profile, cut down further: the region tasks only, answers of two tokens (two boxes)
LEAN = {"data": {"package_scans": False}, "materialize": {"tasks": ["caption", "r2t", "t2r"]},
        "evaluate": {"tasks": ["r2t", "t2r"], "max_new_tokens": 2},
        "register": {"gate": {"metrics": ["t2r.region_f1", "r2t.accuracy"]}}}  # gate figures must be evaluated


def env_for(ws: Path) -> dict[str, str]:
    # the workspace's copy of the code is what runs (dvc.yaml's scripts/medrega: with this interpreter)
    return {**isolated_env(ws), "PYTHONPATH": str(ws), "MEDREGA_PYTHON": sys.executable}


def medrega(ws: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "medrega"), *args], cwd=ws, env=env_for(ws), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    ws = make_workspace(tmp_path_factory.mktemp("replica") / "ws")
    build_replica(ws / REPLICA, answering_in_boxes(LAYOUTS["internvl-chat-v1-2"]))
    params = yaml.safe_load((ws / "params.yaml").read_text())
    assert params["profiles"][PROFILE]["model"]["checkpoint"] == REPLICA  # the shipped profile, as users get it
    params["profiles"][PROFILE] = deep_merge(params["profiles"][PROFILE], LEAN)
    params["profile"] = PROFILE  # what `dvc repro` resolves (its resolve stage reads the file alone)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    # `dvc repro` runs every stage's dvc.yaml command, as `medrega pipeline` does through Prefect
    # (tests/test_pipeline.py proves the flow; its server would only add start-up time here)
    generated = medrega(ws, "generate", "--profile", PROFILE)
    assert generated.returncode == 0, generated.stderr[-3000:]
    # as in a clone after `make install`, from a shell where nothing is activated: every stage's
    # command finds its interpreter itself (scripts/medrega)
    (ws / ".venv").symlink_to(BIN.parent)
    return ws, subprocess.run([str(ws / ".venv/bin/dvc"), "repro"], cwd=ws, env=plain_env(ws), capture_output=True,
                              text=True, timeout=2400)


def weights(folder: Path) -> dict:
    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(shard)).items()}


def test_every_stage_runs_on_the_imported_checkpoint_on_two_ranks(run):
    ws, result = run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert stages_run(result.stdout) == \
        ["resolve", "validate", "materialize", "align", "tune", "evaluate", "register"]
    art = ws / "artifacts"
    imported = json.loads((art / "align/base/medrega_import.json").read_text())
    assert imported["source"] == str((ws / REPLICA).resolve()) and imported["transpose_image"] is True

    # align: the recipe on two ranks under ZeRO-3; only the projector moved
    align = json.loads((art / "align/train_summary.json").read_text())
    assert (align["world_size"], align["zero_stage"], align["mode"]) == (2, 3, "projector")
    log = (art / "align/train.log").read_text()
    assert "--nproc-per-node=2" in log and "-m model.recipes.align --config" in log
    before, after = weights(art / "align/base"), weights(art / "align/model")
    assert before.keys() == after.keys()
    moved = {k for k in before if not (before[k] == after[k]).all()}
    assert moved and all(k.startswith("model.multi_modal_projector.") for k in moved), sorted(moved)

    tune = json.loads((art / "tune/train_summary.json").read_text())
    assert (tune["world_size"], tune["zero_stage"], tune["mode"]) == (2, 3, "lora")

    # evaluate: two ranks, every answer in the box grammar
    assert "--nproc-per-node=2" in (art / "eval/generate.log").read_text()
    answers = [json.loads(line) for line in (art / "eval/answers.jsonl").read_text().splitlines()]
    assert {a["task"] for a in answers} == {"r2t", "t2r"}
    assert all(parse_regions(a["prediction"]).regions for a in answers)
    metrics = json.loads((art / "eval/metrics.json").read_text())
    assert metrics["t2r"]["n"] > 0 and metrics["t2r"]["parse_failures"] == 0

    registered = json.loads((art / "register/registered.json").read_text())
    assert registered["uri"] == "models:/medrega@challenger"


def image_of(ws: Path) -> Path:
    return sorted((ws / "data/samed2d/images").glob("*.png"))[0]


def test_predict_and_serve_answer_with_boxes(run, tmp_path):
    ws, result = run
    assert result.returncode == 0
    from PIL import Image

    image = image_of(ws)
    width, height = Image.open(image).size
    out = medrega(ws, "predict", "--profile", PROFILE, "--model", "models:/medrega@challenger", "--image", str(image),
                  "--question", T2R, "--task", "t2r", "--out", str(tmp_path / "overlay.png"))
    assert out.returncode == 0, out.stderr[-3000:]
    answer, regions = out.stdout.strip().splitlines()[-2:]
    regions = json.loads(regions)
    assert "<box>" in answer and regions and all(r["name"] == "liver" for r in regions)
    assert all(0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height for x1, y1, x2, y2 in (r["box"] for r in regions))
    assert (tmp_path / "overlay.png").stat().st_size > 0

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as fh:
        server = subprocess.Popen([str(BIN / "medrega"), "serve", "--profile", PROFILE, "--model",
                                   "models:/medrega@challenger", "--port", str(port)], cwd=ws, env=env_for(ws),
                                  stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", server, 600, log)
        body = json.dumps({"dataframe_split": {"columns": ["image", "question", "task"], "data": [
            [base64.b64encode(image.read_bytes()).decode(), T2R, "t2r"]]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            served = json.loads(response.read())["predictions"][0]
        # the server and `medrega predict` load the same registered model the same way
        assert served["answer"] == answer and json.loads(served["regions"]) == regions
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)  # stops on SIGINT (raises if it does not)
    finally:
        stop(server)


def one_process_config(ws: Path) -> Path:
    """The profile resolved with generation in one process (no evaluate.launcher)."""
    cfg = config_mod.resolve(ws / "params.yaml", PROFILE).merged({"evaluate": {"launcher": None}})
    return config_mod.write_resolved(cfg, ws / "one-process.yaml")


def test_evaluate_models_the_pipeline_did_not_train(run):
    ws, result = run
    assert result.returncode == 0
    resolved = str(one_process_config(ws))
    pipeline_answers = (ws / "artifacts/eval/answers.jsonl").read_bytes()

    # the registered model, in one process: the pipeline's two-rank answers, byte for byte
    registered = medrega(ws, "evaluate", "--config", resolved, "--model", "models:/medrega@challenger")
    assert registered.returncode == 0, registered.stderr[-3000:]
    out = ws / "artifacts/eval-models/medrega@challenger"
    assert (out / "answers.jsonl").read_bytes() == pipeline_answers
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["figures"] and all(f["tuning_difference"] == 0 for f in comparison["figures"].values())

    # the released (here: replica) weights, never trained: imported, then scored on the same items
    released = medrega(ws, "evaluate", "--config", resolved, "--model", REPLICA)
    assert released.returncode == 0, released.stderr[-3000:]
    out = ws / "artifacts/eval-models" / REPLICA.replace("/", "_")
    assert json.loads((out / "weights/imported/medrega_import.json").read_text())["layout"] == "remote"
    base_answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in base_answers] == [json.loads(line)["id"] for line in pipeline_answers.decode().splitlines()]
    figures = json.loads((out / "comparison.json").read_text())["figures"]
    assert figures["t2r.mean_iou"]["tuning_difference"] == pytest.approx(
        figures["t2r.mean_iou"]["tuned"] - figures["t2r.mean_iou"]["model"])

    # logged to MLflow like any evaluation, naming the model
    probe = ("import mlflow, json; c = mlflow.MlflowClient('sqlite:///mlflow/mlflow.db');"
             "ids = [e.experiment_id for e in c.search_experiments()];"
             "runs = c.search_runs(ids, \"tags.`medrega.stage` = 'evaluate'\");"
             "print(json.dumps([[r.data.tags.get('medrega.model'), sorted(r.data.metrics)] for r in runs]))")
    runs = json.loads(subprocess.run([sys.executable, "-c", probe], cwd=ws, env=env_for(ws), capture_output=True,
                                     text=True, check=True).stdout.strip().splitlines()[-1])
    models = [model for model, metrics in runs if metrics]
    assert REPLICA in models and "models:/medrega@challenger" in models and None in models

    missing = medrega(ws, "evaluate", "--config", resolved, "--model", "models:/no-such-model@champion")
    assert missing.returncode == 3 and "no-such-model" in missing.stderr + missing.stdout
