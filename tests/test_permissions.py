"""Files the pipeline writes carry the permissions the umask allows (issue 16): a training job of
another user in the group reads them on shared storage. `tempfile.mkstemp` alone would leave 0600."""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from medrega import io
from medrega.config import DataConfig
from tests.conftest import tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _unreadable(root: Path) -> list[str]:
    """Everything under root that the group or others cannot read (directories: list and enter)."""
    bad = []
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        want = 0o055 if p.is_dir() else 0o044
        if mode & want != want:
            bad.append(f"{p.relative_to(root.parent)} {oct(mode)}")
    return bad


def test_embedded_data_and_materialize_are_group_readable(tmp_path, umask):
    from medrega.sources.embedded import build_default
    from tasks.materialize import materialize

    umask(0o022)
    data = tmp_path / "data"
    # synthetic scans, the package scans (written by sources/layout.py) and reports.jsonl
    summary = build_default(data, DataConfig(patients_per_modality=2, slices_per_patient=1, image_size=64))
    assert summary["package_scans"]["images"] > 0 and (data / "reports.jsonl").is_file()
    out = tmp_path / "instructions"
    materialize(data, out, tiny({"materialize": {"test_share": 0.5, "workers": 1}}))
    assert (out / "meta_file.json").is_file()
    assert _unreadable(data) == [] and _unreadable(out) == []


def test_io_writers_follow_a_stricter_umask(tmp_path, umask):
    umask(0o027)
    io.write_text(tmp_path / "a" / "f.txt", "x")
    with io.open_atomic(tmp_path / "g.jsonl", "w") as fh:
        fh.write("{}\n")
    with io.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "inner.txt").write_text("y")
    for path, want in ((tmp_path / "a" / "f.txt", 0o640), (tmp_path / "g.jsonl", 0o640), (tmp_path / "d", 0o750)):
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_no_writer_in_sources_or_tasks_bypasses_medrega_io():
    """tempfile's files and folders are private (0600/0700) whatever the umask: every writer in
    medrega/sources and tasks goes through medrega.io (or plain open/mkdir, which follow the umask)."""
    offenders = [f"{p.relative_to(REPO)}:{n}" for folder in ("medrega/sources", "tasks") for p in (REPO / folder).glob("*.py")
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if re.search(r"\btempfile\b|\bos\.open\(|\bmkstemp\b|\bmkdtemp\b", line)]
    assert offenders == []
