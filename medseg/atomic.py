"""The one way medseg writes files: beside the target, then renamed into place.

An interrupted run therefore leaves either the old file or the new one, never half of one:
the temporary file is fsynced before the rename and the folder after it, so the rename
survives a power cut too. Temporary names carry the writer's process id
(``.NAME.PID.XXXX.tmpSUFFIX``); a temporary left by a process that died (SIGKILL, power cut)
is removed the next time medseg writes into that folder. ``folder_lock`` keeps a second
command from writing a run or cache folder while one is at it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from medseg.errors import LockError, WriteError

#: Name of the lock file ``folder_lock`` keeps in a folder while a command writes it.
LOCK_NAME = ".medseg.lock"

_TMP_RE = re.compile(r"^\..+\.(?P<pid>\d+)\.[^.]+\.tmp")
_SWEPT: set[Path] = set()


def _default_mode() -> int:
    # mkstemp creates 0600 files; written results should get the user's usual permissions.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _default_mode()


def _check_parent(path: Path) -> None:
    if not path.parent.is_dir():
        raise WriteError(
            f"{path}: folder {path.parent} does not exist; create it or choose another output path"
        )


def _write_error(target: Path, exc: OSError, folder: Path | None = None) -> WriteError:
    """One line for the OS errors a user can fix: disk full, read-only, no permission.

    ``folder`` is where the write was refused (default: ``target``'s own folder). A short
    write without an errno (numpy's ``tofile``: "N requested and M written") on a file system
    with no space left is a full disk too."""
    if exc.errno is None and _no_space_left(folder or target.parent):
        exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why = "file too large for" if exc.errno == errno.EFBIG else "disk full while writing to"
        return WriteError(f"{target}: {why} {folder or target.parent}; free space and rerun")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return WriteError(
            f"{target}: cannot write to {folder or target.parent} "
            f"({os.strerror(exc.errno).lower()}); choose a writable output folder"
        )
    return WriteError(f"{target}: cannot write ({exc.strerror or exc}); check the output folder")


def _no_space_left(folder: Path) -> bool:
    """Whether the file system of ``folder`` has less than one block free for this user."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < max(st.f_frsize, 4096)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temporaries in ``folder`` left by writers that no longer run; return them.

    Only names of the form this module writes are touched, and only when their process id is
    not alive on this machine (a temporary of a live writer is in use)."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _TMP_RE.match(entry.name)
            if m and int(m.group("pid")) != os.getpid() and not _pid_alive(int(m.group("pid"))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _sweep_once(folder: Path) -> None:
    key = folder.resolve()
    if key not in _SWEPT:
        _SWEPT.add(key)
        sweep_stale_temporaries(folder)


def _fsync_folder(folder: Path) -> None:
    # The rename lives in the folder's entry table: without this it can be lost on a crash.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temporary_beside(target: Path) -> Path:
    suffix = "".join(target.suffixes[-2:]) if target.name.endswith(".gz") else target.suffix
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.{os.getpid()}.", suffix=f".tmp{suffix}", dir=target.parent
        )
    except OSError as exc:
        raise _write_error(target, exc) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _MODE)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name keeps the target's suffixes (``.nii.gz``, ``.npy``) so writers that
    dispatch on the suffix still work. On any exception the temporary file is removed.
    """
    target = Path(path)
    _check_parent(target)
    _sweep_once(target.parent)
    tmp = _temporary_beside(target)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_folder(target.parent)
    except OSError as exc:
        error = _write_error(target, exc)  # before the unlink frees the space it ran out of
        tmp.unlink(missing_ok=True)
        raise error from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(path: str | os.PathLike[str], *, overwrite: bool = True) -> None:
    """Refuse, before any computation, an output that cannot be written.

    ``path`` is a file to be written: its folder must exist (or be creatable) and accept a
    new file; an existing ``path`` is refused unless ``overwrite``."""
    _check_writable(Path(path), Path(path), overwrite)


def _check_writable(target: Path, named: Path, overwrite: bool) -> None:
    """:func:`check_writable` of ``target``, naming ``named`` in the message."""
    if target.exists() and not overwrite:
        raise WriteError(f"{target}: already exists; pass --overwrite to replace it")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        where = "is a file" if folder == named else f"{folder} is a file"
        raise WriteError(f"{named}: {where}, not a folder; choose another output path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", dir=folder)
    except OSError as exc:
        raise _write_error(named, exc, folder) from exc
    os.close(fd)
    os.unlink(probe)


def check_writable_folder(folder: str | os.PathLike[str]) -> None:
    """Refuse, before any computation, an output folder that cannot be created or written."""
    _check_writable(Path(folder) / LOCK_NAME, Path(folder), True)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (non-finite floats as strings via ``default``)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        return f"pid {info['pid']} on {info['host']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _acquire(lock: Path) -> int:
    """Open and flock ``lock`` (non-blocking); the descriptor, or LockError naming the holder.

    A holder unlinks the file on release, so after locking, the path must still name the
    locked inode; otherwise the lock was released under us and we try again."""
    import fcntl

    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, _MODE)
        except OSError as exc:
            raise _write_error(lock, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockError(
                f"{lock.parent}: in use by {_holder(lock)}; wait for it to finish or choose "
                "another output folder"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], command: str) -> Iterator[None]:
    """Hold ``folder``'s lock while ``command`` writes it; refuse a second writer in one line.

    The lock is an advisory ``flock`` on ``FOLDER/.medseg.lock``: the kernel drops it when its
    holder dies, so a lock left by a killed process is taken over without asking. The file
    names the holder (pid, host, command, start time) for the refusal message, and is removed
    on release, with the folder itself if the lock created it and nothing was written."""
    path = Path(folder)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(path / LOCK_NAME, exc) from exc
    lock = path / LOCK_NAME
    fd = _acquire(lock)
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)  # closing the descriptor releases the flock
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only succeeds when empty
