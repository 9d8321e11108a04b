"""Predictions written as DICOM-SEG, RTSTRUCT and statistics, checked by independent readers.

A network whose labels are intensity bands (:class:`Bands`) segments real DICOM series, so the
expected label of every voxel follows from the reference conversion (dicom2nifti) or the
source images' own pixels: highdicom / pydicom parse the objects, every SEG pixel is placed in
the world from its own frame's position and orientation (numpy) and must land on a reference
voxel of its band; RTSTRUCT contours rasterised on the source slices match the bands there."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from skimage.draw import polygon

from medseg.errors import RTStructError, WriteError
from medseg.inference.case import predict_case
from medseg.inference.cohort import read_case
from medseg.inference.model_folder import LoadedModel
from medseg.inference.outputs import (
    OutputSpec,
    case_output,
    check_case_input,
    resolve_format,
    write_outputs,
)
from medseg.io.dicom_source import MedsegDicomWarning
from tests.inference.helpers import Bands, bands_logits, make_plan, model_folder, run_cli
from tests.io.dicom_fixtures import double_oblique_series, frame_geometry, pixel_world_ras

#: dicom2nifti references: single-frame, enhanced multi-frame (Philips, float reference),
#: JPEG 2000; dcm2niix reference: a Siemens mosaic, JPEG 2000, slightly oblique
SERIES = [
    "siemens_mr_sagittal",
    "philips_enhanced_multiframe_mr",
    "jpeg2000_mr",
    "siemens_transfer_syntax_9",
]
LIVER = ["SCT", "10200004", "Liver"]


def _bands(ref: np.ndarray, scale: float = 1.0) -> tuple[float, float, float]:
    """Band limits between the reference's intensities (no voxel sits on one) and a scale."""
    values = np.unique(ref)
    lo, hi = (values[np.searchsorted(values, np.percentile(ref, q))] for q in (55, 85))
    nxt = [values[min(np.searchsorted(values, v) + 1, len(values) - 1)] for v in (lo, hi)]
    return float((lo + nxt[0]) / 2), float((hi + nxt[1]) / 2), scale


def _predict(folder: Path, low: float, high: float, scale: float = 1.0, save: bool = False):
    plan = dataclasses.replace(
        make_plan(dims=3, label_values=(0, 1, 2)), class_names=["background", "rim", "core"]
    )
    loaded = LoadedModel(Bands(3, low, high, scale), plan)
    images = read_case([folder])
    return plan, images, predict_case(images, loaded, tile_size=36, save_probabilities=save)


def _write(pred, images, folder: Path, out: Path, plan, spec: OutputSpec) -> list[Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedsegDicomWarning)
        return write_outputs(pred, images, [folder], out, plan, spec)


def _placed(seg_path: Path, ref: nib.Nifti1Image) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per SEG frame: segment number, the reference voxel of each pixel (from the frame's
    own IPP/IOP/PixelSpacing), and the pixel values."""
    ds = pydicom.dcmread(seg_path)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    shared = ds.SharedFunctionalGroupsSequence[0]
    inv = np.linalg.inv(ref.affine)
    rows, cols = np.indices((ds.Rows, ds.Columns)).reshape(2, -1)
    out = []
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        idx = nib.affines.apply_affine(
            inv, pixel_world_ras(*frame_geometry(item, shared), rows, cols)
        )
        assert np.allclose(idx, np.rint(idx), atol=2e-2)
        out.append((number, np.rint(idx).astype(int).T, frames[f].reshape(-1)))
    return out


@pytest.mark.parametrize("name", SERIES)
def test_every_seg_pixel_lands_on_a_reference_voxel_of_its_band(
    data_root: Path, tmp_path: Path, name: str
) -> None:
    folder = data_root / "dicom" / name / "dicom"
    ref = nib.load(data_root / "dicom" / name / "reference.nii.gz")
    x = np.asarray(ref.dataobj, dtype=np.float64).reshape(ref.shape[:3])
    low, high, _ = _bands(x)
    plan, images, pred = _predict(folder, low, high)
    spec = OutputSpec("dicom-seg", codes={2: {"type": LIVER}})
    (out,) = _write(pred, images, folder, tmp_path / "result.dcm", plan, spec)
    seg = hd.seg.segread(out)
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["rim", "core"]
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "medseg"
    expected = np.digitize(x, [low, high])
    placed = np.zeros(x.shape, np.uint8)
    for number, v, pixels in _placed(out, ref):
        on = pixels > 0
        assert np.all(expected[v[0, on], v[1, on], v[2, on]] == number)
        placed[v[0, on], v[1, on], v[2, on]] = number
    assert np.array_equal(placed, expected)


def test_fractional_values_are_the_band_probabilities(data_root: Path, tmp_path: Path) -> None:
    folder = data_root / "dicom" / "siemens_mr_sagittal" / "dicom"
    ref = nib.load(data_root / "dicom" / "siemens_mr_sagittal" / "reference.nii.gz")
    x = np.asarray(ref.dataobj, dtype=np.float64)
    low, high, scale = _bands(x, 0.05)  # soft: probabilities between 0 and 1
    plan, images, pred = _predict(folder, low, high, scale, save=True)
    spec = OutputSpec("dicom-seg", fractional=True)
    (out,) = _write(pred, images, folder, tmp_path / "f.dcm", plan, spec)
    ds = pydicom.dcmread(out)
    assert ds.SegmentationType == "FRACTIONAL" and ds.SegmentationFractionalType == "PROBABILITY"
    logits = bands_logits(x, low, high, scale)
    e = np.exp(logits - logits.max(axis=0))
    probs = e / e.sum(axis=0)
    top = float(ds.MaximumFractionalValue)
    for number, v, pixels in _placed(out, ref):
        want = probs[number][v[0], v[1], v[2]]
        assert np.max(np.abs(pixels / top - want)) <= 0.5 / top + 1e-6


def _source_masks(ds: pydicom.Dataset, images: dict[str, pydicom.Dataset]) -> list[dict]:
    """Per ROI, per source image: the even-odd fill of its contours (skimage polygon)."""
    out = []
    for roi in ds.ROIContourSequence:
        masks = {uid: np.zeros((s.Rows, s.Columns), bool) for uid, s in images.items()}
        for contour in roi.get("ContourSequence", []):
            uid = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
            src = images[uid]
            ipp = np.array(src.ImagePositionPatient, float)
            iop = np.array(src.ImageOrientationPatient, float)
            ps = np.array(src.PixelSpacing, float)
            pts = np.array(contour.ContourData, float).reshape(-1, 3) - ipp
            assert np.allclose(pts @ np.cross(iop[:3], iop[3:]), 0.0, atol=1e-3)
            rr, cc = polygon(pts @ iop[3:] / ps[0], pts @ iop[:3] / ps[1], masks[uid].shape)
            masks[uid][rr, cc] ^= True
        out.append(masks)
    return out


@pytest.mark.slow
def test_rtstruct_rasterised_on_the_source_slices_matches_the_bands(
    data_root: Path, tmp_path: Path
) -> None:
    # a real CT: body (holes where the lungs are) and bone, as Hounsfield bands
    folder = data_root / "dicom" / "siemens_ct_axial_jpeg2000" / "dicom"
    low, high = -500.5, 300.5
    plan, images, pred = _predict(folder, low, high)
    (out,) = _write(pred, images, folder, tmp_path / "rt.dcm", plan, OutputSpec("rtstruct"))
    ds = pydicom.dcmread(out)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["rim", "core"]
    sources = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    # some anonymised files keep their instance UID in the file meta only
    by_uid = {
        str(s.get("SOPInstanceUID") or s.file_meta.MediaStorageSOPInstanceUID): s for s in sources
    }
    for number, masks in enumerate(_source_masks(ds, by_uid), start=1):
        inter = total = 0
        for uid, s in by_uid.items():
            hu = s.pixel_array * float(s.RescaleSlope) + float(s.RescaleIntercept)
            truth = np.digitize(hu, [low, high]) == number
            inter += int((truth & masks[uid]).sum())
            total += int(truth.sum() + masks[uid].sum())
        assert total > 0 and 2 * inter / total >= 0.90


def test_stats_beside_the_prediction_count_the_reference_bands(
    data_root: Path, tmp_path: Path
) -> None:
    folder = data_root / "dicom" / "siemens_mr_sagittal" / "dicom"
    ref = nib.load(data_root / "dicom" / "siemens_mr_sagittal" / "reference.nii.gz")
    x = np.asarray(ref.dataobj, dtype=np.float64)
    low, high, _ = _bands(x)
    plan, images, pred = _predict(folder, low, high)
    spec = OutputSpec("dicom-seg", stats=True)
    out, stats = _write(pred, images, folder, tmp_path / "r.dcm", plan, spec)
    assert stats == tmp_path / "r_stats.json"
    doc = json.loads(stats.read_text())
    voxel_ml = abs(np.linalg.det(ref.affine[:3, :3])) / 1000
    for entry, band in zip(doc["labels"], (1, 2), strict=True):
        inside = np.digitize(x, [low, high]) == band
        assert entry["name"] == ["rim", "core"][band - 1]
        assert entry["voxels"] == int(inside.sum())
        assert entry["volume_ml"] == pytest.approx(inside.sum() * voxel_ml)
        assert entry["channels"]["ch0"]["mean"] == pytest.approx(x[inside].mean())
        centroid = nib.affines.apply_affine(ref.affine, np.argwhere(inside).mean(axis=0))
        assert np.allclose(entry["centroid_mm"], centroid, atol=1e-6)


def test_an_empty_prediction_still_writes_its_named_segments(
    data_root: Path, tmp_path: Path
) -> None:
    folder = data_root / "dicom" / "siemens_mr_sagittal" / "dicom"
    plan, images, pred = _predict(folder, 1e6, 2e6)
    (out,) = _write(pred, images, folder, tmp_path / "e.dcm", plan, OutputSpec("dicom-seg"))
    seg = hd.seg.segread(out)
    assert len(seg.SegmentSequence) == 2
    assert not np.asarray(pydicom.dcmread(out).pixel_array).any()


def test_dicom_outputs_need_a_dicom_series_and_rtstruct_single_frames(
    data_root: Path, tmp_path: Path
) -> None:
    nifti = data_root / "dicom" / "siemens_mr_sagittal" / "reference.nii.gz"
    with pytest.raises(WriteError, match="needs a DICOM series as input"):
        check_case_input([nifti], "dicom-seg")
    enhanced = data_root / "dicom" / "philips_enhanced_multiframe_mr" / "dicom"
    with pytest.raises(RTStructError, match="write a DICOM-SEG instead"):
        check_case_input([enhanced], "rtstruct")
    check_case_input([enhanced], "dicom-seg")
    check_case_input([nifti], "nifti")


def test_format_from_the_output_name_or_given() -> None:
    assert resolve_format(Path("r.dcm"), None) == "dicom-seg"
    assert resolve_format(Path("r.nii.gz"), None) == "nifti"
    assert resolve_format(Path("r.nrrd"), None) == "nrrd"
    assert resolve_format(Path("r.mha"), None) is None
    assert resolve_format(Path("rt.dcm"), "rtstruct") == "rtstruct"
    assert resolve_format(Path("out"), None, cohort=True) is None
    assert case_output(Path("o"), "c1", "rtstruct", ".nii.gz") == Path("o/c1_rtstruct.dcm")
    assert case_output(Path("o"), "c1", None, ".nrrd") == Path("o/c1.nrrd")
    with pytest.raises(WriteError, match="name it .dcm"):
        resolve_format(Path("r.nii.gz"), "dicom-seg")
    with pytest.raises(WriteError, match="expected one of"):
        resolve_format(Path("r.dcm"), "png")


# -- the command line ------------------------------------------------------------------------
@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """A model folder of a small random 3-class U-Net whose pipeline codes label 1."""
    plan = dataclasses.replace(
        make_plan(dims=3, label_values=(0, 1, 2)), class_names=["background", "rim", "core"]
    )
    folder, _ = model_folder(tmp_path, plan)
    (folder / "pipeline.toml").write_text(
        'name = "t"\n[infer.dicom_codes.1]\ntype = ["SCT", "10200004", "Liver"]\n'
    )
    return folder


def test_cli_dcm_output_is_a_seg_of_the_input_series_on_the_nifti_voxels(
    data_root: Path, tmp_path: Path, run_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = data_root / "dicom" / "siemens_mr_sagittal" / "dicom"
    common = ["infer", "--volume", str(folder), "--model", str(run_folder), "--tile-size", "36"]
    code, out, err = run_cli([*common, "--output", str(tmp_path / "result.dcm"), "--stats"], capsys)
    assert code == 0, err
    assert out.split() == [str(tmp_path / "result.dcm"), str(tmp_path / "result_stats.json")]
    assert run_cli([*common, "--output", str(tmp_path / "pred.nii.gz")], capsys)[0] == 0
    seg = hd.seg.segread(tmp_path / "result.dcm")
    src = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["rim", "core"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"
    pred = nib.load(tmp_path / "pred.nii.gz")
    labels = np.asarray(pred.dataobj)
    placed = np.zeros_like(labels)
    for number, v, pixels in _placed(tmp_path / "result.dcm", pred):
        placed[v[0, pixels > 0], v[1, pixels > 0], v[2, pixels > 0]] = number
    assert np.array_equal(placed, labels)
    doc = json.loads((tmp_path / "result_stats.json").read_text())
    assert [e["voxels"] for e in doc["labels"]] == [int((labels == v).sum()) for v in (1, 2)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--output", "{t}/r.dcm", "--volume", "{nifti}"], "needs a DICOM series as input"),
        (["--output", "{t}/r.nii.gz", "--volume", "{dicom}", "--fractional"], "FRACTIONAL"),
        (["--output", "{t}/r.nii.gz", "--volume", "{dicom}", "--format", "rtstruct"], ".dcm"),
        (["--output", "{t}/r.dcm", "--volume", "{dicom}", "--save-probabilities"], "--fractional"),
        (["--output", "{t}/r.dcm", "--volume", "{enhanced}", "--format", "rtstruct"], "DICOM-SEG"),
        (["--output", "{t}/r.dcm", "--volume", "{dicom}", "--engine", "onnxruntime"], "export"),
        (
            [
                "--output",
                "{t}/r.dcm",
                "--volume",
                "{dicom}",
                "--engine",
                "onnxruntime",
                "--precision",
                "bf16",
            ],
            "float32 graph",
        ),  # fmt: skip
    ],
)
def test_cli_bad_output_requests_are_one_line_exit_2_nothing_written(
    data_root: Path,
    tmp_path: Path,
    run_folder: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    d = data_root / "dicom"
    names = {
        "t": tmp_path / "out",
        "nifti": d / "siemens_mr_sagittal" / "reference.nii.gz",
        "dicom": d / "siemens_mr_sagittal" / "dicom",
        "enhanced": d / "philips_enhanced_multiframe_mr" / "dicom",
    }
    (tmp_path / "out").mkdir()
    args = [a.format(**names) for a in extra]
    code, _, err = run_cli(["infer", "--model", str(run_folder), *args], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not list((tmp_path / "out").iterdir())


def test_cli_cohort_of_dicom_series_writes_segs_stats_csv_and_lists_the_bad_case(
    data_root: Path, tmp_path: Path, run_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = tmp_path / "cases"
    cases.mkdir()
    d = data_root / "dicom"
    (cases / "a").symlink_to(d / "jpeg2000_mr" / "dicom")
    (cases / "b").symlink_to(d / "jpegls_mr" / "dicom")
    (cases / "c.nii.gz").symlink_to(d / "jpegls_mr" / "reference.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    args = ["infer", "--input-dir", str(cases), "--model", str(run_folder), "--output", str(out)]
    code, _, err = run_cli([*args, "--format", "dicom-seg", "--stats", "--tile-size", "36"], capsys)
    assert code == 1 and "failed: c:" in err and "needs a DICOM series" in err
    written = sorted(p.name for p in out.iterdir() if not p.name.endswith(".log"))
    assert written == ["a_seg.dcm", "a_seg_stats.json", "b_seg.dcm", "b_seg_stats.json",
                       "stats.csv"]  # fmt: skip
    assert pydicom.dcmread(out / "a_seg.dcm").Modality == "SEG"
    rows = list(csv.DictReader((out / "stats.csv").open()))
    assert [(r["case_id"], r["name"]) for r in rows] == [
        ("a", "rim"), ("a", "core"), ("b", "rim"), ("b", "core")
    ]  # fmt: skip
    # a and b are the same pixels in two transfer syntaxes: the same structures
    assert rows[0]["voxels"] == rows[2]["voxels"] and rows[1]["mean_ch0"] == rows[3]["mean_ch0"]


@pytest.mark.parametrize(
    ("output", "extra", "modality", "kind"),
    [
        ("result.dcm", ["--fractional"], "SEG", "FRACTIONAL"),
        ("rt.dcm", ["--format", "rtstruct"], "RTSTRUCT", None),
        ("pred.nii.gz", ["--stats"], None, None),
    ],
)
def test_cli_each_output_format_of_one_dicom_case(
    data_root: Path,
    tmp_path: Path,
    run_folder: Path,
    capsys: pytest.CaptureFixture[str],
    output: str,
    extra: list[str],
    modality: str | None,
    kind: str | None,
) -> None:
    folder = data_root / "dicom" / "nonisotropic_mr" / "dicom"  # 64 x 28 x 4: quick
    args = ["infer", "--volume", str(folder), "--model", str(run_folder)]
    code, out, err = run_cli([*args, "--output", str(tmp_path / output), *extra], capsys)
    assert code == 0, err
    if modality is None:
        stats = json.loads((tmp_path / "pred_stats.json").read_text())
        labels = np.asarray(nib.load(tmp_path / output).dataobj)
        assert [e["voxels"] for e in stats["labels"]] == [int((labels == v).sum()) for v in (1, 2)]
        return
    ds = pydicom.dcmread(tmp_path / output)
    assert ds.Modality == modality and ds.get("SegmentationType") == kind
    if modality == "RTSTRUCT":
        assert [r.ROIName for r in ds.StructureSetROISequence] == ["rim", "core"]


def test_cli_infer_of_a_series_without_frame_of_reference_says_so_in_one_warning(
    tmp_path: Path, run_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = double_oblique_series(tmp_path / "series")
    args = ["infer", "--volume", str(folder), "--model", str(run_folder)]
    code, _, err = run_cli([*args, "--output", str(tmp_path / "r.dcm")], capsys)
    assert code == 0, err
    warned = [line for line in err.splitlines() if "FrameOfReferenceUID" in line]
    assert len(warned) == 1 and warned[0].startswith("medseg: warning:")
    minted = pydicom.dcmread(tmp_path / "r.dcm").FrameOfReferenceUID
    assert minted and minted.startswith("1.2.826.0.1.3680043.8.498.")  # pydicom's root


def test_cli_cohort_rerun_with_stats_redoes_cases_without_them(
    data_root: Path, tmp_path: Path, run_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "a").symlink_to(data_root / "dicom" / "nonisotropic_mr" / "dicom")
    out = tmp_path / "out"
    out.mkdir()
    args = ["infer", "--input-dir", str(cases), "--model", str(run_folder), "--output", str(out)]
    assert run_cli([*args, "--format", "dicom-seg"], capsys)[0] == 0
    code, stdout, _ = run_cli([*args, "--format", "dicom-seg", "--stats"], capsys)
    assert code == 0 and "1 cases written" in stdout
    assert (out / "a_seg_stats.json").is_file() and (out / "stats.csv").is_file()
    code, stdout, _ = run_cli([*args, "--format", "dicom-seg", "--stats"], capsys)
    assert code == 0 and "1 skipped" in stdout


def test_dcmqi_reads_each_segment_onto_reference_voxels_of_its_band(
    data_root: Path, tmp_path: Path
) -> None:
    exe = shutil.which("segimage2itkimage") or str(
        Path(sys.executable).parent / "segimage2itkimage"
    )
    if not Path(exe).exists():
        pytest.skip("dcmqi (segimage2itkimage) is not installed")
    folder = data_root / "dicom" / "philips_mr_coronal" / "dicom"
    ref = nib.load(data_root / "dicom" / "philips_mr_coronal" / "reference.nii.gz")
    x = np.asarray(ref.dataobj, dtype=np.float64).reshape(ref.shape[:3])
    low, high, _ = _bands(x)
    plan, images, pred = _predict(folder, low, high)
    (out,) = _write(pred, images, folder, tmp_path / "r.dcm", plan, OutputSpec("dicom-seg"))
    res = subprocess.run(
        [exe, "--inputDICOM", str(out), "--outputDirectory", str(tmp_path), "-t", "nifti"],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"dcmqi does not run here: {res.stderr.strip()[:200]}")
    expected = np.digitize(x, [low, high])
    for number in (1, 2):
        seg = nib.load(tmp_path / f"{number}.nii.gz")
        world = nib.affines.apply_affine(seg.affine, np.argwhere(np.asarray(seg.dataobj) > 0))
        idx = nib.affines.apply_affine(np.linalg.inv(ref.affine), world)
        assert np.allclose(idx, np.rint(idx), atol=2e-2)
        v = np.rint(idx).astype(int)
        assert len(v) == int((expected == number).sum())
        assert np.all(expected[v[:, 0], v[:, 1], v[:, 2]] == number)
