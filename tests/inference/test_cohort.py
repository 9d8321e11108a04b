"""Cohorts and the infer command: case discovery, shards, files written, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.errors import MedsegError
from medseg.inference.cohort import discover_cases, probabilities_path, select_shard
from medseg.io import read_volume, write_volume
from medseg.runtime import native_bf16
from medseg.volume import Volume
from tests.inference.helpers import Evil, make_plan, model_folder, run_cli


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
    }
    for what, args in cases.items():
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
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]
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
