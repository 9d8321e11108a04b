"""Command line: inspect, convert, manifest; one-line errors with exit code 2, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli import main
from medseg.io import write_volume
from medseg.volume import Volume

REPO = Path(__file__).resolve().parents[1]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Call ``medseg.cli.main``; return (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _bad_inputs(tmp_path: Path, image_volume: Volume) -> dict[str, Path]:
    good = tmp_path / "src" / "good.nii.gz"
    good.parent.mkdir()
    write_volume(image_volume, good)
    data = good.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "trunc.nii.gz").write_bytes(data[: len(data) // 2])
    (bad / "text.nii").write_text("hello, I am not a scan\n" * 30)
    (bad / "empty_dir").mkdir()
    (bad / "not_a_volume").mkdir()
    (bad / "not_a_volume" / "notes.txt").write_text("a folder of notes, not DICOM\n")
    return {p.name: p for p in bad.iterdir()}


def test_bad_inputs_give_one_line_exit_2_and_write_nothing(
    tmp_path: Path, image_volume: Volume, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name, path in _bad_inputs(tmp_path, image_volume).items():
        code, out, err = run(["inspect", str(path)], capsys)
        assert code == 2, name
        assert len(err.strip().splitlines()) == 1 and err.startswith("medseg: error: "), err
        assert path.name in err
        code, out, err = run(["convert", str(path), str(out_dir / "x.nii.gz")], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, (name, err)
        assert list(out_dir.iterdir()) == []  # not even a temporary file


def test_console_script_reports_truncated_file_in_one_line(
    tmp_path: Path, image_volume: Volume
) -> None:
    bad = _bad_inputs(tmp_path, image_volume)["trunc.nii.gz"]
    exe = Path(sys.executable).parent / "medseg"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "medseg.cli"]
    proc = subprocess.run([*cmd, "inspect", str(bad)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "trunc.nii.gz" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_inspect_reports_ras_geometry_of_nrrd(
    data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["inspect", str(data_root / "nrrd/brain1/image.nrrd")], capsys)
    assert code == 0
    # header: space origin (-99.609375, 99.609375, -78) LPS, directions x+, y-, z+
    assert "256 x 256 x 25 voxels" in out
    assert "0.78125 x 0.78125 x 6.5 mm" in out
    assert "LAS" in out and "99.6094, -99.6094, -78" in out
    assert "0 .. 3057" in out


def test_convert_nrrd_to_nifti_matches_simpleitk(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = data_root / "nrrd/brain2/label.nrrd"
    dst = tmp_path / "label.nii.gz"
    code, out, err = run(["convert", str(src), str(dst), "--label"], capsys)
    assert code == 0, err
    img = nib.load(str(dst))
    ref = sitk.ReadImage(str(src))
    lps = np.array(ref.GetDirection()).reshape(3, 3) * np.array(ref.GetSpacing())
    np.testing.assert_allclose(img.affine[:3, :3], np.diag([-1, -1, 1]) @ lps, atol=1e-6)
    np.testing.assert_allclose(
        img.affine[:3, 3], np.diag([-1, -1, 1]) @ np.array(ref.GetOrigin()), atol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(img.dataobj), sitk.GetArrayFromImage(ref).T)
    assert img.header.get_data_dtype() == np.uint8  # label values 0/1 stored in the smallest type
    # an existing output is refused and left untouched
    before = dst.read_bytes()
    code, _, err = run(["convert", str(src), str(dst)], capsys)
    assert code == 2 and "--overwrite" in err
    assert dst.read_bytes() == before
    code, _, err = run(["convert", str(src), str(tmp_path / "nope" / "x.nii.gz")], capsys)
    assert code == 2 and "does not exist" in err


def test_convert_png_label_to_nifti_and_back(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = data_root / "isbi2012/labels/slice_07.png"
    assert run(["convert", str(src), str(tmp_path / "l.nii.gz"), "--label"], capsys)[0] == 0
    assert run(["convert", str(tmp_path / "l.nii.gz"), str(tmp_path / "l.png")], capsys)[0] == 0
    assert (tmp_path / "l.png").read_bytes() != b""
    from PIL import Image

    with Image.open(src) as a, Image.open(tmp_path / "l.png") as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_manifest_check_ok_and_reports_all_problems(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shipped = REPO / "data_manifests/nrrd.json"
    code, out, err = run(["manifest", "check", str(shipped), "--data-root", str(data_root)], capsys)
    assert code == 0, err
    assert "3 cases OK" in out
    raw = json.loads(shipped.read_text())
    raw["cases"][0]["images"] = ["nrrd/brain1/nope.nrrd"]
    raw["cases"][1]["label"] = "nrrd/breast1/label.nrrd"  # wrong grid for brain2
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(raw))
    code, out, err = run(["manifest", "check", str(broken), "--data-root", str(data_root)], capsys)
    assert code == 2
    assert "2 problem(s) in 2 of 3 case(s)" in err.splitlines()[0]
    assert "nope.nrrd" in err and "brain2" in err and "shape" in err


def test_manifest_import_folders_writes_valid_manifest_once(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, labels = tmp_path / "d" / "images", tmp_path / "d" / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    for f in sorted((data_root / "dsb2018_nuclei/images").glob("*.png"))[:4]:
        shutil.copy(f, images / f.name)
        shutil.copy(data_root / "dsb2018_nuclei/labels" / f.name, labels / f.name)
    out = tmp_path / "nuclei.json"
    argv = ["manifest", "import-folders", str(images), str(labels), "--out", str(out)]
    code, stdout, err = run([*argv, "--name", "nuclei"], capsys)
    assert code == 0, err
    obj = json.loads(out.read_text())
    assert obj["name"] == "nuclei" and obj["channels"] == ["R", "G", "B"]
    assert len(obj["cases"]) == 4 and obj["cases"][-1]["split"] == "val"
    assert run(["manifest", "check", str(out)], capsys)[0] == 0
    before = out.read_bytes()
    code, _, err = run(argv, capsys)
    assert code == 2 and "already exists" in err and out.read_bytes() == before


def test_help_reads_like_a_man_page(capsys: pytest.CaptureFixture[str]) -> None:
    env_cols = os.environ.get("COLUMNS")
    for argv in (["inspect"], ["convert"], ["manifest", "check"], ["manifest", "import-msd"]):
        code, out, _ = run([*argv, "--help"], capsys)
        assert code == 0
        assert "Example" in out, argv
        assert "mm" in out or "dataset.json" in out, argv
    assert env_cols == os.environ.get("COLUMNS")
