"""``medseg evaluate`` end to end on NIfTI folders, including the failure cases."""

from __future__ import annotations

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
                "1",
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
