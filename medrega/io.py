"""Crash-safe writes and content fingerprints: the one place files are written or identified.

Everything appears whole under its final name, or not at all: files and directories are built
beside their target and renamed into place. Written files get the permissions the umask allows
(`tempfile` alone would leave them 0600, unreadable to a training job of another user on
shared storage).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any, indent: int | None = 2, default=None) -> None:
    write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, sort_keys=True, default=default) + "\n")


def write_jsonl(path: Path, rows) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def replace_dir(src: Path, target: Path) -> None:
    """Move a finished directory into place: the old one aside, the new one in, the old one gone.
    A failure between the two renames puts the old one back."""
    src, target = Path(src), Path(target)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(src, target)
    except BaseException:
        if old.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


def _hash_file(path: Path, digest) -> None:
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)


def content_hash(*parts: Any) -> str:
    """sha256 over parts: a file by its bytes, a directory by its files' names and bytes, any
    other value (pydantic models included) by its JSON. The one fingerprint for resume."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path) and part.is_file():
            digest.update(b"file\0")
            _hash_file(part, digest)
        elif isinstance(part, Path) and part.is_dir():
            digest.update(b"dir\0")
            for f in sorted(p for p in part.rglob("*") if p.is_file()):
                digest.update(str(f.relative_to(part)).encode() + b"\0")
                _hash_file(f, digest)
        else:
            value = part.model_dump(mode="json") if hasattr(part, "model_dump") else part
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
        digest.update(b"\1")
    return digest.hexdigest()
