"""The one atomic writer: old file or new file, never half of one."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from medseg import atomic
from medseg.errors import WriteError


def test_interrupted_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    atomic.write_json(target, {"version": 1})
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text('{"version": 2, "trunc')
        raise RuntimeError("killed mid-write")
    assert target.read_text().strip().startswith('{\n  "version": 1')
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_temporary_name_keeps_double_suffix(tmp_path: Path) -> None:
    with atomic.atomic_path(tmp_path / "scan.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "scan.nii.gz").read_bytes() == b"x"


def test_missing_folder_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(WriteError, match="does not exist"):
        atomic.write_text(tmp_path / "nope" / "a.txt", "hi")


def test_written_files_follow_the_umask_not_mkstemp_0600(tmp_path: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    atomic.write_text(tmp_path / "a.txt", "hi")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask
