"""Weights by reference: a registered model that points at the tuned checkpoint on the DVC remote.

A 34B checkpoint is already on the DVC remote once `dvc push` ran; copying it into MLflow's
artifact store too would store it twice. With `register.weights: reference` the model version
carries a small record instead (`reference()`, at registration):

    {"format": FORMAT, "remote": {"url": "s3://bucket/prefix", "endpointurl": ...},
     "checkpoint": {"path": "artifacts/tune", "md5": "<md5 of the tune output>.dir"},
     "load": "model", "files": {"model/config.json": "<md5>", ..., "adapter/...": "<md5>"}}

`checkpoint.md5` is the hash dvc.lock records for the tune stage's output; its `.dir` object on the
remote lists every file's md5. `fetch()` (at load: the pyfunc, `medrega serve`, `medrega predict`)
reads exactly the objects of the `load` folder through DVC's own filesystem for that remote, checks
the listing's md5 and every file's md5 against the record, and only then hands the folder to the
model loader. A missing object or a hash mismatch raises WeightsError naming the file, its md5 and
where it was looked for: never a silently different model. An unreachable remote is Transient.

Only non-secret remote settings are recorded (url, endpoint, region). Credentials come from the
loading machine's environment, as for DVC itself; `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`
replace the recorded endpoint (a serving host may reach the store by another address). Verified
files are kept in a local cache (`MEDREGA_WEIGHTS_CACHE`, default ~/.cache/medrega/weights) and
checked again on every load.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from medrega.errors import BadInput, Transient

FORMAT = "medrega.dvc-reference/1"
CACHE_ENV = "MEDREGA_WEIGHTS_CACHE"
FOLDERS = ("model", "adapter")   # what a tune output holds that a model version needs
_PUBLIC = ("url", "endpointurl", "region")  # remote settings safe to record (no credentials)


class WeightsError(BadInput):
    """A referenced weight object is missing, or its content is not what the version recorded."""


class RemoteUnavailable(Transient):
    """The DVC remote holding the weights could not be reached."""


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- the remote ------------------------------------------------------------------------------

def _odb(remote: dict[str, Any]):
    """DVC's object database on `remote` (DVC 3 layout: <url>/files/md5/ab/cdef...)."""
    from dvc.fs import get_cloud_fs
    from dvc_data.hashfile.db import get_odb

    cls, conf, fs_path = get_cloud_fs({}, **remote)
    fs = cls(**conf)
    return get_odb(fs, fs.join(fs_path, "files", "md5"), hash_name="md5")


def _remote_call(what: str, where: str, action):
    """Run one remote operation; a missing object is WeightsError, anything else unavailability."""
    try:
        return action()
    except FileNotFoundError:
        raise WeightsError(f"{what}: not found at {where}") from None
    except PermissionError as err:
        raise WeightsError(f"{what}: access to {where} denied ({err})") from None
    except Exception as err:  # noqa: BLE001 - botocore/aiohttp/OS errors: the remote did not answer
        raise RemoteUnavailable(f"{what}: cannot reach {where} ({type(err).__name__}: {err})") from None


def _listing(odb, md5: str, url: str) -> dict[str, str]:
    """The `.dir` object `md5` as {relpath: md5}, after checking its own md5."""
    where = odb.fs.unstrip_protocol(odb.oid_to_path(md5))
    data = _remote_call(f"checkpoint listing {md5} on the DVC remote {url}", where, lambda: odb.fs.cat_file(where))
    if hashlib.md5(data).hexdigest() + ".dir" != md5:
        raise WeightsError(f"checkpoint listing {md5} at {where}: content does not match its md5 (corrupt object)")
    try:
        return {entry["relpath"]: entry["md5"] for entry in json.loads(data)}
    except (ValueError, KeyError, TypeError):
        raise WeightsError(f"checkpoint listing {md5} at {where}: not a DVC directory listing") from None


def _default_remote(repo: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings to record, settings to use here) of the workspace's default DVC remote."""
    from dvc.config import Config as DvcConfig
    from dvc.fs import get_fs_config

    if not (repo / ".dvc").is_dir():
        raise WeightsError(f"{repo}: not a DVC workspace (register.weights=reference needs one)")
    config = DvcConfig(dvc_dir=str(repo / ".dvc"))
    name = config["core"].get("remote")
    if not name:
        raise WeightsError("register.weights=reference needs a default DVC remote to point at "
                           "(`medrega remote s3 ...` or `dvc remote add -d ...`)")
    here = get_fs_config(config, name=name)
    return {k: here[k] for k in _PUBLIC if here.get(k)}, here


# -- registration ----------------------------------------------------------------------------

def locked_output(lock_file: Path, stage: str, path: Path) -> str:
    """The md5 dvc.lock records for `stage`'s output `path` (DVC 3 hashes only)."""
    if not Path(lock_file).is_file():
        raise WeightsError(f"{lock_file}: not found; register.weights=reference needs the {stage} stage run "
                           "through DVC (`dvc repro` or `medrega pipeline`)")
    stages = (yaml.safe_load(Path(lock_file).read_text()) or {}).get("stages") or {}
    for out in (stages.get(stage) or {}).get("outs", []):
        if out.get("path", "").rstrip("/") == str(path).rstrip("/"):
            if out.get("hash") != "md5" or not str(out.get("md5", "")).endswith(".dir"):
                raise WeightsError(f"{lock_file}: {stage} output {path} has no DVC 3 directory hash "
                                   f"(hash {out.get('hash')!r}, md5 {out.get('md5')!r}); re-run the stage with DVC 3")
            return out["md5"]
    raise WeightsError(f"{lock_file}: no {stage} output {path} recorded; run the {stage} stage through DVC")


def reference(tune_out: Path, lock_file: Path = Path("dvc.lock"), repo: Path = Path(".")) -> dict[str, Any]:
    """The record a version carries instead of its weights, after checking that every object it
    names is on the default remote (a version that cannot load must not be registered)."""
    md5 = locked_output(lock_file, "tune", tune_out)
    public, here = _default_remote(Path(repo))
    odb = _odb(here)
    try:
        listing = _listing(odb, md5, public["url"])
    except WeightsError as err:
        raise WeightsError(f"{err}: push the tuned checkpoint first (`dvc push tune`; `medrega pipeline` "
                           "does before it registers)") from None
    files = {rel: h for rel, h in sorted(listing.items()) if rel.split("/")[0] in FOLDERS}
    if not any(rel.startswith("model/") for rel in files):
        raise WeightsError(f"checkpoint {md5} ({tune_out}) has no model/ folder to load")
    absent = [rel for rel, h in files.items()
              if not _remote_call(f"{rel} ({h})", public["url"], lambda h=h: odb.exists(h))]
    if absent:
        raise WeightsError(f"{len(absent)} file(s) of the tuned checkpoint are not on the DVC remote {public['url']} "
                           f"({', '.join(absent[:5])}): push them first (`dvc push tune`)")
    return {"format": FORMAT, "remote": public, "checkpoint": {"path": str(tune_out), "md5": md5},
            "load": "model", "files": files}


# -- loading ---------------------------------------------------------------------------------

def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medrega" / "weights"


def _remote_here(recorded: dict[str, Any]) -> dict[str, Any]:
    remote = dict(recorded)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and str(remote.get("url", "")).startswith("s3://"):
        remote["endpointurl"] = endpoint
    return remote


def _fetch_file(odb, rel: str, md5: str, target: Path) -> None:
    """One object into `target`, only once its md5 is right (a partial or wrong file never
    appears under the final name)."""
    where = odb.fs.unstrip_protocol(odb.oid_to_path(md5))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        _remote_call(f"weight file {rel} (md5 {md5})", where, lambda: odb.fs.get_file(where, tmp))
        got = md5_file(Path(tmp))
        if got != md5:
            raise WeightsError(f"weight file {rel}: the object at {where} has md5 {got}, the version records {md5} "
                               "(corrupt or replaced on the remote); refusing to load a different model")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def fetch(ref: dict[str, Any], cache: Path | None = None) -> Path:
    """The referenced `load` folder, fetched through DVC and verified; returns its local path."""
    if ref.get("format") != FORMAT:
        raise WeightsError(f"weights reference: unknown format {ref.get('format')!r} (expected {FORMAT})")
    md5, load = ref["checkpoint"]["md5"], ref["load"]
    wanted = {rel: h for rel, h in ref["files"].items() if rel.startswith(load + "/")}
    if not wanted:
        raise WeightsError(f"weights reference: no {load}/ files recorded")
    for rel in wanted:  # a record naming ../ or an absolute path must not write outside the cache
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise WeightsError(f"weights reference: {rel!r} is not a path inside the checkpoint")
    remote = _remote_here(ref["remote"])
    odb = _odb(remote)
    listing = _listing(odb, md5, remote["url"])
    for rel, h in wanted.items():
        if listing.get(rel) != h:
            raise WeightsError(f"weight file {rel}: checkpoint listing {md5} has md5 {listing.get(rel)}, "
                               f"the version records {h}")
    root = Path(cache or cache_root()) / md5.removesuffix(".dir")
    for rel, h in wanted.items():
        local = root / rel
        if local.is_file() and md5_file(local) == h:
            continue  # fetched and verified before, and still intact
        _fetch_file(odb, rel, h, local)
    return root / load
