"""`make ui`, as an operator runs it, on loopback: the Prefect and MLflow UIs over the stores it
is pointed at, and Ctrl-C stopping both."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest

from tests.conftest import REPO, isolated_env
from tests.servers import free_port, wait_http

pytestmark = pytest.mark.slow


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
