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
import typer

from medseg.io import write_volume
from medseg.volume import Volume
from tests.conftest import run_cli as run

REPO = Path(__file__).resolve().parents[1]


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


# -- the reader's DICOM options: every command a message sends the user to takes them ----------
def test_every_command_a_dicom_message_names_takes_its_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    from tests.inference.helpers import make_plan, model_folder
    from tests.io.test_dicom import write_series

    positions = [0.0, 1.0, 2.0, 4.0, 5.0, 6.0, 7.0, 8.0]  # the slice at 3 is missing
    data = np.arange(12 * 10 * 8, dtype=np.uint16).reshape(12, 10, 8)
    series = tmp_path / "series"
    write_series(series, data, step=2.0, positions=positions)
    code, _, err = run(["convert", str(series), str(tmp_path / "x.nii.gz")], capsys)
    assert code == 2
    m = re.search(r"pass (--allow-nonuniform) to medseg ([a-z, ]+) \(", one_line := err.strip())
    assert m is not None, one_line
    option, commands = m.group(1), [c.strip() for c in m.group(2).split(",")]
    assert set(commands) >= {"inspect", "convert", "infer"}
    for command in commands:
        code, out, _ = run([command, "--help"], capsys)
        assert code == 0 and option in out and "--correct-tilt" in out, command
    # and the option does what the message says, in each of them
    code, out, err = run(["inspect", str(series), "--allow-nonuniform"], capsys)
    assert code == 0 and "12 x 10 x 9 voxels" in out, err
    model, _ = model_folder(tmp_path, make_plan(dims=3, depth=1, base=2))
    infer = ["infer", "--volume", str(series), "--model", str(model), "--device", "cpu"]
    code, _, err = run([*infer, "--output", str(tmp_path / "p.nii.gz")], capsys)
    assert code == 2 and option in err
    code, _, err = run([*infer, "--output", str(tmp_path / "p.nii.gz"), option], capsys)
    assert code == 0, err
    assert nib.load(tmp_path / "p.nii.gz").shape[:3] == (12, 10, 9)


def test_inspect_reports_nan_and_infinite_voxels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = np.ones((5, 4, 3), np.float32)
    img[0, 0, 0] = np.nan
    img[1, 1, 1] = img[2, 2, 2] = np.inf
    nib.save(nib.Nifti1Image(img, np.eye(4)), tmp_path / "nan.nii.gz")
    code, out, err = run(["inspect", str(tmp_path / "nan.nii.gz")], capsys)
    assert code == 0
    assert "channel 0: 1 NaN, 2 infinite voxels" in out
    warning = err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("medseg: warning: ") and "1 NaN" in err
    nib.save(nib.Nifti1Image(np.ones((5, 4, 3), np.float32), np.eye(4)), tmp_path / "ok.nii.gz")
    code, out, err = run(["inspect", str(tmp_path / "ok.nii.gz")], capsys)
    assert code == 0 and err == "" and "non-finite voxels" in out


# -- --help: plain text, nothing swallowed, nothing untrue ---------------------------------------
def _all_commands() -> list[list[str]]:
    from medseg.cli import app

    group = typer.main.get_command(app)
    out = []
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        subs = getattr(cmd, "commands", None)
        out += [[name, sub] for sub in subs] if subs else [[name]]
    return out


def test_help_of_every_command_keeps_brackets_and_shows_no_bool_metavar(
    capsys: pytest.CaptureFixture[str],
) -> None:
    commands = _all_commands()
    assert ["preprocess"] in commands and ["manifest", "check"] in commands
    texts = {}
    for argv in commands:
        code, out, _ = run([*argv, "--help"], capsys)
        assert code == 0, argv
        assert "<bool>" not in out and "\\[" not in out and "[/" not in out, argv
        assert "<list[" not in out, argv  # a repeatable option shows what one value is
        texts[" ".join(argv)] = " ".join(out.split())
    assert "pipeline's [plan] table" in texts["preprocess"]
    assert "TOML with [plan] overrides and [preprocess] options" in texts["preprocess"]
    assert "from the pipeline's [train] table" in texts["train"]
    # examples stay one command per line
    code, out, _ = run(["preprocess", "--help"], capsys)
    assert "\n    medseg preprocess --pipeline pipelines/brats2013.toml --workers 2\n" in out


def test_infer_help_describes_how_labels_return_to_the_scan_grid(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(["infer", "--help"], capsys)
    text = " ".join(out.split())
    assert "one nearest-neighbour resample" not in text
    assert "copied back exactly" in text and "highest probability after linear resampling" in text


def test_inspect_prints_bracketed_names_as_they_are(
    tmp_path: Path, image_volume: Volume, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "scan [plan] [T1].nii.gz"
    write_volume(image_volume, path)
    code, out, err = run(["inspect", str(path)], capsys)
    assert code == 0, err
    assert "scan [plan] [T1].nii.gz" in " ".join(out.split())
