"""A Dask cluster started as the issue's check starts it: ``dask scheduler`` and single-thread
``dask worker`` processes from the project's own install, for the tests that kill a worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # a session of its own, so that killing it takes its child processes too
    with open(log, "wb") as fh:
        return subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


@contextmanager
def dask_command_cluster(
    logs: Path, env: dict[str, str], workers: int = 2
) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """``(scheduler address, worker processes)`` of a running ``dask scheduler`` and
    ``workers`` ``dask worker --nthreads 1``; every process is stopped on exit. Logs go to
    ``logs``. Skips where the install has no ``dask`` command."""
    dask = VENV_BIN / "dask"
    if not dask.exists():
        pytest.skip(f"no dask command in {VENV_BIN}")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [_start([str(dask), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                     "--dashboard-address", ":0"], env, logs / "scheduler.log")]  # fmt: skip
    try:
        for i in range(workers):
            worker = [str(dask), "worker", address, "--nthreads", "1", "--dashboard-address", ":0"]
            procs.append(_start(worker, env, logs / f"w{i}.log"))
        yield address, procs[1:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait()


def kill_worker(worker: subprocess.Popen[bytes]) -> None:
    """SIGKILL a worker's whole process group (nanny and worker process): no cleanup."""
    os.killpg(worker.pid, signal.SIGKILL)
