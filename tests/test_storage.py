"""`medrega remote s3` writes only non-secret settings to .dvc/config (through DVC itself)."""
from __future__ import annotations

import configparser
import subprocess
from pathlib import Path

from tests.conftest import BIN, isolated_env


def _repo(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=tmp_path, check=True, env=isolated_env(tmp_path))
    return tmp_path


def _medrega(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "medrega"), *args], cwd=ws, env=isolated_env(ws), capture_output=True, text=True)


def _config(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser()
    cp.read(path)
    return cp


def test_remote_s3_configures_dvc_without_secrets(tmp_path: Path):
    ws = _repo(tmp_path)
    result = _medrega(ws, "remote", "s3", "--bucket", "med-data", "--prefix", "team/dvc",
                      "--endpoint", "https://minio.example:9000", "--region", "eu-west-1",
                      "--aws-profile", "medrega", "--credentialpath", "/home/op/.aws/medrega-creds")
    assert result.returncode == 0, result.stderr
    project = _config(ws / ".dvc" / "config")
    assert project["core"]["remote"] == "s3"
    s3 = project['\'remote "s3"\'']
    assert dict(s3) == {"url": "s3://med-data/team/dvc", "endpointurl": "https://minio.example:9000",
                        "region": "eu-west-1", "profile": "medrega"}
    # the machine-specific credentials path only in the git-ignored local config
    local = _config(ws / ".dvc" / "config.local")
    assert local['\'remote "s3"\'']["credentialpath"] == "/home/op/.aws/medrega-creds"
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=ws)
    assert ignored.returncode == 0

    # re-running replaces the remote instead of failing on "already exists"
    again = _medrega(ws, "remote", "s3", "--bucket", "other", "--prefix", "")
    assert again.returncode == 0, again.stderr
    assert _config(ws / ".dvc" / "config")['\'remote "s3"\'']["url"] == "s3://other"


def test_remote_s3_rejects_a_path_as_bucket(tmp_path: Path):
    ws = _repo(tmp_path)
    result = _medrega(ws, "remote", "s3", "--bucket", "s3://med-data/x")
    assert result.returncode == 3
    assert "bare bucket name" in result.stderr
