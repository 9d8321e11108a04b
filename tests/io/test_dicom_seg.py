"""DICOM-SEG writer and reader, checked by independent readers: pydicom / highdicom parse the
object, every segment pixel is placed in the world from its own frame's attributes (numpy)
and must land on the labelled voxel of the dcm2niix / dicom2nifti reference conversion."""

from __future__ import annotations

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

from medseg.errors import DicomSegError
from medseg.io import read_volume
from medseg.io.dicom_seg import read_dicom_seg, write_dicom_seg
from medseg.io.dicom_source import MedsegDicomWarning
from medseg.volume import Volume
from tests.io.dicom_fixtures import double_oblique_series, frame_geometry, pixel_world_ras

#: series with a reference NIfTI: single-frame, enhanced multi-frame, compressed, mosaic
REAL = [
    "siemens_mr_sagittal",
    "philips_mr_coronal",
    "philips_enhanced_multiframe_mr",
    "siemens_enhanced_multiframe_mr",
    "jpeg2000_mr",
    "siemens_transfer_syntax_9",
]


def _label_from_reference(ref: nib.Nifti1Image, image: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Two boxes in the reference's voxel space, and the same labels on medseg's grid."""
    shape = ref.shape[:3]
    lab_ref = np.zeros(shape, dtype=np.uint8)
    lo = [s // 4 for s in shape]
    hi = [max(a + 1, s // 2) for a, s in zip(lo, shape, strict=True)]
    lab_ref[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
    lab_ref[hi[0] : hi[0] + 3, lo[1] : hi[1], :] = 2
    ijk = np.indices(image.grid.shape).reshape(3, -1).T
    world = image.grid.world(ijk)
    rv = np.rint(nib.affines.apply_affine(np.linalg.inv(ref.affine), world)).astype(int)
    lab = lab_ref[rv[:, 0], rv[:, 1], rv[:, 2]].reshape(image.grid.shape)
    return lab_ref, lab


@pytest.mark.parametrize("name", REAL)
def test_every_segment_pixel_lands_on_its_voxel_of_the_reference_conversion(
    data_root: Path, tmp_path: Path, name: str
) -> None:
    folder = data_root / "dicom" / name / "dicom"
    ref = nib.load(data_root / "dicom" / name / "reference.nii.gz")
    image = read_volume(folder)
    lab_ref, lab = _label_from_reference(ref, image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedsegDicomWarning)
        out = write_dicom_seg(
            Volume(lab[None], image.grid, True, {}), folder, tmp_path / "s.dcm", {1: "a", 2: "b"}
        )
    seg = hd.seg.segread(out)  # highdicom parses the object
    assert seg.SegmentationType == "BINARY" and len(seg.SegmentSequence) == 2
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "medseg"
    ds = pydicom.dcmread(out)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    shared = ds.SharedFunctionalGroupsSequence[0]
    inv = np.linalg.inv(ref.affine)
    placed = np.zeros_like(lab_ref)
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        rows, cols = np.nonzero(frames[f])
        world = pixel_world_ras(*frame_geometry(item, shared), rows, cols)
        idx = nib.affines.apply_affine(inv, world)
        assert np.allclose(idx, np.rint(idx), atol=2e-2)
        v = np.rint(idx).astype(int)
        assert np.all(lab_ref[v[:, 0], v[:, 1], v[:, 2]] == number)
        placed[v[:, 0], v[:, 1], v[:, 2]] = number
    assert np.array_equal(placed, lab_ref)


def test_each_frame_references_the_source_image_at_its_position(
    data_root: Path, tmp_path: Path
) -> None:
    folder = data_root / "dicom" / "philips_enhanced_multiframe_mr" / "dicom"
    image = read_volume(folder)
    lab = np.zeros(image.grid.shape, np.uint8)
    lab[100:120, 100:120, :] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedsegDicomWarning)
        out = write_dicom_seg(Volume(lab[None], image.grid, True, {}), folder, tmp_path / "s.dcm")
    src = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    seg = pydicom.dcmread(out)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    for item in seg.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        n = int(ref.ReferencedFrameNumber)
        src_pos = src.PerFrameFunctionalGroupsSequence[n - 1].PlanePositionSequence[0]
        ipp = item.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose(np.array(ipp, float), np.array(src_pos.ImagePositionPatient, float))


def test_double_oblique_series_without_frame_of_reference(tmp_path: Path) -> None:
    folder = double_oblique_series(tmp_path / "series")
    image = read_volume(folder)
    lab = np.zeros(image.grid.shape, np.uint8)
    lab[5:20, 4:12, 1:5] = 1
    lab[22:30, 20:28, 2:3] = 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = write_dicom_seg(Volume(lab[None], image.grid, True, {}), folder, tmp_path / "s.dcm")
    minted = [w for w in caught if issubclass(w.category, MedsegDicomWarning)]
    assert len(minted) == 1 and "FrameOfReferenceUID" in str(minted[0].message)
    ds = pydicom.dcmread(out)
    assert ds.FrameOfReferenceUID and "PatientSex" in ds and "StudyDate" in ds
    # each segment pixel lands on its voxel: slice k sits at the IPP written for file s{k}
    shared = ds.SharedFunctionalGroupsSequence[0]
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ipp, iop, ps = frame_geometry(item, shared)
        sop = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        src = next(
            s for s in (pydicom.dcmread(p) for p in folder.iterdir()) if s.SOPInstanceUID == sop
        )
        assert np.allclose(ipp, np.array(src.ImagePositionPatient, float), atol=1e-4)
        assert np.allclose(iop, np.array(src.ImageOrientationPatient, float), atol=1e-6)
        k = int(src.InstanceNumber) - 1
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        value = (1, 3)[number - 1]
        assert np.array_equal(frames[f].astype(bool), (lab[:, :, k] == value).T)
    back = read_volume(out)
    assert back.is_label and back.grid.allclose(image.grid, 1e-4)
    assert np.array_equal(back.array[0] > 0, lab > 0)


def test_round_trip_label_seg_label_is_equal(data_root: Path, tmp_path: Path) -> None:
    folder = data_root / "dicom" / "siemens_ct_axial_jpeg2000" / "dicom"
    image = read_volume(folder)
    lab = np.zeros(image.grid.shape, np.uint8)
    lab[100:300, 150:260, 3:15] = 1
    lab[200:240, 170:200, 5:9] = 2
    lab[320:330, 300:310, 0] = 3
    out = write_dicom_seg(Volume(lab[None], image.grid, True, {}), folder, tmp_path / "s.dcm")
    for back in (read_dicom_seg(out), read_dicom_seg(out, reference=folder)):
        assert back.grid.allclose(image.grid, 1e-4)
        assert np.array_equal(back.array[0], lab)


def test_fractional_from_probabilities(data_root: Path, tmp_path: Path) -> None:
    folder = data_root / "dicom" / "siemens_mr_sagittal" / "dicom"
    image = read_volume(folder)
    prob = np.zeros((1, *image.grid.shape), np.float32)
    prob[0, 10:40, 10:40, :] = 0.8
    lab = (prob[0] > 0.5).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedsegDicomWarning)
        out = write_dicom_seg(
            Volume(lab[None], image.grid, True, {}), folder, tmp_path / "f.dcm", fractional=prob
        )
    ds = pydicom.dcmread(out)
    assert ds.SegmentationType == "FRACTIONAL"
    assert int(ds.pixel_array.max()) == round(0.8 * int(ds.MaximumFractionalValue))
    assert np.array_equal(read_dicom_seg(out).array[0], lab)


def test_a_non_seg_file_is_refused(data_root: Path) -> None:
    f = next((data_root / "dicom" / "siemens_mr_sagittal" / "dicom").iterdir())
    with pytest.raises(DicomSegError, match="not a DICOM Segmentation"):
        read_dicom_seg(f)


def _dcmqi() -> Path | None:
    exe = shutil.which("segimage2itkimage") or str(
        Path(sys.executable).parent / "segimage2itkimage"
    )
    return Path(exe) if Path(exe).exists() else None


def test_dcmqi_reads_the_segments_onto_the_same_voxels(data_root: Path, tmp_path: Path) -> None:
    exe = _dcmqi()
    if exe is None:
        pytest.skip("dcmqi (segimage2itkimage) is not installed")
    folder = data_root / "dicom" / "siemens_ct_axial_jpeg2000" / "dicom"
    image = read_volume(folder)
    lab = np.zeros(image.grid.shape, np.uint8)
    lab[100:300, 150:260, 3:15] = 1
    out = write_dicom_seg(Volume(lab[None], image.grid, True, {}), folder, tmp_path / "s.dcm")
    res = subprocess.run(
        [str(exe), "--inputDICOM", str(out), "--outputDirectory", str(tmp_path), "-t", "nifti"],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"dcmqi does not run here: {res.stderr.strip()[:200]}")
    nii = nib.load(tmp_path / "1.nii.gz")
    voxels = np.argwhere(np.asarray(nii.dataobj) > 0)
    world = nib.affines.apply_affine(nii.affine, voxels)
    idx = image.grid.index(world)
    assert np.allclose(idx, np.rint(idx), atol=1e-2)
    v = np.rint(idx).astype(int)
    assert len(v) == int(lab.sum()) and np.all(lab[v[:, 0], v[:, 1], v[:, 2]] == 1)
