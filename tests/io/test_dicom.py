"""DICOM reader: synthetic series against SimpleITK and analytic geometry, real series against
their dcm2niix / dicom2nifti / SimpleITK reference conversions."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from medseg.errors import DicomError
from medseg.io import dicom, read_volume
from medseg.volume import Grid, Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def _oblique() -> tuple[float, ...]:
    a, b = np.deg2rad(20.0), np.deg2rad(-12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    r = rx @ rz
    return (*r[:, 0], *r[:, 1])


OBLIQUE = _oblique()


def write_slice(
    path: Path,
    pixels: np.ndarray,
    *,
    iop: Sequence[float] = AXIAL,
    ipp: Sequence[float] = (0.0, 0.0, 0.0),
    pixel_spacing: tuple[float, float] = (0.7, 0.9),
    series_uid: str = "1.2.3.4",
    modality: str = "CT",
    slope: float | None = None,
    intercept: float | None = None,
    instance: int = 1,
    thickness: float | None = 2.0,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    extra: dict[str, Any] | None = None,
    description: str = "synthetic",
) -> Path:
    """One CT/MR Image Storage file with the required tags; ``pixels`` is ``(rows, cols)``."""
    pixels = np.ascontiguousarray(pixels)
    meta = FileMetaDataset()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.3.9"
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.PatientName = "Synthetic^Test"
    ds.PatientID = "0"
    ds.ImageOrientationPatient = [f"{v:.10g}" for v in iop]
    ds.ImagePositionPatient = [f"{v:.10g}" for v in ipp]
    ds.PixelSpacing = [f"{v:.10g}" for v in pixel_spacing]
    if thickness is not None:
        ds.SliceThickness = thickness
    if slope is not None:
        ds.RescaleSlope = f"{slope:.10g}"
        ds.RescaleIntercept = f"{intercept or 0:.10g}"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    samples = 3 if pixels.ndim == 3 else 1
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if np.issubdtype(pixels.dtype, np.signedinteger) else 0
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _volume_data(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """(I, J, K) uint16 test values, distinct per voxel and asymmetric along every axis."""
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    rng = np.random.default_rng(seed)
    return (i * 7 + j * 131 + k * 1009 + rng.integers(0, 5, shape)).astype(np.uint16)


def write_series(
    folder: Path,
    data: np.ndarray,
    *,
    iop: Sequence[float] = AXIAL,
    origin: Sequence[float] = (10.0, -20.0, 30.0),
    step: float | Sequence[float] = 2.5,
    pixel_spacing: tuple[float, float] = (0.7, 0.9),
    order: str = "ascending",
    positions: Sequence[float] | None = None,
    names: str = "slice",
    seed: int = 0,
    **kwargs: Any,
) -> list[Path]:
    """Write ``data`` ``(I, J, K)`` as one file per slice; slice k at ``origin + k * step``.

    ``step`` is a distance along the normal (mm) or a full LPS vector (for tilted stacks).
    ``order`` changes only the instance numbers and file names, never the geometry.
    """
    folder.mkdir(parents=True, exist_ok=True)
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    k_count = data.shape[2]
    pos = list(positions) if positions is not None else [float(k) for k in range(k_count)]
    vec = np.asarray(step, dtype=float) if np.ndim(step) else normal * float(step)
    file_order = list(range(k_count))
    if order == "descending":
        file_order = file_order[::-1]
    elif order == "shuffled":
        file_order = list(np.random.default_rng(seed).permutation(k_count))
    paths = []
    for n, k in enumerate(file_order):
        ipp = np.asarray(origin) + vec * pos[k]
        p = folder / f"{names}_{n:03d}.dcm"
        write_slice(
            p,
            data[:, :, k].T,
            iop=iop,
            ipp=ipp,
            pixel_spacing=pixel_spacing,
            instance=n + 1,
            **kwargs,
        )
        paths.append(p)
    return paths


def itk_volume(folder: Path) -> Volume:
    """SimpleITK's (GDCM) reading of a series folder, converted LPS -> RAS here."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img)  # (K, J, I)
    a = np.eye(4)
    a[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    a[:3, 3] = img.GetOrigin()
    return Volume(np.transpose(arr, (2, 1, 0))[None], Grid(arr.shape[::-1], LPS_TO_RAS @ a))


def assert_same_in_world(a: Volume, b: Volume, atol_mm: float = 1e-3) -> None:
    ca, cb = a.reoriented("RAS"), b.reoriented("RAS")
    assert ca.grid.shape == cb.grid.shape
    assert ca.grid.max_corner_distance(cb.grid) <= atol_mm
    np.testing.assert_allclose(ca.affine, cb.affine, atol=atol_mm)
    np.testing.assert_array_equal(ca.array, cb.array)


@pytest.fixture
def ct_data() -> np.ndarray:
    return _volume_data((6, 5, 4))


# -- synthetic geometry against SimpleITK -------------------------------------------------------
@pytest.mark.parametrize(
    "iop", [AXIAL, SAGITTAL, CORONAL, OBLIQUE], ids=["ax", "sag", "cor", "obl"]
)
@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
def test_synthetic_series_matches_simpleitk(
    tmp_path: Path, ct_data: np.ndarray, iop: tuple[float, ...], order: str
) -> None:
    write_series(tmp_path / "s", ct_data, iop=iop, order=order, slope=1.0, intercept=-1024)
    vol = dicom.read(tmp_path / "s")
    assert vol.array.dtype == np.int16
    assert_same_in_world(vol, itk_volume(tmp_path / "s"))


@pytest.mark.parametrize("iop", [AXIAL, SAGITTAL, OBLIQUE], ids=["ax", "sag", "obl"])
def test_voxel_axes_follow_iop_row_then_column_then_ascending_normal(
    tmp_path: Path, ct_data: np.ndarray, iop: tuple[float, ...]
) -> None:
    origin = np.array([10.0, -20.0, 30.0])
    write_series(tmp_path / "s", ct_data, iop=iop, origin=origin, step=-2.5, order="shuffled")
    vol = dicom.read(tmp_path / "s")
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    expected = np.eye(4)
    expected[:3, 0] = row * 0.9  # PixelSpacing[1]: distance between columns
    expected[:3, 1] = col * 0.7  # PixelSpacing[0]: distance between rows
    expected[:3, 2] = normal * 2.5  # ascending along the normal
    expected[:3, 3] = origin - normal * 2.5 * 3  # written with step -2.5: last slice is lowest
    np.testing.assert_allclose(vol.affine, LPS_TO_RAS @ expected, atol=1e-6)
    # data[i, j, k] was written at slice k, stacked in reverse by the negative step
    np.testing.assert_array_equal(vol.array[0], ct_data[:, :, ::-1].astype(np.int16))


# -- rescale, pixel representation, photometric -------------------------------------------------
def test_rescale_gives_exact_hounsfield_units(tmp_path: Path, ct_data: np.ndarray) -> None:
    write_series(tmp_path / "s", ct_data, slope=1.0, intercept=-1024)
    vol = dicom.read(tmp_path / "s")
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array[0], ct_data.astype(np.int32) - 1024)
    assert vol.meta["rescale"] == {"slope": 1.0, "intercept": -1024.0}


def test_non_unit_slope_gives_float32_with_exact_values(
    tmp_path: Path, ct_data: np.ndarray
) -> None:
    write_series(tmp_path / "s", ct_data, slope=0.25, intercept=-3.5)
    vol = dicom.read(tmp_path / "s")
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array[0], ct_data * 0.25 - 3.5)


def test_values_beyond_int16_come_back_as_float32(tmp_path: Path) -> None:
    data = np.full((4, 3, 2), 40000, dtype=np.uint16)
    write_series(tmp_path / "s", data, modality="MR")
    vol = dicom.read(tmp_path / "s")
    assert vol.array.dtype == np.float32
    assert float(vol.array.max()) == 40000.0


def test_signed_12_bit_pixels_keep_their_sign(tmp_path: Path) -> None:
    data = np.array([[-2048, -1, 0, 2047]], dtype=np.int16).T[:, :, None].repeat(2, axis=2)
    write_series(tmp_path / "s", data, bits_stored=12)
    vol = dicom.read(tmp_path / "s")
    np.testing.assert_array_equal(vol.array[0, :, 0, 0], [-2048, -1, 0, 2047])


def test_monochrome1_is_inverted_so_higher_is_brighter(tmp_path: Path) -> None:
    data = np.array([[0, 100, 4095]], dtype=np.uint16).T[:, :, None]
    write_slice(tmp_path / "x.dcm", data[:, :, 0].T, photometric="MONOCHROME1", bits_stored=12)
    vol = dicom.read(tmp_path / "x.dcm")
    np.testing.assert_array_equal(vol.array[0, :, 0, 0], [4095, 3995, 0])
    assert vol.meta["monochrome1_inverted"] is True


def test_rgb_image_gives_three_channels(tmp_path: Path, rng: np.random.Generator) -> None:
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)  # (rows, cols, samples)
    write_slice(tmp_path / "c.dcm", rgb, photometric="RGB", modality="MR")
    vol = dicom.read(tmp_path / "c.dcm")
    assert vol.array.shape == (3, 7, 5, 1)
    assert vol.meta["channels"] == ["R", "G", "B"]
    np.testing.assert_array_equal(vol.array[:, :, :, 0], np.transpose(rgb, (2, 1, 0)))


def test_single_slice_file_is_k1_with_slice_thickness(tmp_path: Path) -> None:
    img = np.arange(20, dtype=np.int16).reshape(4, 5)
    p = write_slice(tmp_path / "one.dcm", img, iop=CORONAL, thickness=3.0)
    vol = dicom.read(p)
    assert vol.shape == (5, 4, 1)
    assert vol.spacing[2] == pytest.approx(3.0)
    assert "SliceThickness" in vol.meta["slice_spacing_source"]
    np.testing.assert_array_equal(vol.array[0, :, :, 0], img.T)
    p2 = write_slice(tmp_path / "two.dcm", img, thickness=None)
    assert dicom.read(p2).spacing[2] == pytest.approx(1.0)


def test_rle_compressed_series_decodes_to_the_same_values(
    tmp_path: Path, ct_data: np.ndarray
) -> None:
    plain = write_series(tmp_path / "plain", ct_data, slope=1.0, intercept=-1024)
    (tmp_path / "rle").mkdir()
    for p in plain:
        ds = pydicom.dcmread(p)
        ds.compress(RLELossless, encoding_plugin="pydicom")
        ds.save_as(tmp_path / "rle" / p.name)
    vol = dicom.read(tmp_path / "rle")
    assert vol.meta["transfer_syntax"] == "RLE Lossless"
    ref = dicom.read(tmp_path / "plain")
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_array_equal(vol.affine, ref.affine)


def test_undecodable_pixel_data_names_file_and_syntax(tmp_path: Path, ct_data: np.ndarray) -> None:
    (p,) = write_series(tmp_path / "s", ct_data[:, :, :1])
    ds = pydicom.dcmread(p)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000, but bytes are not
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\x00garbage-not-a-codestream\x00"])
    ds["PixelData"].VR = "OB"
    ds.save_as(p)
    with pytest.raises(DicomError, match=r"s\d*.*slice_000\.dcm.*JPEG 2000.*pylibjpeg-openjpeg"):
        dicom.read(tmp_path / "s")


# -- slice positions: missing, duplicated, tilted ------------------------------------------------
def test_missing_slice_raises_and_allow_nonuniform_resamples_linearly(tmp_path: Path) -> None:
    positions = [0.0, 1.0, 2.0, 4.0, 5.0]  # slice at 3 missing; step 2 mm
    i, j, k = np.meshgrid(np.arange(4), np.arange(3), np.array(positions), indexing="ij")
    data = (100 * k + i + 10 * j).astype(np.uint16)  # linear along k: interpolation is exact
    write_series(tmp_path / "s", data, step=2.0, positions=positions, order="shuffled")
    with pytest.raises(DicomError, match="not uniform.*allow_nonuniform"):
        dicom.read(tmp_path / "s")
    vol = dicom.read(tmp_path / "s", allow_nonuniform=True)
    assert vol.shape == (4, 3, 6)
    assert vol.spacing[2] == pytest.approx(2.0)
    i, j, k = np.meshgrid(np.arange(4), np.arange(3), np.arange(6), indexing="ij")
    np.testing.assert_allclose(vol.array[0], 100 * k + i + 10 * j, atol=1e-3)
    assert vol.meta["resampled_to_spacing_mm"] == pytest.approx(2.0)


def test_duplicate_slice_position_raises(tmp_path: Path, ct_data: np.ndarray) -> None:
    write_series(tmp_path / "s", ct_data)
    write_slice(
        tmp_path / "s" / "extra.dcm",
        ct_data[:, :, 2].T + 1,
        ipp=np.array([10.0, -20.0, 30.0]) + np.array([0, 0, 2.5 * 2]),
        instance=99,
    )
    with pytest.raises(DicomError, match="duplicate slice.*extra.dcm"):
        dicom.read(tmp_path / "s")


def test_exact_copy_of_a_file_is_read_once(tmp_path: Path, ct_data: np.ndarray) -> None:
    paths = write_series(tmp_path / "s", ct_data)
    (tmp_path / "s" / "sub").mkdir()
    (tmp_path / "s" / "sub" / "copy.dcm").write_bytes(paths[1].read_bytes())
    vol = dicom.read(tmp_path / "s")
    assert vol.shape == ct_data.shape


def test_gantry_tilt_raises_and_correct_tilt_gives_the_sheared_true_geometry(
    tmp_path: Path, ct_data: np.ndarray
) -> None:
    t = np.deg2rad(15.0)
    iop = (1.0, 0.0, 0.0, 0.0, np.cos(t), -np.sin(t))  # tilted about x
    step = np.array([0.0, 0.0, 3.0])  # the table moves along z, not along the normal
    origin = np.array([10.0, -20.0, 30.0])
    write_series(tmp_path / "s", ct_data, iop=iop, origin=origin, step=step, order="shuffled")
    with pytest.raises(DicomError, match=r"gantry tilt of 15\.00 degrees.*correct_tilt"):
        dicom.read(tmp_path / "s")
    vol = dicom.read(tmp_path / "s", correct_tilt=True)
    assert vol.meta["gantry_tilt_deg"] == pytest.approx(15.0, abs=1e-3)
    # every voxel centre lands exactly where the DICOM header puts it
    for k in range(ct_data.shape[2]):
        ipp = origin + k * step
        for i, j in ((0, 0), (5, 0), (0, 4), (5, 4)):
            lps = ipp + i * 0.9 * np.array(iop[:3]) + j * 0.7 * np.array(iop[3:])
            np.testing.assert_allclose(vol.grid.world([i, j, k]), lps * [-1, -1, 1], atol=1e-6)
    np.testing.assert_array_equal(vol.array[0], ct_data)


# -- several images per position: channels ------------------------------------------------------
@pytest.mark.parametrize(
    ("tag", "values"),
    [("EchoNumbers", [2, 1]), ("TemporalPositionIdentifier", [3, 1, 2]), ("EchoTime", [30, 5])],
)
def test_multi_volume_at_same_positions_loads_as_ordered_channels(
    tmp_path: Path, tag: str, values: list[int]
) -> None:
    shape = (4, 3, 5)
    for n, v in enumerate(values):
        data = _volume_data(shape, seed=n).astype(np.int64) + 500 * v
        write_series(
            tmp_path / "s",
            data.astype(np.uint16),
            modality="MR",
            order="shuffled",
            seed=n,
            names=f"v{n}",
            extra={tag: v},
        )
    vol = dicom.read(tmp_path / "s")
    assert vol.array.shape == (len(values), *shape)
    ordered = sorted(values)
    assert vol.meta["channels"] == [
        f"{tag}={float(v) if tag == 'EchoTime' else v}" for v in ordered
    ]
    for c, v in enumerate(ordered):
        n = values.index(v)
        np.testing.assert_array_equal(
            vol.array[c], _volume_data(shape, seed=n).astype(np.int64) + 500 * v
        )


def test_unlabelled_repeats_are_ordered_by_instance_number(tmp_path: Path) -> None:
    shape = (3, 3, 3)
    for n in range(2):
        data = _volume_data(shape, seed=n) + 1000 * n
        paths = write_series(tmp_path / "s", data, modality="MR", names=f"v{n}")
        for p in paths:  # instance numbers 1..3 for volume 0, 11..13 for volume 1
            ds = pydicom.dcmread(p)
            ds.InstanceNumber = int(ds.InstanceNumber) + 10 * n
            ds.save_as(p)
    vol = dicom.read(tmp_path / "s")
    assert vol.channels == 2
    np.testing.assert_array_equal(vol.array[1], _volume_data(shape, seed=1) + 1000)


# -- series selection ---------------------------------------------------------------------------
def test_two_series_error_lists_both_and_series_picks_by_uid_or_index(
    tmp_path: Path, ct_data: np.ndarray
) -> None:
    write_series(tmp_path / "s", ct_data, series_uid="1.2.3.100", description="T1", names="a")
    other = ct_data[:, :, :3] + 7
    write_series(
        tmp_path / "s", other, series_uid="1.2.3.200", description="T2", names="b", iop=SAGITTAL
    )
    with pytest.raises(DicomError) as err:
        dicom.read(tmp_path / "s")
    msg = str(err.value)
    assert "\n" not in msg
    assert "1.2.3.100" in msg and "1.2.3.200" in msg and "'T1'" in msg and "'T2'" in msg
    assert "4 slice(s)" in msg and "3 slice(s)" in msg and "--series" in msg
    infos = dicom.list_series(tmp_path / "s")
    assert [i.uid for i in infos] == ["1.2.3.100", "1.2.3.200"]
    assert [i.slices for i in infos] == [4, 3]
    assert infos[0].orientation == "LPS" and infos[1].orientation == "PIR"
    assert infos[0].spacing == pytest.approx((0.9, 0.7, 2.5))
    assert infos[0].rows == 5 and infos[0].columns == 6 and len(infos[0].files) == 4
    by_uid = dicom.read(tmp_path / "s", series="1.2.3.200")
    np.testing.assert_array_equal(by_uid.array[0], other.astype(np.int16))
    by_index = read_volume(tmp_path / "s", series=1)
    np.testing.assert_array_equal(by_index.array, by_uid.array)
    np.testing.assert_array_equal(dicom.read(tmp_path / "s", series="0").array[0], ct_data)
    with pytest.raises(DicomError, match="no series '7'"):
        dicom.read(tmp_path / "s", series=7)


def test_mixed_orientations_within_one_series_are_not_stacked(
    tmp_path: Path, ct_data: np.ndarray
) -> None:
    write_series(tmp_path / "s", ct_data, names="a")
    write_series(tmp_path / "s", ct_data[:, :, :2], names="b", iop=CORONAL)
    with pytest.raises(DicomError, match=r"holds 2 image series.*LPS.*LIP"):
        dicom.read(tmp_path / "s")


# -- not images, empty folders, skipped files ---------------------------------------------------
def _non_image(path: Path, modality: str, sop_class: str) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.save_as(path, enforce_file_format=True)
    return path


RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
BASIC_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def test_non_image_file_raises(tmp_path: Path) -> None:
    p = _non_image(tmp_path / "rs.dcm", "RTSTRUCT", RTSTRUCT)
    with pytest.raises(DicomError, match=r"rs\.dcm.*RTSTRUCT.*not an image"):
        dicom.read(p)
    (tmp_path / "sr").mkdir()
    _non_image(tmp_path / "sr" / "report.dcm", "SR", BASIC_SR)
    with pytest.raises(DicomError, match="no image"):
        dicom.read(tmp_path / "sr")


def test_image_without_pixel_data_raises(tmp_path: Path, ct_data: np.ndarray) -> None:
    (p,) = write_series(tmp_path / "s", ct_data[:, :, :1])
    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p)
    with pytest.raises(DicomError, match=r"slice_000\.dcm.*no pixel data"):
        dicom.read(p)


def test_folder_skips_non_dicom_files_and_non_image_objects(
    tmp_path: Path, ct_data: np.ndarray
) -> None:
    write_series(tmp_path / "s" / "deep" / "er", ct_data)
    (tmp_path / "s" / "notes.txt").write_text("not dicom")
    (tmp_path / "s" / "DICOMDIR").write_bytes(b"\0" * 300)
    _non_image(tmp_path / "s" / "rs.dcm", "RTSTRUCT", RTSTRUCT)
    vol = dicom.read(tmp_path / "s")
    np.testing.assert_array_equal(vol.array[0], ct_data)


def test_empty_folder_and_folder_without_dicom_raise(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match="no DICOM files found"):
        dicom.read(tmp_path / "empty")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.dcm").write_text("hello")
    with pytest.raises(DicomError, match="no DICOM files found"):
        dicom.read(tmp_path / "txt")


def test_meta_is_json_serialisable(tmp_path: Path, ct_data: np.ndarray) -> None:
    import json

    write_series(tmp_path / "s", ct_data, slope=1.0, intercept=-1024)
    meta = dicom.read(tmp_path / "s").meta
    json.dumps(meta)
    assert meta["modality"] == "CT" and meta["series_uid"] == "1.2.3.4"
    assert meta["transfer_syntax"] == "Explicit VR Little Endian"
    assert meta["channels"] == ["CT"]


# -- Siemens CSA header -------------------------------------------------------------------------
def test_csa_parser_reads_mosaic_count_and_slice_normal(data_root: Path) -> None:
    for p in sorted((data_root / "dicom").glob("siemens_transfer_syntax_*/dicom/*")):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        raw = ds[0x0029, 0x1010].value
        tags = dicom.parse_csa_header(raw)
        assert tags["NumberOfImagesInMosaic"] == ["35"], p
        # the private tag (0019,100A) says the same, independently of the CSA layout
        assert int(ds[0x0019, 0x100A].value) == 35
        normal = np.array([float(v) for v in tags["SliceNormalVector"]])
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        np.testing.assert_allclose(normal, np.cross(iop[:3], iop[3:]), atol=1e-6)


# -- real data ----------------------------------------------------------------------------------
REFERENCED = [
    "ge_mr_sagittal",
    "jpeg2000_mr",
    "jpeg_lossless_mr",
    "jpegls_mr",
    "nonisotropic_mr",
    "philips_enhanced_multiframe_mr",
    "philips_mr_coronal",
    "siemens_enhanced_multiframe_mr",
    "siemens_mr_sagittal",
    *[f"siemens_transfer_syntax_{n}" for n in (1, 2, 3, 5, 6, 7, 8, 9)],
]


def test_every_referenced_real_series_is_covered(data_root: Path) -> None:
    have = sorted(p.parent.name for p in (data_root / "dicom").glob("*/reference.nii.gz"))
    assert have == sorted(REFERENCED)


@pytest.mark.parametrize("name", REFERENCED)
def test_real_series_matches_reference_conversion(data_root: Path, name: str) -> None:
    """Voxels equal (float-scaled: 1e-3 relative) and affines within 1e-3 mm of the reference.

    References: dcm2niix for the Siemens mosaics (``siemens_transfer_syntax_*``, split into
    35 slices from the CSA header), dicom2nifti for the others. The Philips enhanced reference
    is float after RescaleSlope and 4D with a last dimension of 1 (squeezed here).
    """
    folder = data_root / "dicom" / name
    vol = dicom.read(folder / "dicom").reoriented("RAS")
    ref = nib.as_closest_canonical(nib.load(folder / "reference.nii.gz"))
    data = np.asarray(ref.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    assert vol.array.shape == (1, *data.shape)
    ref_grid = Grid(data.shape, ref.affine)
    assert vol.grid.max_corner_distance(ref_grid) <= 1e-3
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-3)
    if np.issubdtype(data.dtype, np.integer):
        np.testing.assert_array_equal(vol.array[0], data)
    else:
        np.testing.assert_allclose(vol.array[0], data, rtol=1e-3, atol=1e-3 * np.abs(data).max())


def test_real_mosaics_agree_across_all_eight_transfer_syntaxes(data_root: Path) -> None:
    vols = [
        dicom.read(p)
        for p in sorted((data_root / "dicom").glob("siemens_transfer_syntax_*/dicom/*.dcm"))
    ]
    assert len(vols) == 8
    assert {v.meta["mosaic"]["tiles"] for v in vols} == {35}
    for v in vols[1:]:
        np.testing.assert_array_equal(v.array, vols[0].array)
        np.testing.assert_array_equal(v.affine, vols[0].affine)


def test_real_gantry_tilt_raises_by_default_and_loads_sheared(data_root: Path) -> None:
    folder = data_root / "dicom" / "siemens_ct_gantry_tilt" / "dicom"
    with pytest.raises(DicomError, match=r"gantry tilt of 14\.0\d degrees"):
        dicom.read(folder)
    vol = dicom.read(folder, correct_tilt=True)
    assert vol.shape == (512, 512, 4) and vol.meta["modality"] == "CT"
    # slice k (ascending z here) holds the file with the k-th lowest position; its voxel
    # (0, 0, k) is that file's ImagePositionPatient, and its values are GDCM's reading in HU
    files = sorted(
        folder.iterdir(),
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    for k, p in enumerate(files):
        ipp = np.array(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient, float)
        np.testing.assert_allclose(vol.grid.world([0, 0, k]), ipp * [-1, -1, 1], atol=1e-4)
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(p))).reshape(512, 512)
        np.testing.assert_array_equal(vol.array[0, :, :, k], img.T)


def test_real_jpeg2000_ct_equals_simpleitk_conversion_in_world(data_root: Path) -> None:
    vol = dicom.read(data_root / "dicom" / "siemens_ct_axial_jpeg2000" / "dicom")
    ref = nib.load(data_root / "ct_examples" / "totalseg_example_ct_dicom_derived" / "ct.nii.gz")
    data = np.asarray(ref.dataobj)
    assert vol.meta["modality"] == "CT" and vol.array.dtype == np.int16
    same = vol.reoriented(nib.aff2axcodes(ref.affine))
    assert same.grid.max_corner_distance(Grid(data.shape, ref.affine)) <= 1e-3
    np.testing.assert_array_equal(same.array[0], data)


def test_list_series_on_real_folder_describes_the_mosaic(data_root: Path) -> None:
    (info,) = dicom.list_series(data_root / "dicom" / "siemens_transfer_syntax_7" / "dicom")
    assert (info.modality, info.frames, info.slices, info.rows, info.columns) == (
        "MR",
        35,
        35,
        64,
        64,
    )
    assert info.spacing == pytest.approx((3.25, 3.25, 3.6))
    assert info.transfer_syntax == "JPEG-LS Lossless Image Compression"


# -- enhanced multi-frame, mosaics, other syntaxes, decoder fallback ----------------------------
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def _item(**kwargs: Any) -> Dataset:
    d = Dataset()
    for k, v in kwargs.items():
        setattr(d, k, v)
    return d


def test_enhanced_multiframe_with_per_frame_rescale_and_two_time_points(tmp_path: Path) -> None:
    """4 positions x 2 time points in one file, frames in scrambled order, per-frame slopes."""
    rows, cols, k_count = 3, 4, 4
    iop = OBLIQUE
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([5.0, 6.0, -7.0])
    rng = np.random.default_rng(3)
    order = [(t, k) for t in (2, 1) for k in rng.permutation(k_count)]
    stored = rng.integers(0, 1000, (len(order), rows, cols)).astype(np.uint16)
    slopes = [0.5 + 0.25 * n for n in range(len(order))]
    per_frame = []
    for n, (t, k) in enumerate(order):
        per_frame.append(
            _item(
                PlanePositionSequence=[
                    _item(ImagePositionPatient=[f"{v:.8f}" for v in origin + normal * 1.5 * k])
                ],
                FrameContentSequence=[
                    _item(TemporalPositionIndex=int(t), InStackPositionNumber=int(k))
                ],
                PixelValueTransformationSequence=[
                    _item(RescaleSlope=f"{slopes[n]}", RescaleIntercept="-10", RescaleType="US")
                ],
            )
        )
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_MR, ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality = "1.2.3.77", "MR"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, len(order)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SharedFunctionalGroupsSequence = [
        _item(
            PixelMeasuresSequence=[_item(PixelSpacing=["0.8", "0.6"], SliceThickness="1.5")],
            PlaneOrientationSequence=[_item(ImageOrientationPatient=[f"{v:.8f}" for v in iop])],
        )
    ]
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = stored.tobytes()
    ds.save_as(tmp_path / "enh.dcm", enforce_file_format=True)

    vol = dicom.read(tmp_path / "enh.dcm")
    assert vol.array.shape == (2, cols, rows, k_count)
    assert vol.meta["channels"] == ["TemporalPositionIndex=1", "TemporalPositionIndex=2"]
    for n, (t, k) in enumerate(order):
        expected = stored[n].T.astype(np.float64) * slopes[n] - 10
        np.testing.assert_allclose(vol.array[t - 1, :, :, k], expected, rtol=1e-6)
    expected_affine = np.eye(4)
    expected_affine[:3, 0] = np.array(iop[:3]) * 0.6
    expected_affine[:3, 1] = np.array(iop[3:]) * 0.8
    expected_affine[:3, 2] = normal * 1.5
    expected_affine[:3, 3] = origin
    np.testing.assert_allclose(vol.affine, LPS_TO_RAS @ expected_affine, atol=1e-6)


def _csa_sv10(tags: dict[str, list[str]]) -> bytes:
    """A Siemens CSA2 header written from the layout in the docstring of medseg.io.dicom."""
    out = b"SV10\x04\x03\x02\x01" + struct.pack("<II", len(tags), 77)
    for name, values in tags.items():
        out += struct.pack("<64si4siii", name.encode(), len(values), b"DS\0\0", 3, 6, 77)
        for n in range(6):
            if n < len(values):
                v = values[n].encode() + b"\0"
                out += struct.pack("<4i", len(v), len(v), 77, len(v)) + v
                out += b"\0" * (-len(v) % 4)
            else:
                out += struct.pack("<4i", 0, 0, 205, 0)
    return out


def test_synthetic_mosaic_with_reversed_slice_normal_splits_and_sorts(tmp_path: Path) -> None:
    n_tiles, tile, side = 5, (3, 4), 3  # 5 tiles of 3 rows x 4 cols in a 3x3 grid
    rows, cols = tile[0] * side, tile[1] * side
    rng = np.random.default_rng(5)
    tiles = rng.integers(0, 3000, (n_tiles, *tile)).astype(np.uint16)
    mosaic = np.zeros((rows, cols), dtype=np.uint16)
    for t in range(n_tiles):
        r, c = divmod(t, side)
        mosaic[r * tile[0] : (r + 1) * tile[0], c * tile[1] : (c + 1) * tile[1]] = tiles[t]
    normal = np.cross(AXIAL[:3], AXIAL[3:])
    snv = -normal  # tiles stored from top to bottom
    ps = (2.0, 2.5)
    ipp = np.array([-100.0, -80.0, 40.0])
    p = write_slice(
        tmp_path / "mosaic.dcm",
        mosaic,
        ipp=ipp,
        pixel_spacing=ps,
        modality="MR",
        extra={
            "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"],
            "Manufacturer": "SIEMENS",
        },
    )
    ds = pydicom.dcmread(p)
    ds.SpacingBetweenSlices = "3.0"
    block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    csa = _csa_sv10(
        {"NumberOfImagesInMosaic": [str(n_tiles)], "SliceNormalVector": [str(v) for v in snv]}
    )
    block.add_new(0x10, "OB", csa)
    ds.save_as(p)
    assert dicom.parse_csa_header(csa)["NumberOfImagesInMosaic"] == ["5"]

    vol = dicom.read(p)
    assert vol.shape == (tile[1], tile[0], n_tiles)
    # tile t's corner: IPP moved to the tile (dcm2niix rule), then t * 3 mm along the CSA normal
    corner = ipp + np.array(AXIAL[:3]) * ps[1] * (cols - tile[1]) / 2
    corner = corner + np.array(AXIAL[3:]) * ps[0] * (rows - tile[0]) / 2
    for k in range(n_tiles):
        t = n_tiles - 1 - k  # ascending along the normal = the last tile first
        np.testing.assert_array_equal(vol.array[0, :, :, k], tiles[t].T)
        lps = corner + snv * 3.0 * t
        np.testing.assert_allclose(vol.grid.world([0, 0, k]), lps * [-1, -1, 1], atol=1e-6)


@pytest.mark.parametrize("syntax", ["deflated", "big_endian"])
def test_deflated_and_big_endian_series_read_like_the_plain_one(
    tmp_path: Path, ct_data: np.ndarray, syntax: str
) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

    plain = write_series(tmp_path / "plain", ct_data, slope=1.0, intercept=-1024)
    (tmp_path / syntax).mkdir()
    for p in plain:
        ds = pydicom.dcmread(p)
        out = tmp_path / syntax / p.name
        if syntax == "deflated":
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
            ds.save_as(out)
        else:
            arr = ds.pixel_array
            ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
            ds.PixelData = arr.astype(">u2").tobytes()
            pydicom.dcmwrite(out, ds, little_endian=False, implicit_vr=False, force_encoding=True)
    vol = dicom.read(tmp_path / syntax)
    ref = dicom.read(tmp_path / "plain")
    assert vol.meta["transfer_syntax"] != ref.meta["transfer_syntax"]
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_array_equal(vol.affine, ref.affine)


def test_simpleitk_fallback_when_pydicom_cannot_decode(
    tmp_path: Path, ct_data: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_series(tmp_path / "s", ct_data, slope=1.0, intercept=-1024)
    ref = dicom.read(tmp_path / "s")

    def refuse(self: Dataset) -> np.ndarray:
        raise RuntimeError("no pixel data handler")

    monkeypatch.setattr(Dataset, "pixel_array", property(refuse))
    vol = dicom.read(tmp_path / "s")
    np.testing.assert_array_equal(vol.array, ref.array)


def test_truncated_file_is_reported_as_truncated(tmp_path: Path, ct_data: np.ndarray) -> None:
    paths = write_series(tmp_path / "s", ct_data)
    paths[2].write_bytes(paths[2].read_bytes()[:-25])
    with pytest.raises(DicomError, match=r"slice_002\.dcm.*truncated"):
        dicom.read(tmp_path / "s")


def test_slice_without_position_in_a_series_raises(tmp_path: Path, ct_data: np.ndarray) -> None:
    paths = write_series(tmp_path / "s", ct_data)
    ds = pydicom.dcmread(paths[1])
    del ds.ImagePositionPatient
    ds.save_as(paths[1])
    with pytest.raises(DicomError, match=r"slice_001\.dcm.*no ImagePositionPatient"):
        dicom.read(tmp_path / "s")
