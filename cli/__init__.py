"""`medrega`: every stage on its own, the whole pipeline, the registry and day-2 commands.

Stage commands take a resolved config (`--config params.resolved.yaml`, what dvc.yaml passes),
or resolve `--params params.yaml` with `--profile` / MEDREGA_PROFILE themselves; input and output
paths come from it unless given. Exit codes: 0 ok, 3 bad input or configuration (deterministic:
retrying will not help), 75 a service unavailable (retry later), 1 a bug (with its traceback).
"""
from __future__ import annotations

import os
from pathlib import Path

# One environment for every entry point (`make`, a direct `.venv/bin/medrega ...`, DVC, Prefect
# workers): the project's own Prefect home, no telemetry, no hub downloads. Set before Prefect or
# transformers are imported.
os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
# Each library reads its own switch: MLflow's telemetry is off only with MLFLOW_DISABLE_TELEMETRY
# (or DO_NOT_TRACK=true, not 1); DVC's analytics daemon with DVC_NO_ANALYTICS (our .dvc/config
# also says so, but not a repository someone else initialised).
for _key, _value in (("DO_NOT_TRACK", "1"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                     ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                     ("GX_ANALYTICS_ENABLED", "False"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                     ("DVC_NO_ANALYTICS", "1")):
    os.environ.setdefault(_key, _value)

from cli.app import app  # noqa: E402

__all__ = ["app"]
