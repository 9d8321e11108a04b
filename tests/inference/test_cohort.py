"""Cohorts and the infer command: case discovery, shards, files written, bad inputs; the same
bytes in this process, in worker processes and on Dask; finished cases skipped; the model
loaded once per worker process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.cohort import Where
from medseg.errors import MedsegError
from medseg.inference import cohort as cohort_module
from medseg.inference.cohort import (
    CaseInput,
    InferSettings,
    discover_cases,
    probabilities_path,
    run_cohort,
    select_shard,
)
from medseg.io import read_volume, write_volume
from medseg.runtime import native_bf16
from medseg.volume import Grid, Volume
from tests.dask_commands import dask_command_cluster, kill_worker
from tests.inference.helpers import Evil, make_plan, model_folder, random_unet, run_cli
from tests.test_cohort import dask_cluster as dask_cluster  # the shared fixture

REPO = Path(__file__).resolve().parents[2]


def test_cli_infer_writes_labels_on_input_grid(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = make_plan(depth=1, base=2, label_values=(0, 255), orientation=("R", "A", "S"))
    folder, _ = model_folder(tmp_path, plan)
    scan_path = data_root / "nrrd/brain1/image.nrrd"
    out = tmp_path / "pred.nrrd"
    code, _, err = run_cli(
        [
            "infer",
            "--volume",
            str(scan_path),
            "--model",
            str(folder),
            "--output",
            str(out),
            "--device",
            "cpu",
            "--tile-size",
            "64",
            "--save-probabilities",
        ],
        capsys,
    )
    assert code == 0, err
    scan, pred = read_volume(scan_path), read_volume(out)
    assert pred.grid.shape == scan.grid.shape
    assert np.abs(pred.grid.affine - scan.grid.affine).max() <= 1e-4
    assert set(np.unique(pred.array)) <= {0, 255}
    probs = read_volume(probabilities_path(out))
    assert probs.array.shape == (2, *scan.grid.shape)


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="this CPU has no native bf16")
def test_cli_infer_bf16_gives_the_float32_labels_but_for_near_ties(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = make_plan(dims=2, channels=3, depth=2, base=4, label_values=(0, 255))
    folder, _ = model_folder(tmp_path, plan)
    scan = data_root / "drive/training/images/21_training.tif"
    labels = {}
    for precision in ("float32", "bf16"):
        out = tmp_path / f"{precision}.png"
        args = ["infer", "--volume", str(scan), "--model", str(folder), "--output", str(out)]
        code, _, err = run_cli([*args, "--device", "cpu", "--precision", precision], capsys)
        assert code == 0, err
        labels[precision] = read_volume(out).array
    agree = (labels["float32"] == labels["bf16"]).mean()
    assert 0.97 < agree < 1.0, agree


def _no_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_cli_bad_inputs_one_line_exit_2_nothing_written(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scan = str(data_root / "ct_examples/totalseg_example_ct_3mm/ct.nii.gz")
    outdir = tmp_path / "out"
    outdir.mkdir()
    folder, net = model_folder(tmp_path, make_plan(depth=1, channels=2))
    no_plan = tmp_path / "noplan"
    no_plan.mkdir()
    torch.save(net.state_dict(), no_plan / "model.pt")
    evil = tmp_path / "evil"
    evil.mkdir()
    make_plan(depth=1, channels=2).save(evil / "plan.json")
    torch.save({"w": Evil()}, evil / "model.pt")
    two_channels = ["--volume", scan, "--volume", scan]
    good = ["--model", str(folder), *two_channels]
    cases = {
        "plan.json not found": ["--model", str(no_plan), *two_channels],
        "refused": ["--model", str(evil), *two_channels],
        "channel": ["--model", str(folder), "--volume", scan],
        "--precision 'fp8'": [*good, "--precision", "fp8"],
        "does not exist": [*good, "--output", str(tmp_path / "missing" / "p.nii.gz")],
        "run cohorts": [*good, "--workers", "2"],
    }
    cohort = ["--input-dir", str(tmp_path / "noplan"), "--output", str(outdir)]
    cohorts = {  # checked in this process before any worker starts: no log, no file
        "refused": ["--model", str(evil), *cohort, "--workers", "2"],
        "fp8": [*good[:2], *cohort, "--precision", "fp8", "--workers", "2"],
    }
    for what, args in [*cases.items(), *cohorts.items()]:
        if "--output" not in args:
            args = [*args, "--output", str(outdir / "pred.nii.gz")]
        code, out, err = run_cli(["infer", "--device", "cpu", *args], capsys)
        assert code == 2, (what, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("medseg: error:") and what in lines[0]
        assert "EXECUTED" not in out
        assert _no_files(outdir) == []


def test_cli_cohort_finishes_good_cases_lists_bad_and_skips_done(
    image_volume: Volume, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = make_plan(depth=1, base=2, channels=2, orientation=("R", "A", "S"))
    folder, _ = model_folder(tmp_path, plan)
    inp = tmp_path / "in"
    inp.mkdir()
    for case in ("a", "b"):
        for ch in range(2):
            write_volume(image_volume, inp / f"{case}_{ch:04d}.nii.gz")
    (inp / "c_0000.nii.gz").write_bytes(b"not a nifti")
    (inp / "c_0001.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "out"
    out.mkdir()
    args = [
        "infer",
        "--input-dir",
        str(inp),
        "--model",
        str(folder),
        "--output",
        str(out),
        "--device",
        "cpu",
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 1
    assert "failed: c:" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz", "infer.log"]
    assert "c: FAILED" in (out / "infer.log").read_text()
    pred = read_volume(out / "a.nii.gz")
    assert pred.grid.allclose(image_volume.grid, 1e-4)
    (inp / "c_0000.nii.gz").unlink()
    (inp / "c_0001.nii.gz").unlink()
    before = (out / "a.nii.gz").stat().st_mtime_ns
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "0 cases written, 2 skipped" in stdout
    assert (out / "a.nii.gz").stat().st_mtime_ns == before
    code, stdout, _ = run_cli([*args, "--overwrite", "--shard", "1/2"], capsys)
    assert code == 0 and "1 cases written" in stdout
    assert "infer 1/1 b: done" in (out / "infer-1of2.log").read_text()  # a log per shard


def test_discover_cases_and_shards(tmp_path: Path) -> None:
    for name in ("x_0000.nii.gz", "x_0001.nii.gz", "y_0000.nii.gz", "y_0001.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    cases = discover_cases(tmp_path, 2)
    assert [(c.case_id, [p.name for p in c.images]) for c in cases] == [
        ("x", ["x_0000.nii.gz", "x_0001.nii.gz"]),
        ("y", ["y_0000.nii.gz", "y_0001.nii.gz"]),
    ]
    items = list(range(10))
    shards = [select_shard(items, f"{i}/3") for i in range(3)]
    assert sorted(sum(shards, [])) == items and shards[1] == [1, 4, 7]
    with pytest.raises(MedsegError):
        select_shard(items, "3/3")


# -- cohorts as tasks: where they run, what a rerun skips -----------------------------------------
def _cohort(folder: Path, n: int, seed: int = 0, size: int = 20) -> list[CaseInput]:
    """``n`` one-channel cases of different sizes (as scans differ), the first ``size``
    voxels along I."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    cases = []
    for i in range(n):
        shape = (size + 3 * i, size - 2 + 2 * i, size // 2 - 1 + i)
        grid = Grid.from_spacing(shape, (0.8, 0.7, 2.5), (12.0, -40.0, 7.5 + i))
        arr = rng.normal(0.0, 1.0, size=(1, *shape)).astype(np.float32)
        write_volume(Volume(arr, grid), folder / f"case{i}.nii.gz")
        cases.append(CaseInput(f"case{i}", [folder / f"case{i}.nii.gz"]))
    return cases


def _digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every output file, not the progress log (it holds times)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.endswith(".log")
    }


def test_cohort_bytes_match_sequential_on_workers_and_dask_model_loaded_once_per_worker(
    tmp_path: Path, dask_cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = make_plan(depth=1, base=2, orientation=("R", "A", "S"), target_spacing=(1.0, 1.0, 2.0))
    folder, _ = model_folder(tmp_path, plan)
    cases = _cohort(tmp_path / "in", 5)
    settings = InferSettings(folder, device="cpu", save_probabilities=True)
    places = {"w1": Where(workers=1), "w2": Where(workers=2),
              "dask": Where(scheduler=dask_cluster), "seq": Where()}  # fmt: skip
    # the model and the allocator settings it runs with, loaded in this process (workers are
    # spawned: not patched)
    switched: list[str] = []
    real = cohort_module.load_for_infer

    def spy(*args: object) -> object:
        switched.append("loaded here")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(cohort_module, "load_for_infer", spy)
    digests = {}
    for name, where in places.items():
        (tmp_path / name).mkdir()
        threads = (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"))
        outcome = run_cohort(cases, settings, tmp_path / name, where=where)
        if name != "seq":  # allocator and threads are the workers' business, not this process's
            assert not switched
            assert (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")) == threads
        assert list(outcome.done) == [c.case_id for c in cases] and not outcome.skipped
        digests[name] = _digests(tmp_path / name)
        workers = {d.worker for d in outcome.done.values()}
        assert (os.getpid() in workers) == (name == "seq")
        # the model: loaded by the first case of each worker process, not once per case
        assert sum(d.loaded_model for d in outcome.done.values()) <= len(workers)
        if name != "dask":  # Dask workers live on: they may hold it from an earlier test
            assert sum(d.loaded_model for d in outcome.done.values()) == len(workers)
    assert switched == ["loaded here"]  # in this process only when the cases ran here
    assert len(digests["seq"]) == 2 * len(cases)  # labels and probabilities
    for name in ("w1", "w2", "dask"):
        assert digests[name] == digests["seq"], name
    labels = read_volume(tmp_path / "seq" / "case3.nii.gz")
    assert labels.grid.allclose(read_volume(cases[3].images[0]).grid, 1e-4)


def _age(path: Path, than: Path) -> None:
    """Set ``path``'s modification time one second before ``than``'s."""
    t = than.stat().st_mtime_ns - 10**9
    os.utime(path, ns=(t, t))


def test_finished_cases_are_skipped_until_the_model_or_an_input_is_newer(tmp_path: Path) -> None:
    plan = make_plan(depth=1, base=2)
    folder, _ = model_folder(tmp_path, plan)
    cases = _cohort(tmp_path / "in", 3)
    out = tmp_path / "out"
    out.mkdir()
    settings = InferSettings(folder, device="cpu")
    assert sorted(run_cohort(cases, settings, out).done) == ["case0", "case1", "case2"]
    again = run_cohort(cases, settings, out)
    assert not again.done and again.skipped == ["case0", "case1", "case2"]
    # an output older than its input (the input rewritten since): that case runs again
    _age(out / "case1.nii.gz", cases[1].images[0])
    assert list(run_cohort(cases, settings, out).done) == ["case1"]
    # outputs older than the model's weights (retrained since): every case runs again
    for p in out.glob("*.nii.gz"):
        _age(p, folder / "model.pt")
    assert list(run_cohort(cases, settings, out).done) == ["case0", "case1", "case2"]
    # probabilities asked for but missing: not finished
    with_probs = InferSettings(folder, device="cpu", save_probabilities=True)
    assert list(run_cohort(cases[:1], with_probs, out).done) == ["case0"]
    assert probabilities_path(out / "case0.nii.gz").exists()
    assert run_cohort(cases[:1], with_probs, out).skipped == ["case0"]


@pytest.mark.slow
def test_infer_on_dask_scheduler_and_workers_from_the_install_survives_a_killed_worker(
    tmp_path: Path,
) -> None:
    """As the issue checks preprocess: `dask scheduler`, two `dask worker --nthreads 1`; one
    worker killed mid-run; a rerun completes the cohort with the sequential run's bytes."""
    folder, _ = model_folder(tmp_path, make_plan(depth=1, base=4))
    _cohort(tmp_path / "in", 12, size=48)  # cases long enough to kill a worker mid-run
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    with dask_command_cluster(tmp_path, env) as (address, workers):
        cli = [sys.executable, "-m", "medseg.cli", "infer", "--input-dir", str(tmp_path / "in"),
               "--model", str(folder), "--device", "cpu"]  # fmt: skip
        (tmp_path / "seq").mkdir()
        seq = subprocess.run([*cli, "--output", str(tmp_path / "seq")], env=env, check=False)
        assert seq.returncode == 0
        out = tmp_path / "dask"
        out.mkdir()
        run = subprocess.Popen([*cli, "--output", str(out), "--scheduler", address], env=env)
        # kill one worker once the first case is written
        while not list(out.glob("*.nii.gz")) and run.poll() is None:
            time.sleep(0.1)
        kill_worker(workers[0])
        run.wait()
        rerun = subprocess.run([*cli, "--output", str(out), "--scheduler", address], env=env)
        assert rerun.returncode == 0
        assert _digests(out) == _digests(tmp_path / "seq") and len(_digests(out)) == 12
        assert "12 case(s)" in (out / "infer.log").read_text()


def test_any_exception_in_one_case_fails_only_that_case(
    image_volume: Volume,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Out of memory (or any bug) in one case: the others are written, the case is listed with
    its cause, the counts are reported, exit 1, no traceback."""
    import medseg.inference.cohort as cohort

    folder, _ = model_folder(tmp_path, make_plan(depth=1, base=2))
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    for case in ("a", "b", "c"):
        write_volume(image_volume, inp / f"{case}.nii.gz")
    real = cohort.predict_case

    def predict(images, loaded, **kw):  # type: ignore[no-untyped-def]
        if images[0].meta["source"].endswith("b.nii.gz"):
            raise MemoryError("cannot allocate 64 GiB")
        return real(images, loaded, **kw)

    monkeypatch.setattr(cohort, "predict_case", predict)
    args = ["infer", "--input-dir", str(inp), "--model", str(folder), "--output", str(out)]
    code, _, err = run_cli([*args, "--device", "cpu"], capsys)
    assert code == 1 and "Traceback" not in err
    assert "failed: b: MemoryError: cannot allocate 64 GiB" in err
    assert "1 of 3 cases failed; 2 written to" in err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a.nii.gz", "c.nii.gz"]


def test_a_model_retrained_into_its_folder_is_loaded_anew_and_the_old_one_dropped(
    tmp_path: Path,
) -> None:
    from medseg import cohort

    plan = make_plan(depth=1, base=2)
    folder, _ = model_folder(tmp_path, plan)
    cases = _cohort(tmp_path / "in", 2)
    out = tmp_path / "out"
    out.mkdir()
    settings = InferSettings(folder, device="cpu")
    first = run_cohort(cases, settings, out)
    assert [d.loaded_model for d in first.done.values()] == [True, False]  # once, not per case
    # new weights, written a second later than the first ones (whatever the clock's grain)
    before = (folder / "model.pt").stat().st_mtime_ns
    torch.save(random_unet(3, 1, 2, depth=1, base=2, seed=1).state_dict(), folder / "model.pt")
    os.utime(folder / "model.pt", ns=(before + 10**9, before + 10**9))
    second = run_cohort(cases, settings, out, overwrite=True)
    assert [d.loaded_model for d in second.done.values()] == [True, False]
    kept = [k for k in cohort._CACHE if isinstance(k, tuple) and k[1] == str(folder.resolve())]
    assert len(kept) == 1
