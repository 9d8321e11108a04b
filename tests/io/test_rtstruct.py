"""RTSTRUCT writer and reader: contours rasterised back onto the source slices in the test
(skimage.draw.polygon on ContourData mapped through each image's own position, orientation
and pixel spacing with numpy) match the label, holes included; bad input via the CLI."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from skimage.draw import polygon

from medseg.cli import main
from medseg.errors import RTStructError
from medseg.io import read_volume
from medseg.io.dicom_source import MedsegDicomWarning
from medseg.io.rtstruct import read_rtstruct, write_rtstruct
from medseg.volume import Volume
from tests.io.dicom_fixtures import double_oblique_series, pixel_world_ras


def _rings(image: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two ROIs defined in the world: a ring (disc with a hole) and a ball, as functions of
    RAS+ mm; returns the label on medseg's grid and the two centres and radii."""
    c = image.grid.world(np.array(image.grid.shape) / 2.0 - 0.5)
    r = 0.3 * min(s * n for s, n in zip(image.grid.spacing[:2], image.grid.shape[:2], strict=True))
    ijk = np.indices(image.grid.shape).reshape(3, -1).T
    lab = _world_label(image.grid.world(ijk), c, r).reshape(image.grid.shape)
    return lab, c, np.array(r)


def _world_label(xyz: np.ndarray, c: np.ndarray, r: float) -> np.ndarray:
    d = np.linalg.norm(xyz - c, axis=1)
    out = np.where((d < r) & (d > 0.45 * r), 1, 0)
    ball = np.linalg.norm(xyz - (c + 1.3 * r * np.array([1.0, 0.0, 0.0])), axis=1) < 0.25 * r
    return np.where(ball, 2, out).astype(np.uint8)


def _check_contours(out: Path, folder: Path, c: np.ndarray, r: float) -> None:
    ds = pydicom.dcmread(out)
    assert ds.Modality == "RTSTRUCT" and ds.FrameOfReferenceUID
    # some anonymised files keep their instance UID in the file meta only
    images = {
        s.get("SOPInstanceUID") or s.file_meta.MediaStorageSOPInstanceUID: s
        for s in (pydicom.dcmread(p) for p in folder.iterdir())
    }
    for n, roi in enumerate(ds.ROIContourSequence, start=1):
        masks = {uid: np.zeros((s.Rows, s.Columns), bool) for uid, s in images.items()}
        uid_of = {id(s): uid for uid, s in images.items()}
        for contour in roi.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            src = images[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            ipp = np.array(src.ImagePositionPatient, float)
            iop = np.array(src.ImageOrientationPatient, float)
            ps = np.array(src.PixelSpacing, float)
            pts = np.array(contour.ContourData, float).reshape(-1, 3) - ipp
            assert np.allclose(pts @ np.cross(iop[:3], iop[3:]), 0.0, atol=1e-3)  # planar, on it
            rr, cc = polygon(
                pts @ iop[3:] / ps[0], pts @ iop[:3] / ps[1], masks[uid_of[id(src)]].shape
            )
            masks[uid_of[id(src)]][rr, cc] ^= True  # even-odd: holes are inner contours
        inter = total = 0
        for uid, s in images.items():
            rows, cols = np.indices((s.Rows, s.Columns)).reshape(2, -1)
            world = pixel_world_ras(
                np.array(s.ImagePositionPatient, float),
                np.array(s.ImageOrientationPatient, float),
                np.array(s.PixelSpacing, float),
                rows,
                cols,
            )
            truth = (_world_label(world, c, r) == n).reshape(s.Rows, s.Columns)
            inter += int((truth & masks[uid]).sum())
            total += int(truth.sum() + masks[uid].sum())
        assert total > 0 and 2 * inter / total >= 0.90


@pytest.mark.parametrize("name", ["siemens_mr_sagittal", "siemens_ct_axial_jpeg2000"])
def test_contours_rasterised_on_the_source_slices_match_the_label(
    data_root: Path, tmp_path: Path, name: str
) -> None:
    folder = data_root / "dicom" / name / "dicom"
    image = read_volume(folder)
    lab, c, r = _rings(image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedsegDicomWarning)
        out = write_rtstruct(Volume(lab[None], image.grid, True, {}), folder, tmp_path / "rt.dcm")
    _check_contours(out, folder, c, float(r))
    back = read_rtstruct(out, folder)
    assert np.array_equal(back.array[0], lab)


def test_double_oblique_series_with_holes(tmp_path: Path) -> None:
    folder = double_oblique_series(tmp_path / "series")
    image = read_volume(folder)
    lab, c, r = _rings(image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedsegDicomWarning)
        out = write_rtstruct(Volume(lab[None], image.grid, True, {}), folder, tmp_path / "rt.dcm")
    _check_contours(out, folder, c, float(r))
    assert np.array_equal(read_volume(out, reference=folder).array[0], lab)


def test_enhanced_multiframe_source_is_refused_naming_dicom_seg(
    data_root: Path, tmp_path: Path
) -> None:
    folder = data_root / "dicom" / "philips_enhanced_multiframe_mr" / "dicom"
    image = read_volume(folder)
    lab = np.zeros(image.grid.shape, np.uint8)
    lab[10:20, 10:20, 2] = 1
    with pytest.raises(RTStructError, match="DICOM-SEG"):
        write_rtstruct(Volume(lab[None], image.grid, True, {}), folder, tmp_path / "rt.dcm")
    assert not (tmp_path / "rt.dcm").exists()


# -- the convert command -------------------------------------------------------------------------
def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def series_and_label(tmp_path: Path) -> tuple[Path, Path, Volume]:
    folder = double_oblique_series(tmp_path / "series", frame_of_reference=True)
    image = read_volume(folder)
    lab = np.zeros(image.grid.shape, np.uint8)
    lab[5:20, 4:12, 1:5] = 1
    f = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(lab, image.grid.affine), f)
    return folder, f, image


@pytest.mark.parametrize("fmt", ["dicom-seg", "rtstruct"])
def test_convert_writes_and_reads_back_the_label(
    series_and_label: tuple[Path, Path, Volume],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fmt: str,
) -> None:
    folder, label, _ = series_and_label
    out, back = tmp_path / "o.dcm", tmp_path / "back.nii.gz"
    code, _, err = _run(
        ["convert", str(label), str(out), "--reference", str(folder), "--format", fmt], capsys
    )
    assert code == 0, err
    code, _, err = _run(["convert", str(out), str(back), "--reference", str(folder)], capsys)
    assert code == 0, err
    a, b = nib.load(label), nib.load(back)
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert np.allclose(a.affine, b.affine, atol=1e-4)


def test_convert_codes_from_a_pipeline_and_one_warning_for_a_minted_frame_of_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = double_oblique_series(tmp_path / "series")  # no FrameOfReferenceUID
    lab = np.zeros(read_volume(folder).grid.shape, np.uint8)
    lab[5:20, 4:12, 1:5] = 1
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(lab, read_volume(folder).grid.affine), label)
    toml = tmp_path / "p.toml"
    toml.write_text('[infer.dicom_codes.1]\ntype = ["SCT", "10200004", "Liver"]\n')
    for fmt in ("dicom-seg", "rtstruct"):
        out = tmp_path / f"{fmt}.dcm"
        argv = ["convert", str(label), str(out), "--reference", str(folder), "--format", fmt]
        code, _, err = _run([*argv, "--pipeline", str(toml)], capsys)
        assert code == 0, err
        warned = err.strip().splitlines()
        assert len(warned) == 1 and warned[0].startswith("medseg: warning: ")
        assert "FrameOfReferenceUID" in warned[0]
        ds = pydicom.dcmread(out)
        if fmt == "dicom-seg":
            code_item = ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
        else:
            code_item = ds.RTROIObservationsSequence[0].RTROIIdentificationCodeSequence[0]
        assert (code_item.CodeValue, code_item.CodeMeaning) == ("10200004", "Liver")
    toml.write_text('[infer.dicom_codes.1]\ntype = ["SCT", "Liver"]\n')
    argv = ["convert", str(label), str(tmp_path / "x.dcm"), "--reference", str(folder)]
    code, _, err = _run([*argv, "--pipeline", str(toml)], capsys)
    assert code == 2 and "dicom_codes" in err and not (tmp_path / "x.dcm").exists()


def _bad_cases(
    folder: Path, label: Path, image: Volume, tmp: Path, data: Path
) -> dict[str, list[str]]:
    shifted = tmp / "shifted.nii.gz"
    aff = image.grid.affine.copy()
    aff[:3, 3] += [0.0, 0.0, 2.5]
    nib.save(nib.Nifti1Image(np.asarray(nib.load(label).dataobj), aff), shifted)
    empty = tmp / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(image.grid.shape, np.uint8), image.grid.affine), empty)
    notseg = tmp / "notseg.dcm"
    notseg.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    enhanced = data / "dicom" / "philips_enhanced_multiframe_mr" / "dicom"
    enh_label = tmp / "enh.nii.gz"
    enh = read_volume(enhanced)
    lab = np.zeros(enh.grid.shape, np.uint8)
    lab[5:9, 5:9, 1] = 1
    nib.save(nib.Nifti1Image(lab, enh.grid.affine), enh_label)
    return {
        "2.5 mm": ["convert", str(shifted), str(tmp / "o.dcm"), "--reference", str(folder)],
        "empty": ["convert", str(empty), str(tmp / "o.dcm"), "--reference", str(folder)],
        "notseg.dcm": ["convert", str(notseg), str(tmp / "o.nii.gz")],
        "DICOM-SEG": [
            "convert",
            str(enh_label),
            str(tmp / "o.dcm"),
            "--reference",
            str(enhanced),
            "--format",
            "rtstruct",
        ],
        "--reference": ["convert", str(label), str(tmp / "o.dcm")],
    }


def test_convert_refuses_bad_input_in_one_line(
    series_and_label: tuple[Path, Path, Volume],
    tmp_path: Path,
    data_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, label, image = series_and_label
    for needle, argv in _bad_cases(folder, label, image, tmp_path, data_root).items():
        code, _, err = _run(argv, capsys)
        assert code == 2, (needle, err)
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
        assert not (tmp_path / "o.dcm").exists() and not (tmp_path / "o.nii.gz").exists()


def test_manifest_case_with_rtstruct_label_reads_on_its_image_grid(
    series_and_label: tuple[Path, Path, Volume], tmp_path: Path
) -> None:
    from medseg.manifest import Case, read_case

    folder, label, image = series_and_label
    lab = read_volume(label, label=True)
    rt = write_rtstruct(lab, folder, tmp_path / "rt.dcm")
    images, got = read_case(Case("c1", [folder], rt))
    assert got is not None and got.is_label
    assert got.grid.allclose(images[0].grid, 1e-4)
    assert np.array_equal(got.array, lab.array)
