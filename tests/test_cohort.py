"""run_tasks: the same results in this process, in local worker processes and on a Dask cluster;
dead workers cost only their case, raising cases are listed, finished cases are skipped, worker
setup and caches live in the worker processes.

Task functions are module-level so that spawned workers import them; they count their calls
with one file per call under a folder the test names, since calls happen in other processes.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from functools import partial
from pathlib import Path

import pytest

from medseg.cohort import CaseEvent, Where, WorkerSetup, cached, run_tasks

REPO = Path(__file__).resolve().parents[1]


def _mark(folder: str, name: str) -> None:
    Path(folder, f"{name}.{uuid.uuid4().hex}").touch()


def _calls(folder: Path, name: str) -> int:
    return len(list(folder.glob(f"{name}.*")))


def square(folder: str, x: int) -> tuple[int, int]:
    _mark(folder, f"call-{x}")
    return x * x, os.getpid()


def die_once(folder: str, x: int) -> int:
    """Kill this worker process the first time case ``x == 3`` runs (SIGKILL: no cleanup)."""
    _mark(folder, f"call-{x}")
    if x == 3 and not Path(folder, "died").exists():
        Path(folder, "died").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def always_die(folder: str, x: int) -> int:
    _mark(folder, f"call-{x}")
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def raise_on_two(folder: str, x: int) -> int:
    _mark(folder, f"call-{x}")
    if x == 2:
        raise ValueError(f"case {x} has no label")
    return x * x


def note_setup(folder: str) -> None:
    _mark(folder, f"setup-{os.getpid()}")


def setup_and_cache(folder: str, x: int) -> tuple[int, str, int]:
    model = cached(("model", folder), partial(_load, folder))
    return os.getpid(), os.environ.get("OMP_NUM_THREADS", ""), model


def _load(folder: str) -> int:
    _mark(folder, f"load-{os.getpid()}")
    return 42


def wait_for_others(folder: str, x: int) -> bool:
    """Case 0 runs until cases 1..5 are done (True), which on two workers happens only if the
    other worker takes them all while this one is busy; gives up after a minute (False)."""
    if x != 0:
        _mark(folder, f"done-{x}")
        return True
    for _ in range(600):
        if all(_calls(Path(folder), f"done-{i}") for i in range(1, 6)):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def dask_cluster():
    """An in-process Dask scheduler with two single-thread worker processes."""
    distributed = pytest.importorskip("distributed")
    import dask

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), old) if p)
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 1}),
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
    ):
        yield cluster.scheduler_address
    if old is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = old


def _places(request: pytest.FixtureRequest) -> list[Where]:
    return [Where(), Where(workers=2), Where(scheduler=request.getfixturevalue("dask_cluster"))]


@pytest.mark.parametrize("place", ["sequential", "local", "dask"])
def test_every_place_returns_the_same_results_keyed_by_case(request, tmp_path, place) -> None:
    where = dict(zip(["sequential", "local", "dask"], _places(request), strict=True))[place]
    events: list[CaseEvent] = []
    out = run_tasks(partial(square, str(tmp_path)), range(6), key=str, where=where,
                    on_event=events.append)  # fmt: skip
    assert {k: v[0] for k, v in out.results.items()} == {str(x): x * x for x in range(6)}
    assert not out.failures and not out.skipped
    pids = {v[1] for v in out.results.values()}
    if place == "sequential":
        assert pids == {os.getpid()}
    else:  # worker processes, not this one
        assert os.getpid() not in pids
    assert sorted(e.done for e in events) == list(range(1, 7))
    assert all(e.total == 6 and e.status == "done" for e in events)
    assert events[-1].workers == (1 if place == "sequential" else 2)


@pytest.mark.parametrize("place", ["local", "dask"])
def test_a_dead_worker_loses_only_its_case_which_runs_again(request, tmp_path, place) -> None:
    where = (
        Where(workers=2)
        if place == "local"
        else Where(scheduler=request.getfixturevalue("dask_cluster"))
    )  # noqa: E501
    out = run_tasks(partial(die_once, str(tmp_path)), range(6), key=str, where=where)
    assert out.results == {str(x): x * x for x in range(6)} and not out.failures
    assert _calls(tmp_path, "call-3") == 2  # killed once, then run elsewhere
    if place == "local":
        assert out.retried == ["3"]
        for x in (0, 1, 2, 4, 5):
            assert _calls(tmp_path, f"call-{x}") == 1  # the others never ran twice
    # Dask also recomputes finished cases whose results sat on the dead worker, not yet
    # gathered: their files are rewritten with the same bytes


def test_a_case_that_kills_every_worker_is_listed_once_retried(tmp_path) -> None:
    out = run_tasks(partial(always_die, str(tmp_path)), range(5), key=str, where=Where(workers=2))
    assert set(out.results) == {"0", "1", "2", "4"}
    assert list(out.failures) == ["3"] and "worker process died" in out.failures["3"]
    assert _calls(tmp_path, "call-3") == 2


@pytest.mark.parametrize("place", ["sequential", "local", "dask"])
def test_a_raising_case_is_listed_with_its_cause_not_retried(request, tmp_path, place) -> None:
    where = dict(zip(["sequential", "local", "dask"], _places(request), strict=True))[place]
    out = run_tasks(partial(raise_on_two, str(tmp_path)), range(5), key=str, where=where)
    assert out.failures == {"2": "ValueError: case 2 has no label"}
    assert out.results == {str(x): x * x for x in (0, 1, 3, 4)}
    assert _calls(tmp_path, "call-2") == 1


def test_finished_cases_are_not_run(tmp_path) -> None:
    out = run_tasks(partial(square, str(tmp_path)), range(6), key=str, where=Where(workers=2),
                    finished=lambda x: x % 2 == 0)  # fmt: skip
    assert out.skipped == ["0", "2", "4"] and sorted(out.results) == ["1", "3", "5"]
    assert [_calls(tmp_path, f"call-{x}") for x in range(6)] == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("place", ["local", "dask"])
def test_setup_and_cache_run_once_per_worker_process_not_here(request, tmp_path, place) -> None:
    where = (
        Where(workers=2)
        if place == "local"
        else Where(scheduler=request.getfixturevalue("dask_cluster"), threads=1)
    )  # noqa: E501
    threads_here = os.environ.get("OMP_NUM_THREADS")
    setup = WorkerSetup(threads=1, hook=partial(note_setup, str(tmp_path)))
    out = run_tasks(partial(setup_and_cache, str(tmp_path)), range(8), key=str, where=where,
                    setup=setup)  # fmt: skip
    pids = {v[0] for v in out.results.values()}
    assert os.getpid() not in pids and all(v[1:] == ("1", 42) for v in out.results.values())
    setups = sorted(p.name.split(".")[0] for p in tmp_path.glob("setup-*"))
    loads = sorted(p.name.split(".")[0] for p in tmp_path.glob("load-*"))
    assert setups == sorted(f"setup-{p}" for p in pids)  # once in every worker that ran
    assert loads == sorted(f"load-{p}" for p in pids)  # the model: once per worker, not per case
    assert os.environ.get("OMP_NUM_THREADS") == threads_here  # this process untouched


def test_local_workers_balance_load_dynamically(tmp_path) -> None:
    out = run_tasks(partial(wait_for_others, str(tmp_path)), range(6), key=str,
                    where=Where(workers=2))  # fmt: skip
    # a static split (three cases each) would leave cases behind the long case 0
    assert out.results["0"] is True
