"""Cohort throughput: cases per minute of ``medseg preprocess`` by where the cases run.

Preprocesses a real manifest (default ``data_manifests/brats2013.json``, five BraTS cases)
into a fresh cache each time, with

- the sequential path (every case in this process),
- ``--workers 1`` and ``--workers 2`` (local worker processes),
- one and two Dask workers (``distributed.LocalCluster``, one thread and one process each),

and prints cases/minute with the ratio against the sequential path. The Dask figures include
connecting to an already running cluster, not starting it. Then the scheduler's overhead per
task: the wall time of ``run_tasks`` over ``--empty`` tasks that do nothing, per task. The
figures count both stages (fingerprint and cases), as ``medseg preprocess`` runs them.

Run: ``.venv/bin/python benchmarks/bench_cohort.py [--manifest M] [--empty 200]``
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

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


def time_preprocess(manifest: Path, where, root: Path) -> float:
    from medseg.manifest import load_manifest
    from medseg.preprocess.cohort import preprocess_cohort

    m = load_manifest(manifest)
    out = Path(tempfile.mkdtemp(dir=root))
    t0 = time.perf_counter()
    preprocess_cohort(m, out, where=where, report=lambda _s: None)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out)
    return seconds


def main() -> None:
    from distributed import LocalCluster

    from medseg.cohort import Where, run_tasks
    from medseg.manifest import load_manifest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", type=Path, default=REPO / "data_manifests" / "brats2013.json")
    ap.add_argument("--empty", type=int, default=200, help="empty tasks for the overhead")
    args = ap.parse_args()
    n = len(load_manifest(args.manifest).cases)
    print(f"machine: {cpu_name()}")
    print(f"manifest: {args.manifest.name}, {n} cases; cases/minute (ratio to sequential)")
    rows: dict[str, float] = {}
    overhead: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, where in (
            ("sequential", Where()),
            ("--workers 1", Where(workers=1)),
            ("--workers 2", Where(workers=2)),
        ):
            rows[name] = time_preprocess(args.manifest, where, Path(tmp))
        overhead["local 2 workers"] = _overhead(Where(workers=2), args.empty, run_tasks)
        for workers in (1, 2):
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                              dashboard_address=":0") as cluster:  # fmt: skip
                where = Where(scheduler=cluster.scheduler_address)
                run_tasks(_nothing, range(workers * 4), key=str, where=where)  # warm workers
                rows[f"Dask {workers} worker(s)"] = time_preprocess(args.manifest, where, Path(tmp))
                overhead[f"Dask {workers} worker(s)"] = _overhead(where, args.empty, run_tasks)
    base = rows["sequential"]
    for name, seconds in rows.items():
        print(f"  {name:<18} {60 * n / seconds:7.1f} cases/min  ({base / seconds:.2f}x)")
    print(f"per-task overhead over {args.empty} empty tasks:")
    for name, seconds in overhead.items():
        print(f"  {name:<18} {1000 * seconds:7.2f} ms/task")


def _overhead(where, count: int, run_tasks) -> float:
    t0 = time.perf_counter()
    run_tasks(_nothing, range(count), key=str, where=where)
    return (time.perf_counter() - t0) / count


if __name__ == "__main__":
    main()
