"""`medrega`: every stage on its own, the whole pipeline, the registry and day-2 commands.

Stage commands take a resolved config (`--config params.resolved.yaml`, what dvc.yaml passes),
or resolve `--params params.yaml` with `--profile` / MEDREGA_PROFILE themselves; input and output
paths come from it unless given. Exit codes: 0 ok, 3 bad input or configuration (deterministic:
retrying will not help), 75 a service unavailable (retry later), 1 a bug (with its traceback).
"""
from __future__ import annotations

import os
from pathlib import Path

from medrega import environment

# One environment for every entry point (`make`, a direct `.venv/bin/medrega ...`, DVC, Prefect
# workers): the project's own Prefect home, and medrega/environment.py's table (offline, no
# telemetry). Set before Prefect or transformers are imported.
os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
environment.apply()

from cli.app import app  # noqa: E402

__all__ = ["app"]
