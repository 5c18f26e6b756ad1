"""One pipeline run per workspace at a time.

DVC takes a repo-wide lock of its own, but only for the length of one command: two pipeline
runs started together would interleave their `dvc repro`/`dvc add`/`dvc push` calls (one of
them failing on DVC's lock halfway, or both training into the same persisted checkpoint
folders) and nest their MLflow runs under each other. So the whole run holds this lock.

Choice: the second run WAITS (it logs who holds the lock, then blocks) up to a timeout, and
only then refuses. A nightly run that overlaps a manual one then simply runs after it and finds
most stages up to date. `MEDREGA_LOCK_TIMEOUT` (seconds, default 6 h; 0 = refuse at once).

`fcntl.flock` is used rather than "create the file if absent": the kernel drops the lock when
the holder dies (kill -9, OOM), so there is never a stale lock to clean up by hand. The file's
content (pid, host, start time, what runs) is only there to tell people who holds it.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from medrega.errors import Transient

LOCK_FILE = Path(".medrega/run.lock")
TIMEOUT_ENV = "MEDREGA_LOCK_TIMEOUT"
DEFAULT_TIMEOUT = 6 * 3600.0


class LockBusy(Transient):
    """Another run held the workspace lock for longer than we were willing to wait."""


def holder(path: Path = LOCK_FILE) -> dict | None:
    """Who holds (or last held) the lock, as written by that run; None if nobody ever did."""
    try:
        text = path.read_text(encoding="utf-8").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def describe(info: dict | None) -> str:
    if not info:
        return "another run (holder unknown)"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} ({info.get('what', 'a run')})"


def is_held(path: Path = LOCK_FILE) -> bool:
    """True when some process holds the lock right now (probes with a non-blocking flock)."""
    if not path.exists():
        return False
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


@contextmanager
def run_lock(path: Path = LOCK_FILE, what: str = "medrega pipeline", timeout: float | None = None,
             on_wait: Callable[[str], None] | None = None, poll: float = 1.0) -> Iterator[dict]:
    """Hold the workspace's run lock for the body; wait for it (telling `on_wait` once), or raise
    LockBusy after `timeout` seconds."""
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    path.parent.mkdir(parents=True, exist_ok=True)
    # "a+" so opening never truncates what the current holder wrote
    fh = path.open("a+", encoding="utf-8")
    try:
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                current = describe(holder(path))
                if time.monotonic() >= deadline:
                    raise LockBusy(f"workspace {Path.cwd()} is locked by {current}; gave up after {timeout:g} s "
                                   f"(lock file {path}; set {TIMEOUT_ENV} to wait longer)") from None
                if not told and on_wait:
                    on_wait(f"waiting for the workspace run lock held by {current} (lock file {path})")
                    told = True
                time.sleep(poll)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "what": what}
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(info))
        fh.flush()
        try:
            yield info
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()
