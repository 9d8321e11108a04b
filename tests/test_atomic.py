"""The one atomic writer: old file or new file, never half of one."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from medseg import atomic
from medseg.errors import LockError, WriteError


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


def test_temporary_of_a_killed_writer_is_removed_by_the_next_write(tmp_path: Path) -> None:
    script = (
        "import os, signal, sys\n"
        "from medseg import atomic\n"
        "with atomic.atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "a.nii.gz")], check=False)
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".a.nii.gz.")  # what a SIGKILL leaves
    atomic.write_text(tmp_path / "b.txt", "next")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt"]


def test_temporary_of_a_live_writer_is_kept(tmp_path: Path) -> None:
    live = tmp_path / f".x.nii.{os.getppid()}.abc123.tmp.nii"
    live.write_bytes(b"in use")
    assert atomic.sweep_stale_temporaries(tmp_path) == []
    assert live.exists()


def test_folder_is_fsynced_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[bool] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic.write_text(tmp_path / "a.txt", "hi")
    assert synced == [False, True]  # the file's data, then the folder's entry


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")],
)
def test_unwritable_folder_is_a_one_line_write_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    for call in (
        lambda: atomic.write_text(tmp_path / "a.txt", "hi"),
        lambda: atomic.check_writable(tmp_path / "a.txt"),
    ):
        with pytest.raises(WriteError, match=words) as info:
            call()
        assert "\n" not in str(info.value) and "choose a writable output folder" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "disk full while writing to"),
        (errno.EDQUOT, "disk full while writing to"),
        (errno.EFBIG, "file too large for"),
    ],
)
def test_full_disk_mid_write_is_one_line_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    (tmp_path / "a.txt").write_text("old")

    def half_then_full(self: Path, data: bytes) -> None:
        with open(self, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(WriteError, match=words) as info:
        atomic.write_text(tmp_path / "a.txt", "new content " * 100)
    assert "\n" not in str(info.value) and "free space and rerun" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "old"


def test_short_write_without_errno_on_a_full_file_system_is_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """numpy's ``tofile`` reports a full disk as "N requested and M written", without an
    errno; the free space of the file system tells what happened."""
    import numpy as np

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(os, "statvfs", lambda _path: Full())

    def short(tmp: Path) -> None:
        raise OSError("100000 requested and 8176 written")

    with pytest.raises(WriteError, match="a.npy: disk full while writing to"):
        atomic.write_with(tmp_path / "a.npy", short)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()  # space again: the same error is not called a full disk
    with pytest.raises(WriteError, match=r"cannot write \(100000 requested and 8176 written\)"):
        atomic.write_with(tmp_path / "a.npy", short)
    atomic.write_with(tmp_path / "a.npy", lambda tmp: np.save(tmp, np.zeros(3)))


def test_check_writable_refuses_an_existing_output_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "pred.png").write_bytes(b"old")
    with pytest.raises(WriteError, match="exists; pass --overwrite"):
        atomic.check_writable(tmp_path / "pred.png", overwrite=False)
    atomic.check_writable(tmp_path / "pred.png", overwrite=True)
    atomic.check_writable(tmp_path / "new" / "deeper" / "pred.png", overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.png"]


def test_second_writer_of_a_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with atomic.folder_lock(tmp_path / "run", "medseg train"):
        with (
            pytest.raises(LockError, match=rf"in use by pid {os.getpid()} .*medseg train"),
            atomic.folder_lock(tmp_path / "run", "medseg train"),
        ):
            pass
        child = subprocess.run(
            [sys.executable, "-c", LOCK_SCRIPT, str(tmp_path / "run")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert child.returncode == 3 and "in use by pid" in child.stdout
    assert not (tmp_path / "run").exists()  # created by the lock, left empty: removed


LOCK_SCRIPT = (
    "import sys\n"
    "from medseg import atomic\n"
    "from medseg.errors import LockError\n"
    "try:\n"
    "    with atomic.folder_lock(sys.argv[1], 'second'):\n"
    "        sys.exit(0)\n"
    "except LockError as exc:\n"
    "    print(exc); sys.exit(3)\n"
)


def test_lock_of_a_killed_holder_is_taken_over(tmp_path: Path) -> None:
    script = (
        "import os, signal, sys\n"
        "from medseg import atomic\n"
        "with atomic.folder_lock(sys.argv[1], 'killed'):\n"
        "    open(sys.argv[1] + '/result.txt', 'w').write('x')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", script, str(run)], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert (run / atomic.LOCK_NAME).exists()  # the dead holder's file is still there
    with atomic.folder_lock(run, "rerun"):
        info = (run / atomic.LOCK_NAME).read_text()
        assert f'"pid": {os.getpid()}' in info
    assert sorted(p.name for p in run.iterdir()) == ["result.txt"]
