"""Cohort throughput: cases per minute of ``medseg preprocess`` and of cohort ``medseg infer``
by where the cases run, the scheduler's overhead per task, and the projected throughput of N
machines.

Runs a real manifest (default ``data_manifests/brats2013.json``, five BraTS cases), each time
into a fresh folder, with

- the sequential path (every case in this process, its default threads),
- ``--workers 1`` and ``--workers 2`` (local worker processes, one thread each),
- one and two Dask workers (``distributed.LocalCluster``, one thread and one process each),

and prints cases/minute (the best of ``--repeats`` rounds, each in another order) with the
ratio against the sequential path and the Dask rows against
the ``--workers`` row with as many workers. Preprocessing counts both stages (fingerprint and
cases), as ``medseg preprocess`` runs them. Inference uses the network the pipeline's plan
gives (default ``pipelines/brats2013.toml``: 2 mm, depth 2, base 16) with seeded random
weights (the time of a forward pass does not depend on the weights), float32 on the CPU, and
includes each worker loading the model once. The Dask figures include connecting to an
already running cluster, not starting it.

Scheduler overhead per task: the wall time of ``run_tasks`` over ``--empty`` tasks that do
nothing, per task. Projection for N machines of w single-thread workers each, from the
measured per-case time t (one Dask worker: its seconds per case) and overhead o::

    cases/min(N) = min(60 * N * w / (t + o), 60 / o)

the second term being the scheduler's own limit (it handles one task at a time); a shared
file system's bandwidth is not modelled.

Run: ``.venv/bin/python benchmarks/bench_cohort.py [--manifest M] [--pipeline P] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU model and its bf16 / AMX flags (lscpu, /proc/cpuinfo)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = re.search(r"Model name:\s*(.+)", out)
        name = model.group(1).strip() if model else platform.processor()
    except OSError:
        name = platform.processor()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    have = sorted({f for f in re.findall(r"\b(avx512_bf16|amx_\w+)\b", flags)})
    return f"{name}, {os.cpu_count()} CPUs, flags: {' '.join(have) or 'no bf16/AMX'}"


def _nothing(x: int) -> int:
    return x


def time_preprocess(manifest: Path, where: Any, root: Path) -> float:
    from medseg.manifest import load_manifest
    from medseg.preprocess.cohort import preprocess_cohort

    m = load_manifest(manifest)
    out = Path(tempfile.mkdtemp(dir=root))
    t0 = time.perf_counter()
    preprocess_cohort(m, out, where=where, report=lambda _s: None)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out)
    return seconds


def make_model(manifest: Path, pipeline: Path, folder: Path) -> Path:
    """A model folder: the plan that preprocessing ``manifest`` with ``pipeline`` derives, and
    that plan's U-Net with seeded random weights."""
    import torch

    from medseg.config import load_pipeline
    from medseg.manifest import load_manifest
    from medseg.model import UNet
    from medseg.preprocess.cohort import preprocess_cohort
    from medseg.preprocess.plan import Plan

    pipe = load_pipeline(pipeline)
    prep = folder / "prep"
    preprocess_cohort(load_manifest(manifest), prep, plan_overrides=pipe.plan,
                      report=lambda _s: None)  # fmt: skip
    run = folder / "model"
    run.mkdir()
    shutil.copy(prep / "plan.json", run / "plan.json")
    torch.manual_seed(0)
    torch.save(UNet(**Plan.load(run / "plan.json").network).state_dict(), run / "model.pt")
    shutil.rmtree(prep)
    return run


#: Seconds per case inside the task, by place (inference; cases that loaded the model left out)
CASE_SECONDS: dict[str, list[float]] = {}


def time_infer(manifest: Path, model: Path, where: Any, root: Path, name: str = "") -> float:
    from medseg.inference.cohort import CaseInput, InferSettings, run_cohort
    from medseg.manifest import load_manifest

    cases = [CaseInput(c.case_id, list(c.images)) for c in load_manifest(manifest).cases]
    out = Path(tempfile.mkdtemp(dir=root))
    t0 = time.perf_counter()
    done = run_cohort(cases, InferSettings(model, device="cpu"), out, where=where).done
    seconds = time.perf_counter() - t0
    shutil.rmtree(out)
    inside = [d.seconds for d in done.values() if not d.loaded_model]
    CASE_SECONDS.setdefault(name, []).extend(inside)
    return seconds


def _overhead(where: Any, count: int, run_tasks: Callable[..., Any]) -> float:
    t0 = time.perf_counter()
    run_tasks(_nothing, range(count), key=str, where=where)
    return (time.perf_counter() - t0) / count


def measure(args: argparse.Namespace, root: Path) -> tuple[dict[str, dict[str, float]], dict]:
    """Seconds per stage (preprocess, infer) and place, the best of ``args.repeats`` rounds
    (each round in another order, as the load of a shared machine drifts); scheduler
    overhead per task."""
    from contextlib import ExitStack

    from distributed import LocalCluster

    from medseg.cohort import Where, run_tasks

    model = make_model(args.manifest, args.pipeline, root) if "infer" in args.stages else None
    timers = {"preprocess": lambda w, _n: time_preprocess(args.manifest, w, root)}
    if model is not None:
        timers["infer"] = lambda w, n: time_infer(args.manifest, model, w, root, n)
    rows: dict[str, dict[str, float]] = {s: {} for s in args.stages}
    overhead: dict[str, float] = {}
    with ExitStack() as stack:
        places = {"sequential": Where(), "--workers 1": Where(workers=1),
                  "--workers 2": Where(workers=2)}  # fmt: skip
        for workers in (1, 2):
            cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1,
                                          processes=True, dashboard_address=":0"))  # fmt: skip
            where = Where(scheduler=cluster.scheduler_address)
            run_tasks(_nothing, range(workers * 4), key=str, where=where)  # warm workers
            places[f"Dask {workers} worker(s)"] = where
        names = list(places)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                for stage in args.stages:
                    seconds = timers[stage](places[name], name)
                    rows[stage][name] = min(seconds, rows[stage].get(name, seconds))
        for name in ("--workers 2", "Dask 1 worker(s)", "Dask 2 worker(s)"):
            overhead[name] = _overhead(places[name], args.empty, run_tasks)
    return {s: {n: rows[s][n] for n in names} for s in rows}, overhead


def report(rows: dict[str, dict[str, float]], overhead: dict[str, float], n: int) -> None:
    for stage, times in rows.items():
        print(f"{stage}: cases/minute (ratio to sequential; Dask to --workers of its size)")
        base = times["sequential"]
        for name, seconds in times.items():
            line = f"  {name:<18} {60 * n / seconds:7.2f} cases/min  ({base / seconds:.2f}x"
            if name.startswith("Dask"):
                local = times[f"--workers {name.split()[1]}"]
                line += f"; {local / seconds:.2f}x of --workers {name.split()[1]}"
            print(line + ")")
    if CASE_SECONDS:
        print("infer: median seconds per case inside the task (cases that loaded the model out)")
        for name, values in CASE_SECONDS.items():
            if values:
                print(f"  {name:<18} {statistics.median(values):7.2f} s  (n={len(values)})")
    print("per-task overhead over empty tasks:")
    for name, seconds in overhead.items():
        print(f"  {name:<18} {1000 * seconds:7.2f} ms/task")
    o = overhead["Dask 2 worker(s)"]
    for stage, times in rows.items():
        t = times["Dask 1 worker(s)"] / n
        print(f"{stage}: projected cases/min = min(60*N*w/(t+o), 60/o), t = {t:.2f} s, "
              f"o = {1000 * o:.2f} ms")  # fmt: skip
        for machines, w in ((1, 2), (10, 8), (100, 8)):
            rate = min(60 * machines * w / (t + o), 60 / o)
            print(f"  N={machines:<4} w={w}: {rate:10.0f} cases/min")


def main() -> None:
    from medseg.manifest import load_manifest

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--manifest", type=Path, default=REPO / "data_manifests" / "brats2013.json")
    ap.add_argument("--pipeline", type=Path, default=REPO / "pipelines" / "brats2013.toml")
    ap.add_argument("--stages", nargs="+", default=["preprocess", "infer"],
                    choices=["preprocess", "infer"])  # fmt: skip
    ap.add_argument("--empty", type=int, default=200, help="empty tasks for the overhead")
    ap.add_argument("--repeats", type=int, default=2, help="rounds; the best time is kept")
    args = ap.parse_args()
    n = len(load_manifest(args.manifest).cases)
    print(f"machine: {cpu_name()}; load average {os.getloadavg()[0]:.1f} at the start")
    print(f"manifest: {args.manifest.name}, {n} cases")
    with tempfile.TemporaryDirectory() as tmp:
        rows, overhead = measure(args, Path(tmp))
    report(rows, overhead, n)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
