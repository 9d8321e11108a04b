"""The real ``torchrun --nproc_per_node=2 -m medseg.cli train`` on the CPU (gloo).

Both ranks must end with identical weights, and only rank 0 may write. The command runs
unchanged; a ``sitecustomize`` module on the ranks' ``PYTHONPATH`` only observes: it records
every path each rank writes through ``medseg.atomic`` and saves each rank's final weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.synthetic import write_synthetic_cache

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"

PROBE = """
import os
if os.environ.get("MEDSEG_PROBE") and "RANK" in os.environ:
    import atexit, contextlib, json, pathlib
    import torch
    import medseg.atomic as atomic
    import medseg.training as training

    probe = pathlib.Path(os.environ["MEDSEG_PROBE"])
    rank = os.environ["RANK"]
    writes = []
    real_atomic_path, real_train = atomic.atomic_path, training.train

    @contextlib.contextmanager
    def recorded(path):
        writes.append(str(path))
        with real_atomic_path(path) as tmp:
            yield tmp

    def train(*args, **kwargs):
        result = real_train(*args, **kwargs)
        torch.save(result.model.state_dict(), probe / f"weights{rank}.pt")
        return result

    atomic.atomic_path, training.train = recorded, train
    atexit.register(lambda: (probe / f"writes{rank}.json").write_text(json.dumps(writes)))
"""


def test_torchrun_two_cpu_ranks_end_identical_and_only_rank0_writes(
    tmp_path: Path, pipeline_toml
) -> None:
    if not TORCHRUN.exists() or not torch.distributed.is_gloo_available():
        pytest.skip("torchrun or gloo not available")
    prep = tmp_path / "prep"
    write_synthetic_cache(prep)
    toml = pipeline_toml(prep, train={"iterations_per_epoch": 3, "batch_size": 2, "workers": 0})
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    path = os.pathsep.join([str(probe), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "MEDSEG_PROBE": str(probe)}
    run = tmp_path / "run"
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "medseg.cli", "train",
           "--pipeline", str(toml), "--out", str(run), "--device", "cpu", "--fold", "0",
           "--epochs", "2"]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    w0 = torch.load(probe / "weights0.pt", weights_only=True)
    w1 = torch.load(probe / "weights1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # the run folder holds rank 0's model: equal to both ranks' final weights
    saved = torch.load(run / "checkpoint_last.pt", weights_only=True)
    assert saved["step"] == 6 and saved["sampler"]["world_size"] == 2
    for k, v in saved["model"].items():
        assert torch.equal(v, w0[k]), k

    writes0 = json.loads((probe / "writes0.json").read_text())
    writes1 = json.loads((probe / "writes1.json").read_text())
    assert writes1 == []  # rank 1 writes nothing
    written = {Path(p).relative_to(run).as_posix() for p in writes0 if Path(p).is_relative_to(run)}
    on_disk = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    assert {"model.pt", "checkpoint_last.pt", "training.json", "train_log.csv"} <= on_disk
    assert on_disk <= written  # every file in the run folder came from rank 0
    assert json.loads((run / "training.json").read_text())["world_size"] == 2
