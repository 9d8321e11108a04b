"""Run a cohort's cases as tasks: in this process, in local worker processes, or on a Dask cluster.

One driver serves every command that works case by case (preprocess today; infer and evaluate
through the same :func:`run_tasks`)::

    result = run_tasks(fn, items, key=lambda c: c.case_id, finished=is_done,
                       where=Where(workers=4))          # or Where(scheduler="tcp://host:8786")
    result.results   # case -> fn(item), for the cases that ran
    result.failures  # case -> cause, one line each
    result.skipped   # cases ``finished`` said were done already

- Every case is submitted at once and gathered as it completes, so a worker that finishes early
  takes the next case (dynamic load balancing; scans differ ten-fold in size).
- A case whose worker process dies is run once more in a fresh process: the local pool gives
  each worker its own one-process executor, so a death breaks that worker's case alone. On Dask
  the scheduler itself reschedules a dead worker's task (``distributed.scheduler.allowed-failures``,
  3 by default; set it to 1 for exactly one retry) and reports ``KilledWorker`` after that.
- Any exception a case raises is caught and listed with its cause; the other cases finish. A
  case that raised is not retried: its input would raise again.
- :class:`WorkerSetup` (thread count, a hook for allocator settings or a preloaded model) runs
  once per worker process, in the worker, before its first case; :func:`cached` keeps a value
  (a model) per worker process so that it is loaded once, not once per case.

Results do not depend on where or in which order cases ran: each case writes its own files, and
the caller orders anything it aggregates (by manifest order or case id), never by completion.
Dask: https://distributed.dask.org (Rocklin, "Dask: Parallel Computation with Blocked
algorithms and Task Scheduling", SciPy 2015).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Environment variables that size the thread pools of OpenMP, BLAS and torch when they load.
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# -- where cases run -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Where:
    """Where a cohort's cases run.

    ``scheduler`` (a Dask scheduler address, ``tcp://host:8786``) wins over ``workers``;
    ``workers`` = N starts N local worker processes; neither runs the cases one after another
    in this process. ``threads`` is the thread count of each worker process (torch, OpenMP,
    BLAS): None gives 1 to each local worker and leaves a Dask worker as started.
    """

    workers: int | None = None
    scheduler: str | None = None
    threads: int | None = None

    @property
    def parallel(self) -> bool:
        return self.scheduler is not None or self.workers is not None

    @property
    def worker_threads(self) -> int | None:
        """Threads each worker process should use (None: leave the process as it is)."""
        if self.threads is not None or self.scheduler is not None:
            return self.threads
        return 1 if self.workers is not None else None

    def describe(self) -> str:
        if self.scheduler is not None:
            return f"Dask scheduler {self.scheduler}"
        if self.workers is not None:
            return f"{self.workers} local worker process(es)"
        return "this process"


@dataclass(frozen=True)
class WorkerSetup:
    """Process-wide settings applied once in each worker process, before its first case.

    ``threads`` caps torch, OpenMP and BLAS threads; ``hook`` (a picklable, module-level
    callable) does the rest: allocator settings, loading a model into :func:`cached`.
    """

    threads: int | None = None
    hook: Callable[[], None] | None = None


_APPLIED: set[str] = set()
_CACHE: dict[Any, Any] = {}
_LOCK = threading.Lock()


def set_threads(n: int) -> None:
    """Cap this process's compute threads at ``n``: environment for libraries not loaded yet,
    and torch's intra-op pool if torch is loaded already (this module never imports torch)."""
    for name in _THREAD_ENV:
        os.environ[name] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def _apply_setup(setup: WorkerSetup, token: str) -> None:
    with _LOCK:
        if token in _APPLIED:
            return
        if setup.threads is not None:
            set_threads(setup.threads)
        if setup.hook is not None:
            setup.hook()
        _APPLIED.add(token)


def cached(key: Any, load: Callable[[], R], replaces: Callable[[Any], bool] | None = None) -> R:
    """``load()`` once per worker process and key (e.g. a model folder), then the kept value.

    ``replaces(other_key)``: kept values that a newly loaded one supersedes (an older version
    of the same model), dropped so that a long-lived worker holds one of them."""
    with _LOCK:
        if key not in _CACHE:
            for old in [k for k in _CACHE if replaces is not None and replaces(k)]:
                del _CACHE[old]
            _CACHE[key] = load()
        return _CACHE[key]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _Call(Generic[T, R]):
    """One case as a picklable call: settings first (once per process), then ``fn(item)``."""

    fn: Callable[[T], R]
    item: T
    setup: WorkerSetup | None
    token: str

    def __call__(self) -> R:
        if self.setup is not None:
            _apply_setup(self.setup, self.token)
        return self.fn(self.item)


# -- events and results ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseEvent:
    """What a progress display needs after each case: ``status`` is ``done``, ``failed``,
    ``retry`` (its worker died; it runs again) or ``skipped``; ``seconds`` is wall time since
    the stage started."""

    stage: str
    key: str
    status: str
    done: int
    total: int
    workers: int
    seconds: float
    detail: str = ""


@dataclass
class TaskResults(Generic[R]):
    """Outcome of :func:`run_tasks`: results by key, failures (key -> cause), skipped keys."""

    results: dict[str, R] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    seconds: float = 0.0


def describe_error(exc: BaseException) -> str:
    """One line for a failed case: a ``MedsegError``'s own message, else type and message."""
    from medseg.errors import MedsegError

    if isinstance(exc, MedsegError):
        return str(exc)
    if isinstance(exc, BrokenProcessPool) or type(exc).__name__ == "KilledWorker":
        return f"its worker process died while running it ({type(exc).__name__}: {exc})"
    return f"{type(exc).__name__}: {exc}"


# -- pools -----------------------------------------------------------------------------------------
Outcome = tuple[str, Any, BaseException | None, bool]  # key, result, error, worker lost


class _Pool(Protocol):
    def submit(self, key: str, call: Callable[[], Any]) -> None: ...
    def next_done(self) -> Outcome: ...
    def workers(self) -> int: ...
    def close(self) -> None: ...


class _InProcess:
    """The sequential reference: cases run here, one after another, in submission order."""

    def __init__(self) -> None:
        self._queue: deque[tuple[str, Callable[[], Any]]] = deque()

    def submit(self, key: str, call: Callable[[], Any]) -> None:
        self._queue.append((key, call))

    def next_done(self) -> Outcome:
        key, call = self._queue.popleft()
        try:
            return key, call(), None, False
        except Exception as exc:  # noqa: BLE001 - a cohort finishes the other cases
            return key, None, exc, False

    def workers(self) -> int:
        return 1

    def close(self) -> None:
        self._queue.clear()


class _LocalProcesses:
    """``n`` worker processes, each its own one-process executor, fed one case at a time.

    A process that dies breaks only its own executor, so only the case it was running is
    lost; that worker is replaced by a fresh process. Processes are spawned, not forked: each
    starts clean, like a Dask worker, and applies its :class:`WorkerSetup` itself.
    """

    def __init__(self, n: int) -> None:
        import multiprocessing

        self._ctx = multiprocessing.get_context("spawn")
        self._slots: list[ProcessPoolExecutor] = [self._new() for _ in range(n)]
        self._busy: dict[Future[Any], tuple[int, str]] = {}
        self._queue: deque[tuple[str, Callable[[], Any]]] = deque()

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=1, mp_context=self._ctx)

    def _feed(self) -> None:
        idle = set(range(len(self._slots))) - {slot for slot, _ in self._busy.values()}
        for slot in sorted(idle):
            if not self._queue:
                return
            key, call = self._queue.popleft()
            try:
                fut = self._slots[slot].submit(call)
            except BrokenProcessPool:
                self._slots[slot] = self._new()
                fut = self._slots[slot].submit(call)
            self._busy[fut] = (slot, key)

    def submit(self, key: str, call: Callable[[], Any]) -> None:
        self._queue.append((key, call))
        self._feed()

    def next_done(self) -> Outcome:
        done, _ = wait(list(self._busy), return_when=FIRST_COMPLETED)
        fut = min(done, key=lambda f: self._busy[f][0])
        slot, key = self._busy.pop(fut)
        error = fut.exception()
        lost = isinstance(error, BrokenProcessPool)
        if lost:
            self._slots[slot].shutdown(wait=False, cancel_futures=True)
            self._slots[slot] = self._new()
        self._feed()
        return key, None if error else fut.result(), error, lost

    def workers(self) -> int:
        return len(self._slots)

    def close(self) -> None:
        for ex in self._slots:
            ex.shutdown(wait=True, cancel_futures=True)


class _Dask:
    """Cases as tasks of a running Dask scheduler; the scheduler balances and reschedules."""

    def __init__(self, address: str) -> None:
        from distributed import Client, as_completed

        from medseg.errors import CohortError

        try:
            self._client = Client(address, set_as_default=False, timeout=30)
        except OSError as exc:
            raise CohortError(
                f"--scheduler {address}: no Dask scheduler answers there ({exc}); start one "
                "with `dask scheduler` and check the address"
            ) from exc
        self._done = as_completed(loop=self._client.loop)
        self._keys: dict[Any, str] = {}
        self._count = (0.0, 0)

    def submit(self, key: str, call: Callable[[], Any]) -> None:
        # a fresh task key per submission: results of an earlier run are never reused
        fut = self._client.submit(call, key=f"medseg-{key}-{uuid.uuid4().hex}", pure=False)
        self._keys[fut.key] = key
        self._done.add(fut)

    def next_done(self) -> Outcome:
        fut = next(self._done)
        key = self._keys.pop(fut.key)
        if fut.status != "cancelled":
            # finished, or an error; a result lost with its worker since is recomputed
            try:
                return key, fut.result(), None, False
            except Exception as exc:  # the task's own error, raised again by Dask
                fut.release()
                return key, None, exc, False
        fut.release()
        # a cancelled task has no result and no error of its own: run it again (once)
        return key, None, RuntimeError("Dask cancelled the task (its worker was lost)"), True

    def workers(self) -> int:
        now = time.monotonic()
        if now - self._count[0] > 1.0:  # one scheduler round trip a second at most
            self._count = (now, len(self._client.nthreads()))
        return self._count[1]

    def close(self) -> None:
        self._client.close()


def _pool(where: Where) -> _Pool:
    if where.scheduler is not None:
        return _Dask(where.scheduler)
    if where.workers is not None:
        return _LocalProcesses(where.workers)
    return _InProcess()


# -- the driver ------------------------------------------------------------------------------------
def run_tasks(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    key: Callable[[T], str],
    where: Where | None = None,
    finished: Callable[[T], bool] | None = None,
    setup: WorkerSetup | None = None,
    stage: str = "cases",
    on_event: Callable[[CaseEvent], None] | None = None,
    retries: int = 1,
) -> TaskResults[R]:
    """Run ``fn(item)`` for every item whose ``finished(item)`` is not true; never raises for
    a case.

    ``fn`` and the items must be picklable (module-level functions, ``functools.partial`` of
    them) when cases run in worker processes. ``setup`` defaults to ``where``'s thread count;
    in this process (``Where()``) only an explicit ``setup`` is applied. A case whose worker
    died runs ``retries`` more times (local processes; Dask reschedules by itself).
    """
    where = where or Where()
    if setup is None and where.worker_threads is not None:
        setup = WorkerSetup(threads=where.worker_threads)
    token = hashlib.sha256(pickle.dumps(setup)).hexdigest() if setup is not None else ""
    out: TaskResults[R] = TaskResults()
    todo: list[tuple[str, T]] = []
    for item in items:
        k = key(item)
        if finished is not None and finished(item):
            out.skipped.append(k)
        else:
            todo.append((k, item))
    t0 = time.perf_counter()
    if not todo:
        return out
    pool = _pool(where)
    try:
        for event in _drive(pool, todo, fn, setup, token, retries, out, stage, t0):
            if on_event is not None:
                on_event(event)
    finally:
        pool.close()
    out.seconds = time.perf_counter() - t0
    return out


def _drive(
    pool: _Pool,
    todo: list[tuple[str, T]],
    fn: Callable[[T], R],
    setup: WorkerSetup | None,
    token: str,
    retries: int,
    out: TaskResults[R],
    stage: str,
    t0: float,
) -> Iterator[CaseEvent]:
    calls = {k: _Call(fn, item, setup, token) for k, item in todo}
    for k in calls:
        pool.submit(k, calls[k])
    attempts = dict.fromkeys(calls, 0)
    pending = len(calls)
    while pending:
        k, res, error, lost = pool.next_done()
        if error is None:
            out.results[k] = res
            status, detail = "done", ""
        elif lost and attempts[k] < retries:
            attempts[k] += 1
            out.retried.append(k)
            pool.submit(k, calls[k])
            status, detail = "retry", describe_error(error)
        else:
            out.failures[k] = describe_error(error)
            status, detail = "failed", out.failures[k]
        pending -= status != "retry"
        done = len(out.results) + len(out.failures)
        seconds = time.perf_counter() - t0
        yield CaseEvent(stage, k, status, done, len(calls), pool.workers(), seconds, detail)


# -- progress --------------------------------------------------------------------------------------
class CaseLog:
    """A rich bar per stage over cases, with the workers' count, and a line per case event in
    ``log_path`` and in the terminal (finished cases on a terminal only).

    The log is rewritten atomically (through :mod:`medseg.atomic`) at most once a second and
    on exit, so a reader always finds whole lines and a long cohort costs few rewrites.
    """

    def __init__(self, console: Any, log_path: os.PathLike[str] | str | None = None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            "workers {task.fields[workers]}",
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._path = log_path
        self._lines: list[str] = []
        self._written = 0.0
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> CaseLog:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(None, None, None)
        self._flush(force=True)

    def line(self, text: str, show: bool | None = True) -> None:
        """Keep ``text`` in the log and print it above the bar (``show`` None: only on a
        terminal, so that pipes and captured output get the command's result lines alone).
        The log is written first: when it cannot be (disk full), the error is the one line
        the user sees."""
        self._lines.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}")
        self._flush()
        if show or (show is None and self._bar.console.is_terminal):
            self._bar.console.print(text, highlight=False, markup=False)

    def __call__(self, event: CaseEvent) -> None:
        if event.stage not in self._tasks:
            self._tasks[event.stage] = self._bar.add_task(event.stage, total=event.total, workers=0)
        self._bar.update(
            self._tasks[event.stage], completed=event.done, total=event.total, workers=event.workers
        )
        what = {"done": "done", "failed": "FAILED", "retry": "worker died, retrying"}
        text = f"{event.stage} {event.done}/{event.total} {event.key}: {what.get(event.status)}"
        text += f" ({event.seconds:.1f} s, {event.workers} workers)"
        # finished cases scroll by on a terminal; failures and retries are printed everywhere
        self.line(text + (f": {event.detail}" if event.detail else ""),
                  show=None if event.status == "done" else True)  # fmt: skip

    def _flush(self, force: bool = False) -> None:
        if self._path is None or not self._lines:
            return  # nothing happened (e.g. refused before the first case): no file
        if not (force or time.monotonic() - self._written > 1.0):
            return
        from medseg import atomic

        atomic.write_text(self._path, "".join(line + "\n" for line in self._lines))
        self._written = time.monotonic()
