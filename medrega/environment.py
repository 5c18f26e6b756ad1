"""The environment every process of the project runs in: offline (no hub downloads), no
telemetry, quiet tokenizers. One table, applied by the `medrega` entry point before Prefect,
MLflow or transformers are imported, and by the test suite for the servers and tools it starts
directly (the Makefile exports the same for `make ui`'s servers, which do not go through it).

Each library reads its own switch: MLflow's telemetry is off only with MLFLOW_DISABLE_TELEMETRY
(or DO_NOT_TRACK=true, not 1); DVC's analytics daemon with DVC_NO_ANALYTICS (our .dvc/config also
says so, but not a repository someone else initialised); Great Expectations with its own flag.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

OFFLINE_AND_QUIET = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply(environ: MutableMapping[str, str] = os.environ) -> MutableMapping[str, str]:
    """OFFLINE_AND_QUIET into `environ` where it says nothing itself (a user's own setting wins)."""
    for key, value in OFFLINE_AND_QUIET.items():
        environ.setdefault(key, value)
    return environ
