"""``medseg evaluate`` end to end on NIfTI folders, including the failure cases."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg import metrics as M
from medseg.cli import main


def _save(path: Path, arr: np.ndarray, affine=None, dtype=np.int16) -> Path:
    aff = np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(arr.astype(dtype), aff), path)
    return path


def _labels(shift: int = 0) -> np.ndarray:
    a = np.zeros((20, 18, 8), np.int16)
    a[4 + shift : 12 + shift, 4:12, 2:6] = 1
    a[14:17, 12:16, 3:5] = 2
    return a


def _run(args: list[str]) -> int:
    """Exit code of ``medseg ARGS`` (typer exits with 0 on success too)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0)


@pytest.fixture
def cohort(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    for cid in ("good0", "good1", "nopred", "moved", "float"):
        _save(ref / f"{cid}.nii.gz", _labels())
    _save(pred / "good0.nii.gz", _labels(0))
    _save(pred / "good1.nii.gz", _labels(2))
    shifted = np.diag([0.8, 0.8, 2.5, 1.0])
    shifted[0, 3] = 3.0  # 3 mm away from the reference grid
    _save(pred / "moved.nii.gz", _labels(0), affine=shifted)
    _save(pred / "float.nii.gz", _labels(0) + 0.5, dtype=np.float32)  # not a label map
    return tmp_path


def test_evaluate_folders_reports_failures_and_evaluates_the_rest(cohort, capsys):
    out = cohort / "reports" / "run"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "evaluate",
                "--pred",
                str(cohort / "pred"),
                "--ref",
                str(cohort / "ref"),
                "--out",
                str(out),
                "--labels",
                "1,2",
                "--workers",
                "2",
            ]
        )
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "nopred" in err and "moved" in err and "float" in err
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["failures"]) == {"nopred", "moved", "float"}
    assert (
        "mm" in summary["failures"]["moved"] and "--resample-pred" in summary["failures"]["moved"]
    )
    assert "non-integer" in summary["failures"]["float"]
    assert summary["n_evaluated"] == 2
    # good1: class 1 shifted by 2 voxels of 0.8 mm along I
    ref = _labels() == 1
    expected = M.hausdorff_distance(_labels(2) == 1, ref, (0.8, 0.8, 2.5))
    assert expected == pytest.approx(1.6)
    assert summary["metrics"]["1"]["hd"]["max"] == pytest.approx(expected)
    html = (out / "report.html").read_text()
    for cid in ("good0", "good1", "nopred", "moved", "float"):
        assert cid in html
    assert (out / "metrics.csv").read_text().count("\ngood1,") == 2 * len(M.METRIC_NAMES)


def test_resample_pred_brings_a_shifted_grid_onto_the_reference(tmp_path):
    ref = _labels()
    _save(tmp_path / "ref.nii.gz", ref)
    aff = np.diag([0.8, 0.8, 2.5, 1.0])
    aff[0, 3] = 1.6  # the prediction grid starts 2 voxels further along I
    # the same physical object on the shifted grid: array content moved back by 2 voxels
    _save(tmp_path / "pred.nii.gz", np.roll(ref, -2, axis=0), affine=aff)
    out = tmp_path / "rep"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "pred.nii.gz"),
                "--ref",
                str(tmp_path / "ref.nii.gz"),
                "--out",
                str(out),
            ]
        )
    assert exc.value.code == 1
    assert (
        _run(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "pred.nii.gz"),
                "--ref",
                str(tmp_path / "ref.nii.gz"),
                "--out",
                str(out),
                "--resample-pred",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_failed"] == 0
    assert summary["metrics"]["1"]["dice"]["mean"] == 1.0
    assert summary["metrics"]["2"]["dice"]["mean"] == 1.0


def test_evaluate_with_manifest_uses_label_names_regions_and_fov(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    ref = _labels()
    pred = ref.copy()
    pred[0:2, 0:2, 0:2] = 2  # a false positive outside the field of view
    img = np.random.default_rng(0).normal(size=ref.shape).astype(np.float32)
    _save(data / "c1_img.nii.gz", img, dtype=np.float32)
    _save(data / "c1_seg.nii.gz", ref)
    fov = np.ones(ref.shape, np.uint8)
    fov[0:3, 0:3, :] = 0
    _save(data / "c1_fov.nii.gz", fov, dtype=np.uint8)
    (tmp_path / "preds").mkdir()
    _save(tmp_path / "preds" / "c1.nii.gz", pred)
    manifest = {
        "name": "toy",
        "channels": ["CT"],
        "labels": {"0": "background", "1": "organ", "2": "lesion"},
        "regions": {"all": [1, 2]},
        "cases": [
            {
                "case_id": "c1",
                "images": ["c1_img.nii.gz"],
                "label": "c1_seg.nii.gz",
                "extras": {"fov": "c1_fov.nii.gz"},
            }
        ],
    }
    mpath = tmp_path / "m.json"
    mpath.write_text(json.dumps(manifest))
    out = tmp_path / "rep"
    assert (
        _run(
            [
                "evaluate",
                "--manifest",
                str(mpath),
                "--data-root",
                str(data),
                "--pred",
                str(tmp_path / "preds"),
                "--out",
                str(out),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) == {"background", "organ", "lesion", "all"}
    assert summary["metrics"]["lesion"]["dice"]["mean"] == 1.0  # FOV hides the false positive
    assert "c1" in (out / "report.html").read_text()


def test_exactly_one_of_ref_and_manifest(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--pred", str(tmp_path), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "--ref" in capsys.readouterr().err


def test_prediction_in_another_voxel_order_is_reordered_losslessly(tmp_path):
    """A prediction stored bottom-up and mirrored (as a DICOM stack may be) is the same grid."""
    ref = _labels(1)
    aff = np.diag([0.8, 0.8, 2.5, 1.0])
    _save(tmp_path / "ref.nii.gz", ref, affine=aff)
    flipped = aff.copy()
    flipped[:, 0] *= -1
    flipped[:, 2] *= -1
    flipped[:3, 3] = aff[:3, :3] @ np.array([ref.shape[0] - 1, 0, ref.shape[2] - 1])
    _save(tmp_path / "pred.nii.gz", ref[::-1, :, ::-1], affine=flipped)
    out = tmp_path / "rep"
    args = [
        "evaluate",
        "--pred",
        str(tmp_path / "pred.nii.gz"),
        "--ref",
        str(tmp_path / "ref.nii.gz"),
    ]
    assert _run([*args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["1"]["dice"]["mean"] == 1.0
    assert summary["metrics"]["2"]["hd"]["mean"] == 0.0


# -- classes: label 0 and absent classes ---------------------------------------------------------
ISBI = Path(__file__).resolve().parents[2] / "data_manifests" / "isbi2012.json"


def test_isbi_manifest_scores_label_zero_membrane(tmp_path, data_root):
    """ISBI 2012 names 0 = membrane, 255 = cell: both are scored, membrane Dice as numpy says."""
    from PIL import Image

    labels = data_root / "isbi2012" / "labels"
    preds = tmp_path / "preds"
    preds.mkdir()
    for i in range(20, 25):
        a = np.asarray(Image.open(labels / f"slice_{i}.png"))
        Image.fromarray(np.roll(a, 3, axis=1) if i == 21 else a).save(preds / f"slice_{i}.png")
    out = tmp_path / "rep"
    code = _run(
        ["evaluate", "--manifest", str(ISBI), "--split", "val", "--pred", str(preds)]
        + ["--out", str(out), "--worst", "1"]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["metrics"]) == ["membrane", "cell"]
    ref = np.asarray(Image.open(labels / "slice_21.png")) == 0
    pred = np.roll(np.asarray(Image.open(labels / "slice_21.png")), 3, axis=1) == 0
    expected = 2 * (ref & pred).sum() / (ref.sum() + pred.sum())
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    got = [
        r
        for r in rows
        if (r["case_id"], r["class"], r["metric"]) == ("slice_21", "membrane", "dice")
    ]
    assert float(got[0]["value"]) == pytest.approx(expected)
    assert summary["metrics"]["membrane"]["dice"]["min"] == pytest.approx(expected)
    assert "label value 0 included" in (out / "report.html").read_text()


def test_label_absent_everywhere_is_reported_absent_not_dice_one(cohort, capsys):
    out = cohort / "rep"
    args = ["evaluate", "--pred", str(cohort / "pred"), "--ref", str(cohort / "ref")]
    assert _run([*args, "--out", str(out), "--labels", "1,9"]) == 1
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "'9'" in warnings[0] and "absent" in warnings[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["absent_everywhere"] == ["9"]
    assert summary["metrics"]["9"]["dice"]["mean"] is None
    assert summary["metrics"]["9"]["dice"]["n_absent"] == summary["n_evaluated"] == 2
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r["class"] == "9"]
    assert rows and all(r["absent"] == "true" for r in rows)
    assert {r["value"] for r in rows if r["metric"] == "dice"} == {"nan"}
    html = (out / "report.html").read_text()
    assert "absent from that case" in html and "never scored as Dice 1" in html
    assert ">absent<" in html


def test_class_absent_from_one_case_is_left_out_of_its_statistics(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    with_two, without_two = _labels(), _labels()
    without_two[without_two == 2] = 0
    shifted = with_two.copy()
    shifted[shifted == 2] = 0
    shifted[14:17, 13:17, 3:5] = 2  # class 2 moved by one voxel in case a
    _save(tmp_path / "r" / "a.nii.gz", with_two)
    _save(tmp_path / "p" / "a.nii.gz", shifted)
    _save(tmp_path / "r" / "b.nii.gz", without_two)
    _save(tmp_path / "p" / "b.nii.gz", without_two)
    out = tmp_path / "rep"
    args = ["evaluate", "--pred", str(tmp_path / "p"), "--ref", str(tmp_path / "r")]
    assert _run([*args, "--out", str(out)]) == 0
    st = json.loads((out / "summary.json").read_text())["metrics"]["2"]["dice"]
    expected = M.dice(shifted == 2, with_two == 2)
    assert st["n"] == 1 and st["n_absent"] == 1 and st["mean"] == pytest.approx(expected)
    html = (out / "report.html").read_text()
    assert "label value 0 is background and not scored" in html


# -- faults: per-case exceptions, worker death, full disk, unwritable or busy output -------------
def _evaluate_args(cohort: Path, out: Path, *more: str) -> list[str]:
    """Cases in this process unless ``more`` says otherwise (monkeypatches reach them)."""
    pred, ref = ["--pred", str(cohort / "pred")], ["--ref", str(cohort / "ref")]
    return ["evaluate", *pred, *ref, "--out", str(out), "--labels", "1,2", *more]


def _outputs(folder: Path) -> dict[str, bytes]:
    """The report files, not the progress log (it holds times)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "evaluate.log"}


def test_unexpected_exception_in_one_case_fails_that_case_only(cohort, monkeypatch, capsys):
    from medseg.report import evaluate as ev

    real = ev._read_label

    def read(path):
        if path.name.startswith("good1"):
            raise MemoryError
        return real(path)

    monkeypatch.setattr(ev, "_read_label", read)
    out = cohort / "rep"
    assert _run(_evaluate_args(cohort, out)) == 1
    err = capsys.readouterr().err
    assert "good1: unexpected MemoryError" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_evaluated"] == 1 and "MemoryError" in summary["failures"]["good1"]
    assert "MemoryError" in (out / "report.html").read_text()
    assert "\ngood0," in (out / "metrics.csv").read_text()


def test_a_killed_worker_loses_only_its_case(cohort):
    from medseg.cohort import Where
    from medseg.report.evaluate import evaluate_cohort, pairs_from_paths

    pairs = [p for p in pairs_from_paths(cohort / "pred", cohort / "ref") if "good" in p.case_id]
    out = cohort / "rep"
    res = evaluate_cohort(pairs, out, {"1": [1], "2": [2]}, where=Where(workers=2),
                          evaluate=kill_on_good1)  # fmt: skip
    assert "died" in res.failures["good1"]  # killed twice: its first run and its one retry
    summary = json.loads((out / "summary.json").read_text())
    assert "died" in summary["failures"]["good1"]
    assert summary["n_evaluated"] == 1 and "\ngood0," in (out / "metrics.csv").read_text()


def kill_on_good1(pair, **kw):
    """``evaluate_pair``, but its worker process dies (SIGKILL) on case good1."""
    import os
    import signal

    from medseg.report.evaluate import evaluate_pair

    if pair.case_id == "good1":
        os.kill(os.getpid(), signal.SIGKILL)
    return evaluate_pair(pair, **kw)


def test_disk_full_while_writing_leaves_the_previous_outputs(cohort, monkeypatch, capsys):
    import errno

    out = cohort / "rep"
    _run(_evaluate_args(cohort, out))
    before = _outputs(out)
    real = Path.write_bytes

    def full(self, data):
        if "report.html" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    capsys.readouterr()
    args = _evaluate_args(cohort, out)
    args[args.index("1,2")] = "1"  # different content, so a partial write would show
    assert _run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk full" in err[0]
    assert _outputs(out) == before
    fresh = cohort / "fresh"
    assert _run(_evaluate_args(cohort, fresh)) == 2
    assert not fresh.exists() or not _outputs(fresh)  # no lone metrics.csv


def test_unwritable_output_is_refused_before_any_case_is_read(cohort, monkeypatch, capsys):
    from medseg.report import evaluate as ev

    calls = []
    monkeypatch.setattr(ev, "evaluate_pair", lambda *a: calls.append(a))
    (cohort / "afile").write_text("x")
    assert _run(_evaluate_args(cohort, cohort / "afile" / "rep")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "afile" in err[0] and calls == []


def test_busy_output_folder_is_refused_in_one_line(cohort, capsys):
    from medseg.atomic import folder_lock

    out = cohort / "rep"
    with folder_lock(out, "another evaluate"):
        assert _run(_evaluate_args(cohort, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use" in err[0]
    assert not (out / "metrics.csv").exists()
