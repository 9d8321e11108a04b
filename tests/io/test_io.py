"""Readers and writers: NIfTI (nibabel), NRRD/MHA (SimpleITK), 2D images (Pillow).

Every check compares against an independent reference: nibabel or SimpleITK reading the same
file, Pillow's own pixel array, a hand-written NRRD header parser, or analytic values.
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medseg.errors import ReadError, WriteError
from medseg.io import read_volume, write_volume
from medseg.io.nifti import rigid_part
from medseg.volume import Grid, Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


# -- NIfTI ---------------------------------------------------------------------------------------


def test_nifti_round_trip_oblique_affine_exact(image_volume: Volume, tmp_path: Path) -> None:
    out = tmp_path / "img.nii.gz"
    write_volume(image_volume, out)
    back = read_volume(out)
    np.testing.assert_array_equal(back.array, image_volume.array)
    np.testing.assert_allclose(back.affine, image_volume.affine, atol=1e-6)
    assert back.grid.max_corner_distance(image_volume.grid) < 1e-6
    # nibabel sees the same geometry through both sform and qform (no shear here)
    img = nib.load(str(out))
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    np.testing.assert_allclose(img.header.get_sform(), image_volume.affine, atol=1e-6)
    np.testing.assert_allclose(img.header.get_qform(), image_volume.affine, atol=1e-5)
    assert img.header.get_data_dtype() == np.float32


def test_nifti_sheared_affine_sform_exact_qform_rigid(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    a = np.eye(4)
    a[:3, :3] = [[0.9, 0.25, 0.0], [0.0, 1.1, 0.0], [0.1, 0.0, 2.5]]  # shear (gantry-tilt like)
    a[:3, 3] = [-10.0, 20.0, 5.0]
    vol = Volume(rng.integers(-500, 500, size=(1, 6, 7, 5)).astype(np.int16), Grid((6, 7, 5), a))
    out = tmp_path / "shear.nii"
    write_volume(vol, out)
    back = read_volume(out)
    np.testing.assert_allclose(back.affine, a, atol=1e-6)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, vol.array)
    q = nib.load(str(out)).header.get_qform()
    r = q[:3, :3] / np.linalg.norm(q[:3, :3], axis=0)
    np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-5)  # qform is rigid
    np.testing.assert_allclose(q, rigid_part(a), atol=1e-5)
    np.testing.assert_allclose(q[:3, 3], a[:3, 3], atol=1e-6)


def test_nifti_multichannel_is_4d_in_file(
    oblique_grid: Grid, tmp_path: Path, rng: np.random.Generator
) -> None:
    arr = rng.normal(size=(3, *oblique_grid.shape)).astype(np.float32)
    out = tmp_path / "mc.nii.gz"
    write_volume(Volume(arr, oblique_grid), out)
    data = np.asarray(nib.load(str(out)).dataobj)
    assert data.shape == (*oblique_grid.shape, 3)
    np.testing.assert_array_equal(np.moveaxis(data, 3, 0), arr)
    np.testing.assert_array_equal(read_volume(out).array, arr)


def test_nifti_scaling_applied_as_float32(tmp_path: Path, rng: np.random.Generator) -> None:
    raw = rng.integers(-100, 100, size=(4, 5, 6)).astype(np.int16)
    nib.save(nib.Nifti1Image(raw, np.diag([2.0, 2.0, 3.0, 1.0])), str(tmp_path / "s.nii"))
    # nibabel drops a no-op scaling on save, so patch scl_slope/scl_inter (bytes 112-119)
    data = bytearray((tmp_path / "s.nii").read_bytes())
    data[112:120] = struct.pack("<ff", 0.5, -7.0)
    (tmp_path / "s.nii.gz").write_bytes(gzip.compress(bytes(data)))
    proxy = nib.load(str(tmp_path / "s.nii.gz")).dataobj
    assert (proxy.slope, proxy.inter) == (0.5, -7.0)
    vol = read_volume(tmp_path / "s.nii.gz")
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array[0], raw * 0.5 - 7.0, atol=1e-6)


def test_nifti_unscaled_integer_keeps_dtype(tmp_path: Path) -> None:
    raw = np.arange(60, dtype=np.uint16).reshape(3, 4, 5) * 1000
    nib.save(nib.Nifti1Image(raw, np.eye(4)), str(tmp_path / "u.nii"))
    vol = read_volume(tmp_path / "u.nii")
    assert vol.array.dtype == np.uint16
    np.testing.assert_array_equal(vol.array[0], raw)


def test_nifti_5d_vector_maps_to_channels_and_2d_gets_k1(tmp_path: Path) -> None:
    raw = np.arange(4 * 5 * 6 * 3, dtype=np.float32).reshape(4, 5, 6, 1, 3)
    nib.save(nib.Nifti1Image(raw, np.eye(4)), str(tmp_path / "v.nii.gz"))
    vol = read_volume(tmp_path / "v.nii.gz")
    assert vol.array.shape == (3, 4, 5, 6)
    np.testing.assert_array_equal(vol.array[2], raw[..., 0, 2])
    flat = np.ones((4, 5), np.uint8)
    nib.save(nib.Nifti1Image(flat, np.eye(4)), str(tmp_path / "f.nii.gz"))
    assert read_volume(tmp_path / "f.nii.gz").shape == (4, 5, 1)


@pytest.mark.parametrize(
    ("values", "dtype"),
    [((0, 4), np.uint8), ((0, 300), np.uint16), ((-1, 5), np.int16)],
)
def test_nifti_label_written_in_smallest_dtype(
    values: tuple[int, int], dtype: type, tmp_path: Path
) -> None:
    arr = np.zeros((1, 3, 3, 3), np.int32)
    arr[0, 0, 0, 0], arr[0, 1, 1, 1] = values
    write_volume(Volume(arr, Grid.from_spacing((3, 3, 3)), is_label=True), tmp_path / "l.nii.gz")
    img = nib.load(str(tmp_path / "l.nii.gz"))
    assert img.header.get_data_dtype() == dtype
    np.testing.assert_array_equal(np.asarray(img.dataobj), arr[0])


def test_nifti_keeps_aligned_code_from_source(data_root: Path, tmp_path: Path) -> None:
    src = data_root / "brats2013/brats_2013_pat0001_1/Flair_subtrMeanDivStd.nii.gz"
    ref = nib.load(str(src))
    vol = read_volume(src)
    np.testing.assert_array_equal(vol.array[0], ref.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(vol.affine, ref.affine, atol=0)
    assert vol.orientation == ("L", "P", "S")
    write_volume(vol, tmp_path / "f.nii.gz")
    hdr = nib.load(str(tmp_path / "f.nii.gz")).header
    assert int(hdr["sform_code"]) == int(ref.header["sform_code"]) == 2


def test_nifti_truncated_text_and_empty_files_raise_read_error(
    tmp_path: Path, image_volume: Volume
) -> None:
    good = tmp_path / "good.nii.gz"
    write_volume(image_volume, good)
    data = good.read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.nii").write_text("this is not a NIfTI file\n" * 40)
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    raw = gzip.decompress(data)
    (tmp_path / "trunc.nii").write_bytes(raw[: len(raw) // 2])
    for name in ("trunc.nii.gz", "text.nii", "empty.nii.gz", "trunc.nii"):
        with pytest.raises(ReadError, match=re.escape(name)) as info:
            read_volume(tmp_path / name)
        assert "\n" not in str(info.value)


# -- NRRD / MetaImage ----------------------------------------------------------------------------


def _parse_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Independent minimal NRRD reader: RAS+ affine and (i, j, k) array (gzip/raw, LE)."""
    blob = path.read_bytes()
    head, _, body = blob.partition(b"\n\n")
    fields = {}
    for line in head.decode("ascii").splitlines()[1:]:
        if line.startswith("#") or ": " not in line:
            continue
        k, v = line.split(": ", 1)
        fields[k.strip()] = v.strip()
    assert fields["space"] == "left-posterior-superior"
    dirs = [
        [float(x) for x in g.split(",")]
        for g in re.findall(r"\(([^)]*)\)", fields["space directions"])
    ]
    origin = [float(x) for x in re.findall(r"\(([^)]*)\)", fields["space origin"])[0].split(",")]
    lps = np.eye(4)
    lps[:3, :3] = np.array(dirs).T  # each direction is a column
    lps[:3, 3] = origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    sizes = [int(s) for s in fields["sizes"].split()]
    dtype = {"short": "<i2", "int": "<i4", "unsigned char": "u1", "uchar": "u1"}[fields["type"]]
    raw = gzip.decompress(body) if fields["encoding"] == "gzip" else body
    arr = np.frombuffer(raw, dtype=dtype, count=int(np.prod(sizes))).reshape(sizes, order="F")
    return ras, arr


@pytest.mark.parametrize("case", ["brain1", "brain2", "breast1"])
def test_nrrd_matches_independent_header_parse(data_root: Path, case: str) -> None:
    image = read_volume(data_root / "nrrd" / case / "image.nrrd")
    label = read_volume(data_root / "nrrd" / case / "label.nrrd", label=True)
    ras, arr = _parse_nrrd(data_root / "nrrd" / case / "image.nrrd")
    np.testing.assert_allclose(image.affine, ras, atol=1e-9)
    np.testing.assert_array_equal(image.array[0], arr)
    assert image.array.dtype == np.int16
    assert image.grid.allclose(label.grid, atol_mm=1e-6)
    assert set(np.unique(label.array).tolist()) == {0, 1}
    if case.startswith("brain"):
        # negative 2nd space direction in LPS = +A in RAS: the J axis runs anterior
        assert image.orientation == ("L", "A", "S")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_round_trip_matches_simpleitk(
    image_volume: Volume, tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / f"img{suffix}"
    write_volume(image_volume, out)
    back = read_volume(out)
    np.testing.assert_array_equal(back.array, image_volume.array)
    np.testing.assert_allclose(back.affine, image_volume.affine, atol=1e-6)
    # SimpleITK's own view of the file: LPS geometry, (k, j, i) array
    img = sitk.ReadImage(str(out))
    d = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())[None, :]
    np.testing.assert_allclose(LPS_TO_RAS @ d, image_volume.affine[:3, :3], atol=1e-6)
    np.testing.assert_allclose(
        LPS_TO_RAS @ np.array(img.GetOrigin()), image_volume.affine[:3, 3], atol=1e-6
    )
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).T, image_volume.array[0])


def test_itk_vector_pixels_are_channels_and_labels_stay_integer(
    oblique_grid: Grid, tmp_path: Path, rng: np.random.Generator
) -> None:
    arr = rng.normal(size=(2, *oblique_grid.shape)).astype(np.float32)
    write_volume(Volume(arr, oblique_grid), tmp_path / "v.mha")
    assert sitk.ReadImage(str(tmp_path / "v.mha")).GetNumberOfComponentsPerPixel() == 2
    np.testing.assert_array_equal(read_volume(tmp_path / "v.mha").array, arr)
    lab = rng.integers(0, 3, size=(1, *oblique_grid.shape)).astype(np.int64)
    write_volume(Volume(lab, oblique_grid, is_label=True), tmp_path / "l.nrrd")
    img = sitk.ReadImage(str(tmp_path / "l.nrrd"))
    assert img.GetPixelID() == sitk.sitkUInt8
    back = read_volume(tmp_path / "l.nrrd")
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, lab)


def test_itk_refuses_detached_header_and_corrupt_file(image_volume: Volume, tmp_path: Path) -> None:
    with pytest.raises(WriteError, match="nhdr"):
        write_volume(image_volume, tmp_path / "x.nhdr")
    assert list(tmp_path.iterdir()) == []
    write_volume(image_volume, tmp_path / "x.nrrd")
    data = (tmp_path / "x.nrrd").read_bytes()
    (tmp_path / "bad.nrrd").write_bytes(data[: len(data) - 2000])
    with pytest.raises(ReadError, match="bad.nrrd"):
        read_volume(tmp_path / "bad.nrrd")


# -- 2D images -----------------------------------------------------------------------------------


def _pil(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_png_axis_convention_matches_pil_and_simpleitk(data_root: Path) -> None:
    path = data_root / "isbi2012/images/slice_03.png"
    vol = read_volume(path)
    hw = _pil(path)
    assert vol.array.shape == (1, hw.shape[1], hw.shape[0], 1)  # (C, width, height, 1)
    np.testing.assert_array_equal(vol.array[0, :, :, 0], hw.T)
    img = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).T, vol.array[0, :, :, 0])
    # ITK: identity LPS direction, spacing 1, origin 0 -> RAS diag(-1, -1, 1)
    assert img.GetDirection() == (1.0, 0.0, 0.0, 1.0) and img.GetSpacing() == (1.0, 1.0)
    np.testing.assert_array_equal(vol.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert vol.spacing == (1.0, 1.0, 1.0)


def test_drive_tif_is_rgb_and_gif_keeps_0_255(data_root: Path) -> None:
    tif = data_root / "drive/training/images/21_training.tif"
    vol = read_volume(tif)
    rgb = _pil(tif)
    assert vol.array.shape == (3, 565, 584, 1)
    np.testing.assert_array_equal(np.transpose(vol.array[..., 0], (2, 1, 0)), rgb)
    for gif in ("1st_manual/21_manual1.gif", "mask/21_training_mask.gif"):
        lab = read_volume(data_root / "drive/training" / gif, label=True)
        assert set(np.unique(lab.array).tolist()) == {0, 255}
        np.testing.assert_array_equal(
            lab.array[0, :, :, 0], _pil(data_root / "drive/training" / gif).T
        )


def test_dsb_rgba_constant_alpha_dropped_and_uint16_labels(data_root: Path) -> None:
    images = sorted((data_root / "dsb2018_nuclei/images").glob("*.png"))[:3]
    for path in images:
        rgba = _pil(path)
        assert rgba.shape[2] == 4 and np.all(rgba[..., 3] == 255)
        vol = read_volume(path)
        assert vol.channels == 3
        np.testing.assert_array_equal(np.transpose(vol.array[..., 0], (2, 1, 0)), rgba[..., :3])
        lab_path = data_root / "dsb2018_nuclei/labels" / path.name
        lab = read_volume(lab_path)
        assert lab.array.dtype == np.uint16
        np.testing.assert_array_equal(lab.array[0, :, :, 0], _pil(lab_path).T)


def test_rgba_with_varying_alpha_keeps_four_channels(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    hw = rng.integers(0, 256, size=(7, 9, 4), dtype=np.uint8)
    Image.fromarray(hw).save(tmp_path / "a.png")
    vol = read_volume(tmp_path / "a.png")
    assert vol.channels == 4
    np.testing.assert_array_equal(np.transpose(vol.array[..., 0], (2, 1, 0)), hw)


def test_grey_palette_gives_levels_colour_palette_gives_rgb(tmp_path: Path) -> None:
    idx = np.array([[0, 1, 1], [1, 0, 0]], np.uint8)
    grey = Image.fromarray(idx, mode="P")
    grey.putpalette([0, 0, 0, 255, 255, 255])
    grey.save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "P"
    vol = read_volume(tmp_path / "g.png")
    np.testing.assert_array_equal(vol.array[0, :, :, 0], (idx * 255).T)
    colour = Image.fromarray(idx, mode="P")
    colour.putpalette([10, 20, 30, 200, 100, 50])
    colour.save(tmp_path / "c.png")
    vol = read_volume(tmp_path / "c.png")
    assert vol.channels == 3
    np.testing.assert_array_equal(vol.array[:, 1, 0, 0], [200, 100, 50])  # x=1, y=0 is index 1


def test_png_label_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    for hi in (5, 1000):
        lab = rng.integers(0, hi + 1, size=(1, 13, 8, 1)).astype(np.int32)
        vol = Volume(lab, Grid((13, 8, 1), np.diag([-1.0, -1.0, 1.0, 1.0])), is_label=True)
        write_volume(vol, tmp_path / f"l{hi}.png")
        hw = _pil(tmp_path / f"l{hi}.png")
        assert hw.shape == (8, 13) and hw.dtype == (np.uint8 if hi < 256 else np.uint16)
        np.testing.assert_array_equal(hw, lab[0, :, :, 0].T)
        back = read_volume(tmp_path / f"l{hi}.png", label=True)
        np.testing.assert_array_equal(back.array, lab)
        assert back.grid == vol.grid


def test_png_writer_refuses_3d_and_out_of_range(image_volume: Volume, tmp_path: Path) -> None:
    with pytest.raises(WriteError, match="K > 1"):
        write_volume(image_volume, tmp_path / "x.png")
    flt = Volume(np.full((1, 4, 4, 1), 0.5, np.float32), Grid.from_spacing((4, 4, 1)))
    with pytest.raises(WriteError, match="8/16-bit"):
        write_volume(flt, tmp_path / "f.png")
    assert list(tmp_path.iterdir()) == []


def test_truncated_png_raises_read_error(data_root: Path, tmp_path: Path) -> None:
    data = (data_root / "isbi2012/images/slice_00.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 3])
    with pytest.raises(ReadError, match="t.png"):
        read_volume(tmp_path / "t.png")


def test_split_suffix_gives_case_ids_for_every_volume_format(tmp_path: Path) -> None:
    from medseg.io import split_suffix

    assert split_suffix("a/case_01.nii.gz") == ("case_01", ".nii.gz")
    assert split_suffix("case_01.nii") == ("case_01", ".nii")
    assert split_suffix("x.NRRD") == ("x", ".NRRD")
    assert split_suffix("img.v2.png") == ("img.v2", ".png")
    assert split_suffix("notes.txt") == ("notes", ".txt")
    series = tmp_path / "series.1"
    series.mkdir()
    assert split_suffix(series) == ("series.1", "")  # a DICOM folder keeps its whole name


def test_dicom_and_itk_readers_place_a_series_where_simpleitk_does(tmp_path: Path) -> None:
    """One DICOM series read by medseg's DICOM reader, and its SimpleITK copy read back from
    NRRD by medseg's ITK reader, both have SimpleITK's own geometry taken to RAS+ by negating
    x and y (the one LPS<->RAS flip, written out here independently)."""
    import SimpleITK as sitk

    from medseg.demo_data import make_case, write_dicom_series
    from medseg.io import read_volume

    image, _ = make_case(0, 3)
    write_dicom_series(image, tmp_path / "dcm")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "dcm")))
    ref = reader.Execute()
    lps = np.eye(4)
    d = np.asarray(ref.GetDirection()).reshape(3, 3)
    lps[:3, :3] = d * np.asarray(ref.GetSpacing())[None, :]
    lps[:3, 3] = ref.GetOrigin()
    want = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    got = read_volume(tmp_path / "dcm")
    sitk.WriteImage(ref, str(tmp_path / "copy.nrrd"))
    via_itk = read_volume(tmp_path / "copy.nrrd")
    for v in (got, via_itk):
        # the DICOM reader may run K the other way: compare the same voxels' positions
        same = v.reoriented(image.orientation)
        expect = Volume(np.zeros((1, *ref.GetSize())), Grid(ref.GetSize(), want))
        np.testing.assert_allclose(
            same.grid.corners(), expect.reoriented(image.orientation).grid.corners(), atol=1e-3
        )


def test_itk_write_on_a_full_disk_is_named_a_full_disk_and_leaves_nothing(
    tmp_path: Path, image_volume: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ITK reports a short write as a RuntimeError without an errno ("expected to write N
    bytes, but only wrote M"); with no space left that is a full disk."""
    import os

    def short(image: object, path: str, compress: bool) -> None:
        Path(path).write_bytes(b"NRRD0004\n")  # part of a file, then ITK gives up
        raise RuntimeError("expected to write 1638400 bytes, but only wrote 491520")

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(sitk, "WriteImage", short)
    monkeypatch.setattr(os, "statvfs", lambda _path: Full())
    with pytest.raises(WriteError, match=r"x\.nrrd: disk full while writing to") as info:
        write_volume(image_volume, tmp_path / "x.nrrd")
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []
