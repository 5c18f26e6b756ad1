"""materialize at scale: shards, worker-count determinism, resume after a kill, streaming."""
import itertools
import types
import sys
import subprocess
from pathlib import Path

import pytest

import tasks.materialize as mat
from medrega import shards
from tests.conftest import tiny
from medrega.sources import synthetic
from tests.servers import free_port, stop

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale") / "samed2d"
    synthetic.generate(root, patients_per_modality=2, slices_per_patient=2, image_size=64, seed=0)
    return root


def _params(workers: int, shard_size: int = 3, **more):
    return tiny({"materialize": {"test_share": 0.5, "workers": workers, "shard_size": shard_size, **more}})


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_same_bytes_for_any_worker_count(data_root, tmp_path):
    out = tmp_path / "instructions"  # same path both times: meta files carry absolute paths
    one = mat.materialize(data_root, out, _params(workers=1))
    first = _snapshot(out)
    two = mat.materialize(data_root, out, _params(workers=2))
    assert one == two and one["shards"] > 2
    assert _snapshot(out) == first
    assert any(name.endswith("-00002.jsonl") for name in first)
    assert not list(tmp_path.glob(".instructions.*"))  # the work directory went into place


def test_resume_keeps_finished_shards_and_redoes_the_rest(data_root, tmp_path, monkeypatch):
    out = tmp_path / "instructions"
    params = _params(workers=1, shard_size=3)
    reference = tmp_path / "reference"
    mat.materialize(data_root, reference, params)
    want = {k: v.replace(str(reference).encode(), str(out).encode()) for k, v in _snapshot(reference).items()}

    real = mat.builders.build_records
    calls = {"n": 0, "limit": 7}  # shards 0 and 1 finish (6 images), shard 2 dies on its 2nd image

    def counting(*a, **k):
        calls["n"] += 1
        if calls["n"] > calls["limit"]:
            raise KeyboardInterrupt("simulated kill")  # not an Exception: like a SIGINT mid-shard
        return real(*a, **k)

    monkeypatch.setattr(mat.builders, "build_records", counting)
    with pytest.raises(KeyboardInterrupt):
        mat.materialize(data_root, out, params)
    work = tmp_path / ".instructions.partial"
    assert not out.exists()
    assert sorted(p.name for p in (work / shards.SHARDS_DIR).iterdir()) == ["00000.json", "00001.json"]
    # A kill between a shard's data files and its manifest: a stale file the re-run must replace.
    (work / "r2t_en_train-00002.jsonl").write_text("half a line", encoding="utf-8")
    kept = {p.name: p.stat().st_mtime_ns for p in work.glob("*-0000[01].jsonl")}
    assert kept

    calls.update(n=0, limit=10**9)
    summary = mat.materialize(data_root, out, params)
    n_images = sum(summary["images"].values())
    assert calls["n"] == n_images - 6  # the two finished shards were not rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*-0000[01].jsonl")} == kept
    assert _snapshot(out) == want  # and the result is what an uninterrupted run writes
    assert not work.exists()


def test_changed_params_discard_the_work_directory(data_root, tmp_path, monkeypatch):
    out = tmp_path / "instructions"
    params = _params(workers=1, shard_size=3)
    real = mat.builders.build_records
    calls = {"n": 0, "limit": 4}  # shard 0 finishes, shard 1 dies

    def counting(*a, **k):
        calls["n"] += 1
        if calls["n"] > calls["limit"]:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(mat.builders, "build_records", counting)
    with pytest.raises(RuntimeError):
        mat.materialize(data_root, out, params)
    stale = tmp_path / ".instructions.partial" / "stale-00000.jsonl"
    stale.write_text("{}\n")
    calls.update(n=0, limit=10**9)
    params = params.merged({"materialize": {"seed": 1}})  # other records: nothing from the old run may be reused
    summary = mat.materialize(data_root, out, params)
    assert calls["n"] == sum(summary["images"].values())  # shard 0 rebuilt too
    assert not (out / "stale-00000.jsonl").exists()


def test_drive_streams_a_source_it_could_not_hold(tmp_path):
    """The shard runner pulls items only as shards drain: a source far larger than what may be
    held raises the moment more than (window + 1) shards of it are outstanding."""
    size, window, total = 50, 2, 20_000
    state = {"pulled": 0, "taken": 0}

    def source():
        for i in itertools.count():
            if i == total:
                return
            if state["pulled"] - state["taken"] > (window + 1) * size:
                raise MemoryError("source materialised beyond the shard window")
            state["pulled"] += 1
            yield types.SimpleNamespace(rel_image=f"images/{i}.png")

    def submit(fn, k, chunk):  # record the shard instead of building it
        return shards._Ready({"shard": k, "n": len(chunk)})

    def take(man):
        state["taken"] += man["n"]

    bar = types.SimpleNamespace(update=lambda n: None)
    shards._drive(source(), size, tmp_path, None, (), submit, window, take, bar)
    assert state["taken"] == state["pulled"] == total
    assert len(list((tmp_path / shards.SHARDS_DIR).glob("*.json"))) == total // size  # every shard recorded


def test_dask_task_runner_on_a_cluster_of_separate_processes(data_root, tmp_path):
    """dask_address: the same shards on a real Dask cluster (a `dask scheduler` and two `dask
    worker` processes on loopback, as an operator starts them), the same bytes as locally."""
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("prefect_dask")
    out = tmp_path / "instructions"
    mat.materialize(data_root, out, _params(workers=1))
    local = _snapshot(out)

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).with_name("dask"))
    logs = [(tmp_path / f"dask-{i}.log").open("w") for i in range(3)]
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True)]
    procs += [subprocess.Popen([dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                                "--name", f"w{i}"], stdout=logs[i], stderr=subprocess.STDOUT, start_new_session=True)
              for i in (1, 2)]
    try:
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            assert len(client.scheduler_info()["workers"]) == 2
            mat.materialize(data_root, out, _params(workers=2, dask_address=address))
            # the shards ran in the worker processes (32 images in shards of 3: 11 shard tasks)
            executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
            assert sum(executed.values()) >= 11, executed
    finally:
        for proc in procs:
            stop(proc)
        for log in logs:
            log.close()
    assert _snapshot(out) == local