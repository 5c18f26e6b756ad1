"""Load `params.yaml` and resolve a profile.

`params.yaml` holds every knob. Its top-level sections are the `tiny` profile (the embedded
default); `profiles.<name>` holds overlays that are deep-merged on top for other profiles
(e.g. `h800-cluster`). The active profile is, in order: the explicit argument, the
`MEDREGA_PROFILE` environment variable, then `profile:` in the file.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """params.yaml is missing, malformed, or names an unknown profile."""


def deep_merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_params(path: str | Path = DEFAULT_PARAMS, profile: str | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the repository root or pass --params)")
    with path.open(encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    profiles = raw.pop("profiles", {}) or {}
    name = profile or os.environ.get("MEDREGA_PROFILE") or raw.get("profile", "tiny")
    if name != raw.get("base_profile", "tiny"):
        if name not in profiles:
            known = ", ".join([raw.get("base_profile", "tiny"), *profiles])
            raise ConfigError(f"{path}: unknown profile {name!r} (known: {known})")
        raw = deep_merge(raw, profiles[name])
    raw["profile"] = name
    _check_task_mix(raw, path)
    return raw


def _check_task_mix(params: dict[str, Any], path: Path) -> None:
    """Base pretraining, tuning and evaluation choose among what `materialize.tasks` builds."""
    built = set((params.get("materialize") or {}).get("tasks") or [])
    base = (params.get("model") or {}).get("base_pretrain") or {}
    choices = {"model.base_pretrain": base.get("tasks"),
               **{f"model.base_pretrain.phases[{i}]": (p or {}).get("tasks") for i, p in enumerate(base.get("phases") or [])},
               "tune": (params.get("tune") or {}).get("tasks"), "evaluate": (params.get("evaluate") or {}).get("tasks")}
    for section, chosen in choices.items():
        missing = sorted(set(chosen or []) - built)
        if missing:
            raise ConfigError(f"{path}: {section}.tasks names {', '.join(missing)}, which materialize.tasks "
                              f"does not build ({', '.join(sorted(built))})")
