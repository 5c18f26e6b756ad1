"""The workspace run lock: a second holder waits (saying who holds it), gives up after the
timeout with a clear message, and a dead holder never leaves a stale lock."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medrega import runlock

HOLD = """
import sys, time
from pathlib import Path
from medrega import runlock
with runlock.run_lock(Path(sys.argv[1]), what="holder under test", timeout=0):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(path: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_waits_then_gets_the_lock(tmp_path: Path):
    lock = tmp_path / ".medrega" / "run.lock"
    holder = _hold(lock, 2.0)
    assert runlock.is_held(lock)
    info = runlock.holder(lock)
    assert info["pid"] == holder.pid and info["what"] == "holder under test" and info["host"]
    messages: list[str] = []
    start = time.monotonic()
    with runlock.run_lock(lock, timeout=60, on_wait=messages.append, poll=0.1) as mine:
        waited = time.monotonic() - start
        assert mine["pid"] == os.getpid()
        assert runlock.holder(lock)["pid"] == os.getpid()
    holder.wait(10)
    assert waited > 0.5
    assert len(messages) == 1 and f"pid {holder.pid}" in messages[0] and "waiting" in messages[0]
    assert not runlock.is_held(lock)


def test_gives_up_after_timeout_naming_the_holder(tmp_path: Path):
    lock = tmp_path / "run.lock"
    holder = _hold(lock, 30)
    try:
        with pytest.raises(runlock.LockBusy) as err:
            with runlock.run_lock(lock, timeout=0.5, poll=0.1):
                pass
        assert f"pid {holder.pid}" in str(err.value) and "holder under test" in str(err.value)
        assert runlock.TIMEOUT_ENV in str(err.value)
    finally:
        holder.kill()
        holder.wait(10)


def test_killed_holder_leaves_no_stale_lock(tmp_path: Path):
    lock = tmp_path / "run.lock"
    holder = _hold(lock, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    assert not runlock.is_held(lock)
    with runlock.run_lock(lock, timeout=0):  # no waiting: the kernel dropped the dead holder's lock
        pass
