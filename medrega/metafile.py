"""InternVL meta files (SPEC §1): `{dataset: {root, annotation, length, repeat_time,
data_augment, base_prompt}}`, one entry per annotation file.

Paths are written relative to the meta file's folder and read back against it, so a meta file
works from any working directory and after its folder is moved (the authors' release writes them
the same way). Entry names start with the task (`r2t_en-00003`), which is how training picks its
instruction mix.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medrega import io
from medrega.errors import BadInput


def resolve(meta_file: Path, value: str | Path) -> Path:
    p = Path(value)
    return p if p.is_absolute() else Path(meta_file).parent / p


def relative(meta_file: Path, path: str | Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(meta_file).parent.resolve())


def task_of(name: str) -> str:
    return name.split("_")[0]


def read(meta_file: Path, tasks: list[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(name, entry) pairs in name order, `root` and `annotation` resolved; only `tasks` if given."""
    meta_file = Path(meta_file)
    try:
        meta = io.loads_json(meta_file.read_text(encoding="utf-8"), meta_file)
    except io.DuplicateKey:
        raise  # names the file, line and key already
    except (OSError, ValueError) as err:
        raise BadInput(f"{meta_file}: not a readable meta file ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or not all(isinstance(e, dict) and "annotation" in e for e in meta.values()):
        raise BadInput(f"{meta_file}: rule 'meta file registers annotation files' failed: "
                       "expected {dataset: {root, annotation, ...}}")
    entries = [(name, {**e, "root": str(resolve(meta_file, e.get("root", "."))),
                       "annotation": str(resolve(meta_file, e["annotation"]))}) for name, e in sorted(meta.items())]
    return [(n, e) for n, e in entries if tasks is None or task_of(n) in tasks]


def write(meta_file: Path, entries: dict[str, dict[str, Any]], relative_to: Path | None = None) -> None:
    """Write entries whose `root`/`annotation` are paths anywhere, stored relative to the folder
    the file will be read from (`relative_to`; default: its own, e.g. when built in a work
    directory that is renamed into place afterwards)."""
    anchor = Path(relative_to or Path(meta_file).parent) / Path(meta_file).name
    io.write_json(meta_file, {name: {**e, "root": relative(anchor, e["root"]),
                                     "annotation": relative(anchor, e["annotation"])}
                              for name, e in sorted(entries.items())})
