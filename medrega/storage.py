"""Remote storage: the DVC remote on S3 (AWS, MinIO, Ceph) and where it stands.

Only non-secret settings (url, endpoint, region, profile name) go into `.dvc/config`, which git
tracks. Credentials never pass through here: boto3 (inside dvc-s3 and MLflow) reads them from
the environment (`AWS_ACCESS_KEY_ID`, ...), `~/.aws/credentials` or the named profile. A
credentials *file path* for one machine goes into the git-ignored `.dvc/config.local`.
Everything is done through `dvc remote add/modify`, so DVC validates the options itself.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from medrega.errors import BadInput


class StorageError(BadInput):
    """A DVC remote command failed (bad option, unreachable remote...)."""


def dvc(*args: str, cwd: Path | str = ".", check: bool = True, timeout: float | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run this environment's `dvc` (the console script beside the interpreter)."""
    exe = str(Path(sys.executable).with_name("dvc"))
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise StorageError(f"dvc {' '.join(args)}: {(proc.stderr or proc.stdout).strip()}")
    return proc


@dataclass
class S3Remote:
    bucket: str
    prefix: str = "medrega"
    name: str = "s3"
    endpoint: str | None = None      # MinIO / Ceph / moto; None = AWS
    region: str | None = None
    profile: str | None = None       # a profile in ~/.aws/{config,credentials}
    credentialpath: str | None = None  # this machine's credentials file -> .dvc/config.local only
    default: bool = True

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix.strip('/')}" if self.prefix.strip("/") else f"s3://{self.bucket}"


def configure_s3(remote: S3Remote, cwd: Path | str = ".") -> list[list[str]]:
    """Add (or replace) the DVC remote and set its options; returns the dvc commands run."""
    if not remote.bucket or "/" in remote.bucket:
        raise StorageError(f"bucket {remote.bucket!r}: give the bare bucket name (the path goes in --prefix)")
    cmds = [["remote", "add", "--force", *(["--default"] if remote.default else []), remote.name, remote.url]]
    for option, value in (("endpointurl", remote.endpoint), ("region", remote.region), ("profile", remote.profile)):
        if value:
            cmds.append(["remote", "modify", remote.name, option, value])
    if remote.credentialpath:
        cmds.append(["remote", "modify", "--local", remote.name, "credentialpath", remote.credentialpath])
    for cmd in cmds:
        dvc(*cmd, cwd=cwd)
    return cmds


def default_remote(cwd: Path | str = ".") -> tuple[str | None, str | None]:
    """(name, url) of the default DVC remote, or (None, None)."""
    name = dvc("remote", "default", cwd=cwd, check=False).stdout.strip() or None
    if not name:
        return None, None
    url = dvc("remote", "list", cwd=cwd, check=False).stdout
    for line in url.splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            return name, parts[1] if len(parts) > 1 else None
    return name, None


def remote_sync(cwd: Path | str = ".", remote: str | None = None, timeout: float = 300) -> dict:
    """Compare the local cache with the remote (`dvc status -c`).

    Returns {"in_sync": bool | None, "missing": [paths not on the remote], "error": str | None};
    in_sync is None when the remote could not be asked (unreachable, no remote, DVC locked).
    """
    args = ["status", "--cloud", "--json", *(["--remote", remote] if remote else [])]
    try:
        proc = dvc(*args, cwd=cwd, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"in_sync": None, "missing": [], "error": f"dvc status -c timed out after {timeout:g} s"}
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        return {"in_sync": None, "missing": [], "error": lines[-1] if lines else f"exit {proc.returncode}"}
    try:
        status = json.loads(proc.stdout.strip() or "{}")
    except ValueError:
        return {"in_sync": None, "missing": [], "error": f"unreadable dvc output: {proc.stdout[:200]}"}
    # {path: "new" | "deleted" | "modified" | "missing"}: anything listed differs from the remote
    return {"in_sync": not status, "missing": sorted(status), "error": None}
