"""Crash-safe writes, content fingerprints and strict JSON: the one place files are written or
identified, and where the JSON the pipeline reads is decoded.

Everything appears whole under its final name, or not at all: files and directories are built
beside their target and renamed into place. Written files get the permissions the umask allows
(`tempfile` alone would leave them 0600, unreadable to a training job of another user on
shared storage).

JSON is read through `loads_json`/`read_json`, which refuse an object that gives a key twice:
`json.loads` silently keeps the last one, so a hand-merged index or a report line with two
"findings" would lose data without a word.
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
from typing import IO, Any

from medrega.errors import BadInput


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def open_atomic(path: Path, mode: str = "wb") -> Iterator[IO]:
    """A file handle to stream into; the file appears under `path` whole when the block ends
    without an error (else nothing appears), with the umask's permissions. For files too large to
    hold in memory first (an index or a reports file of millions of lines)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"open_atomic writes ('wb' or 'w'), not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            yield fh
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    with open_atomic(path) as fh:
        fh.write(data)


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


# -- strict JSON ---------------------------------------------------------------------------------

R_JSON_KEYS = "JSON keys unique"


class DuplicateKey(BadInput):
    """A JSON object gives one key twice; names the source, the 1-based line and the key."""

    rule = R_JSON_KEYS

    def __init__(self, source: Any, line: int, key: str):
        super().__init__(f"{source}:{line}: rule '{R_JSON_KEYS}' failed: key {key!r} is given twice in one object "
                         "(a JSON reader would silently keep only the last)")
        self.source, self.line, self.key = str(source), line, key


class _Repeated(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Repeated(key)
        out[key] = value
    return out


# The C scanner with a pairs hook: nearly the speed of plain json.loads. Positions are found only
# when a duplicate is there (`_locate_duplicate`), so the common case pays nothing for them.
_STRICT = json.JSONDecoder(object_pairs_hook=_unique_pairs)


class _Locator(json.JSONDecoder):
    """The pure-Python scanner with an object parser that notes where the first repeated key
    starts. Slow, so used only to name the line of a duplicate `_STRICT` already found."""

    def __init__(self):
        super().__init__()
        self.found: tuple[int, str] | None = None
        self.parse_object = self._object
        self.scan_once = json.scanner.py_make_scanner(self)

    def _skip(self, s: str, i: int) -> int:
        while s[i] in " \t\n\r":
            i += 1
        return i

    def _object(self, s_and_end, strict, scan_once, *_args) -> tuple[dict, int]:
        # only ever run on text the C scanner parsed up to a duplicate key, so its syntax is sound
        s, i = s_and_end
        seen: set[str] = set()
        i = self._skip(s, i)
        if s[i] == "}":
            return {}, i + 1
        while True:
            key_at = i
            key, i = json.decoder.scanstring(s, i + 1, strict)
            if key in seen and self.found is None:
                self.found = (key_at, key)
            seen.add(key)
            _, i = scan_once(s, self._skip(s, self._skip(s, i) + 1))  # past ':' to the value
            i = self._skip(s, i)
            if s[i] == "}":
                return {}, i + 1
            i = self._skip(s, i + 1)  # past ','


def _locate_duplicate(text: str, at: int, key: str) -> tuple[int, str]:
    """(1-based line, key) of the first repeated key in the value starting at `at`."""
    locator = _Locator()
    try:
        locator.raw_decode(text, at)
    except (ValueError, IndexError):
        pass  # past the duplicate the text may be unsound: the position is already noted
    if locator.found is None:
        return text.count("\n", 0, at) + 1, key
    pos, found_key = locator.found
    return text.count("\n", 0, pos) + 1, found_key


def raw_decode_json(text: str, at: int = 0, source: Any = "<json>", first_line: int = 1) -> tuple[Any, int]:
    """`json.JSONDecoder.raw_decode` that refuses duplicate keys (DuplicateKey); JSON syntax
    errors raise json.JSONDecodeError as usual. `first_line` is the line `text` starts on in
    `source` (a line of a JSON-lines file)."""
    try:
        return _STRICT.raw_decode(text, at)
    except _Repeated as dup:
        line, key = _locate_duplicate(text, at, dup.key)
        raise DuplicateKey(source, first_line + line - 1, key) from None


def loads_json(text: str, source: Any = "<json>", first_line: int = 1) -> Any:
    """`json.loads` that refuses duplicate keys (DuplicateKey, naming source, line and key)."""
    try:
        return _STRICT.decode(text)
    except _Repeated as dup:
        line, key = _locate_duplicate(text, len(text) - len(text.lstrip()), dup.key)
        raise DuplicateKey(source, first_line + line - 1, key) from None


def read_json(path: Path) -> Any:
    """A JSON file, strictly: BadInput naming the file (and line) when it cannot be read, is not
    UTF-8, is not valid JSON or gives a key twice in one object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(f"{path}: not readable as UTF-8 text ({type(err).__name__}: {err})") from None
    try:
        return loads_json(text, path)
    except json.JSONDecodeError as err:
        raise BadInput(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
