"""medseg preprocess on worker processes and Dask: the same cache bytes as the sequential run,
finished cases skipped, failed cases listed (exit 1), a killed worker's case redone.

Byte identity is checked by SHA-256 of every file under the cache; the progress log is the one
file allowed to differ (it holds times), so no cache file may hold a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main
from medseg.cohort import Where
from medseg.manifest import load_manifest
from medseg.preprocess.cohort import preprocess_cohort
from tests.dask_commands import dask_command_cluster, kill_worker
from tests.test_cohort import dask_cluster as dask_cluster  # the shared fixture

REPO = Path(__file__).resolve().parents[2]
LOG = "preprocess.log"


def tree_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` but the progress log, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOG
    }


def test_sequential_local_workers_and_dask_write_identical_caches(
    data_root: Path, tmp_path: Path, dask_cluster: str
) -> None:
    m = load_manifest(REPO / "data_manifests" / "nrrd.json", data_root)
    places = {
        "seq": Where(),
        "local": Where(workers=2),
        "dask": Where(scheduler=dask_cluster),
    }
    digests = {}
    for name, where in places.items():
        res = preprocess_cohort(m, tmp_path / name, where=where, report=lambda _s: None)
        assert sorted(res.done) == sorted(c.case_id for c in m.cases)
        digests[name] = tree_digest(tmp_path / name)
    assert len(digests["seq"]) == 2 + 4 * len(m.cases)  # fingerprint, plan, four files a case
    assert digests["local"] == digests["seq"]
    assert digests["dask"] == digests["seq"]
    # a rerun finds every case finished and touches nothing
    res = preprocess_cohort(m, tmp_path / "local", where=Where(workers=2), report=lambda _s: None)
    assert sorted(res.skipped) == sorted(c.case_id for c in m.cases) and not res.done
    assert tree_digest(tmp_path / "local") == digests["seq"]


def _write_nifti_case(folder: Path, cid: str, seed: int) -> dict:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    img = np.zeros((20, 22, 10), np.float32)
    img[4:16, 3:19, 2:8] = rng.normal(100, 10, size=(12, 16, 6))
    lab = np.zeros(img.shape, np.uint8)
    lab[6:12, 6:14, 3:6] = 1
    aff = np.diag([-1.0, -1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(img, aff), folder / f"{cid}_img.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), folder / f"{cid}_seg.nii.gz")
    return {"case_id": cid, "images": [f"{cid}_img.nii.gz"], "label": f"{cid}_seg.nii.gz"}


def test_cli_finishes_good_cases_lists_the_failed_one_and_skips_on_rerun(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    cases = [_write_nifti_case(data, f"c{i}", i) for i in range(3)]
    (data / "broken_img.nii.gz").write_bytes(b"not a nifti file")
    cases.insert(1, {"case_id": "broken", "images": ["broken_img.nii.gz"], "label": None})
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"name": "syn", "channels": ["T1"], "modalities": ["MR"],
                                    "labels": {"0": "bg", "1": "fg"}, "cases": cases}))  # fmt: skip
    out = tmp_path / "prep"
    args = ["preprocess", "--manifest", str(manifest), "--data-root", str(data), "--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--workers", "2"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "failed: broken:" in err and "broken_img.nii.gz" in err
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["c0", "c1", "c2"]
    log = (out / LOG).read_text()
    assert "broken: FAILED" in log and "preprocess 3/3" in log
    with pytest.raises(SystemExit) as exc:
        main([*args, "--workers", "2"])
    assert exc.value.code == 1
    assert "3 case(s) up to date, skipped" in capsys.readouterr().err


@pytest.mark.slow
def test_dask_scheduler_and_workers_from_the_install_match_sequential_after_a_kill(
    data_root: Path, tmp_path: Path
) -> None:
    """The issue's check: `dask scheduler` + two `dask worker --nthreads 1`, BraTS 2013."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "MEDSEG_DATA": str(data_root)}
    with dask_command_cluster(tmp_path, env) as (address, workers):
        cli = [sys.executable, "-m", "medseg.cli", "preprocess", "--manifest",
               str(REPO / "data_manifests" / "brats2013.json")]  # fmt: skip
        seq = subprocess.run([*cli, "--out", str(tmp_path / "seq")], env=env, check=False)
        assert seq.returncode == 0
        out = tmp_path / "dask"
        run = subprocess.Popen([*cli, "--out", str(out), "--scheduler", address], env=env)
        # kill one worker once the first case is in the cache
        while not list(out.glob("cases/*/case.json")) and run.poll() is None:
            time.sleep(0.2)
        kill_worker(workers[0])
        run.wait()
        rerun = subprocess.run([*cli, "--out", str(out), "--scheduler", address], env=env)
        assert rerun.returncode == 0
        assert tree_digest(out) == tree_digest(tmp_path / "seq")
    shutil.rmtree(tmp_path / "seq")


# -- faults: a second writer, a full disk, a worker that dies ------------------------------------
def _synthetic(tmp_path: Path, n: int = 3) -> list[str]:
    data = tmp_path / "data"
    data.mkdir()
    cases = [_write_nifti_case(data, f"c{i}", i) for i in range(n)]
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"name": "syn", "channels": ["T1"], "modalities": ["MR"],
                                    "labels": {"0": "bg", "1": "fg"}, "cases": cases}))  # fmt: skip
    return ["preprocess", "--manifest", str(manifest), "--data-root", str(data)]


def test_a_second_writer_of_a_cache_is_refused_naming_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medseg.atomic import folder_lock

    args = _synthetic(tmp_path, 1)
    out = tmp_path / "prep"
    with folder_lock(out, "medseg preprocess (the first)"):
        with pytest.raises(SystemExit) as exc:
            main([*args, "--out", str(out)])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by pid {os.getpid()}" in err[0]
        assert "medseg preprocess (the first)" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [".medseg.lock"]  # not even a log
    assert not out.exists()


def test_full_disk_fails_each_case_in_one_line_and_leaves_no_case_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno

    args = _synthetic(tmp_path, 2)
    real_save = np.save

    def full(file, arr, *a, **k):  # type: ignore[no-untyped-def]
        real_save(file, arr[: max(1, len(arr) // 2)])  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", full)
    out = tmp_path / "prep"
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(out)])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the summary
    failed = [line for line in err if line.startswith("  failed: ")]
    assert [line.split(":")[1].strip() for line in failed] == ["c0", "c1"]
    assert all("disk full while writing to" in line for line in failed), err
    assert "Traceback" not in "".join(err) and "OSError" not in "".join(err)
    assert err[-1].endswith("2 of 2 case(s) failed; no case was written"), err[-1]
    assert not (out / "cases").exists() or list((out / "cases").iterdir()) == []
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


SITECUSTOMIZE = """
import os, signal
import medseg.preprocess.cohort as cohort

_name = os.environ["MEDSEG_TEST_DIE_IN"]
_real = getattr(cohort, _name)

def _die_on_c1(case, **kw):
    if case.case_id == "c1":  # this worker process dies, every time it takes c1
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(case, **kw)

setattr(cohort, _name, _die_on_c1)
"""


@pytest.mark.parametrize("stage", ["_fingerprint_job", "_preprocess_job"])
def test_a_worker_killed_on_one_case_loses_only_that_case_named_with_its_cause(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stage: str,
) -> None:
    """Worker processes are spawned: a ``sitecustomize`` on their PYTHONPATH makes the worker
    that takes case c1 die by SIGKILL (twice: the case is retried once), while the data set
    is fingerprinted or while its cases are written."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("MEDSEG_TEST_DIE_IN", stage)
    args = _synthetic(tmp_path, 3)
    out = tmp_path / "prep"
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(out), "--workers", "2"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "failed: c1: its worker process died while running it" in err
    assert "failed: c0" not in err and "failed: c2" not in err
    assert "1 of 3 case(s) failed; the other 2 are in" in err
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["c0", "c2"]
    assert "c1: worker died, retrying" in (out / LOG).read_text()


KILL_AT_RENAME = """
import os, signal

_at, _seen, _real = int(os.environ["MEDSEG_TEST_KILL_AT"]), [0], os.replace


def _replace(src, dst, *args, **kwargs):
    _seen[0] += 1
    if _seen[0] == _at:  # the file is written beside its target, not yet renamed: die now
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(src, dst, *args, **kwargs)


os.replace = _replace
"""


def _succeeds(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code in (0, None)


def _killed_then_rerun(tmp_path: Path, args: list[str], at: int) -> tuple[int, dict[str, str]]:
    """Run preprocess in a child killed (SIGKILL) before its ``at``-th rename, then rerun it
    here; the child's exit code and the cache's digest after the rerun."""
    hook = tmp_path / f"hook{at}"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_AT_RENAME)
    out = tmp_path / f"killed{at}"
    path = os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "MEDSEG_TEST_KILL_AT": str(at)}
    child = subprocess.run([sys.executable, "-m", "medseg.cli", *args, "--out", str(out)],
                           env=env, capture_output=True, check=False)  # fmt: skip
    _succeeds([*args, "--out", str(out)])
    return child.returncode, tree_digest(out)


def _kill_sweep(tmp_path: Path, points: list[int] | None) -> int:
    args = _synthetic(tmp_path, 2)
    _succeeds([*args, "--out", str(tmp_path / "whole")])
    reference = tree_digest(tmp_path / "whole")
    killed = 0
    for at in points or range(1, 100):
        code, digest = _killed_then_rerun(tmp_path, args, at)
        if code == 0:  # fewer renames than ``at``: the sweep has covered every one
            assert points is None, at
            break
        assert code == -signal.SIGKILL, code
        assert digest == reference, at  # same bytes; no temporary, lock or half case left
        killed += 1
    return killed


def test_preprocess_killed_mid_write_then_rerun_gives_the_uninterrupted_cache_bytes(
    tmp_path: Path,
) -> None:
    assert _kill_sweep(tmp_path, [1, 4]) == 2  # the first write; inside the first case


@pytest.mark.slow
def test_preprocess_killed_before_any_rename_then_rerun_gives_the_same_bytes(
    tmp_path: Path,
) -> None:
    assert _kill_sweep(tmp_path, None) >= 10  # every rename of a two-case run


SLOW_CASES = """
import time
import medseg.preprocess.cohort as cohort

_real = cohort._preprocess_job


def _slow(case, **kw):
    time.sleep(2.0)  # long enough for a second command to meet the first at work
    return _real(case, **kw)


cohort._preprocess_job = _slow
"""


def test_two_preprocess_commands_on_one_cache_one_refused_the_cache_whole(
    tmp_path: Path,
) -> None:
    """Two processes: the second is refused in one line naming the first (its pid), writes
    nothing, and the first's cache is the one a lone run writes."""
    args = _synthetic(tmp_path, 2)
    _succeeds([*args, "--out", str(tmp_path / "alone")])
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_CASES)
    out = tmp_path / "prep"
    base = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    cli = [sys.executable, "-m", "medseg.cli", *args, "--out", str(out)]
    first = subprocess.Popen(cli, env={**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{base}"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        while not (out / ".medseg.lock").exists():
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        second = subprocess.run(cli, env={**os.environ, "PYTHONPATH": base},
                                capture_output=True, text=True, check=False)  # fmt: skip
        assert first.poll() is None  # the first was still at work
    finally:
        first.wait()
    assert first.returncode == 0, first.communicate()
    assert second.returncode == 2
    err = second.stderr.strip().splitlines()
    assert len(err) == 1 and f"in use by pid {first.pid} " in err[0] and "preprocess" in err[0]
    assert tree_digest(out) == tree_digest(tmp_path / "alone")
    assert "c0" not in second.stdout and not (out / ".medseg.lock").exists()
