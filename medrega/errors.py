"""What kind of failure this is decides what happens next: exit code, retry, message.

- `BadInput`: the input or configuration is wrong. Deterministic: retrying cannot help, so the
  flow never retries it. Exit code 3. The message names the file, the record and the rule.
- `Transient`: something outside us is unavailable right now (a registry, a remote, a lock).
  Retrying later can help. Exit code 75 (EX_TEMPFAIL).
- anything else is a bug: exit code 1 with the traceback.

Stage commands record a BadInput/Transient failure as a small JSON file (`failure_file`) so the
flow reads the kind from a file instead of from DVC's log text.
"""
from __future__ import annotations

import json
from pathlib import Path

BAD_INPUT_EXIT = 3
TRANSIENT_EXIT = 75
FAILURES_DIR = Path(".medrega/failures")


class MedregaError(Exception):
    exit_code = 1
    kind = "error"


class BadInput(MedregaError, ValueError):
    """Wrong input or configuration: never retried."""

    exit_code = BAD_INPUT_EXIT
    kind = "bad_input"


class Transient(MedregaError, RuntimeError):
    """A service or resource is unavailable now: worth retrying."""

    exit_code = TRANSIENT_EXIT
    kind = "transient"


def failure_file(stage: str, root: Path = Path(".")) -> Path:
    return root / FAILURES_DIR / f"{stage}.json"


def record_failure(stage: str, err: MedregaError, root: Path = Path(".")) -> None:
    from medrega import io

    io.write_json(failure_file(stage, root), {"stage": stage, "kind": err.kind, "exit_code": err.exit_code,
                                              "message": str(err)})


def read_failure(stage: str, root: Path = Path(".")) -> dict | None:
    path = failure_file(stage, root)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def clear_failure(stage: str, root: Path = Path(".")) -> None:
    failure_file(stage, root).unlink(missing_ok=True)
