"""Report pictures in the radiological display orientation, whatever the file's voxel order."""

from __future__ import annotations

import io

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medseg.report.evaluate import EvalPair, evaluate_pair, overlay_with_image
from medseg.report.plots import overlay_png
from medseg.report.views import PLANES, View, cut, views_of
from medseg.volume import Grid

SPACING = (0.8, 0.9, 2.5)


def _asymmetric_ras(shape=(14, 12, 8)) -> np.ndarray:
    """Labels 0..3 indexed (I=R, J=A, K=S), no symmetry along any axis."""
    a = np.zeros(shape, np.int16)
    a[9:13, 2:5, 1:3] = 1  # right, posterior, inferior
    a[2:4, 7:11, 4:7] = 2  # left, anterior, superior
    a[6:9, 5:7, 2:6] = 3
    a[0, 0, 0] = 3
    return a


def _ras_grid(shape) -> Grid:
    return Grid.from_spacing(shape, SPACING)


def _lps_copy(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored as a DICOM-derived file: I towards L, J towards P; RAS affine."""
    n = np.array(a.shape)
    aff = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    aff[:3, 3] = [(n[0] - 1) * SPACING[0], (n[1] - 1) * SPACING[1], 0.0]
    return a[::-1, ::-1, :].copy(), aff


def test_3d_views_follow_the_radiological_convention():
    """Axial: patient's right on the left, anterior up; coronal: right on the left, superior up;
    sagittal: anterior on the left, superior up (written out on the RAS array by hand)."""
    a = _asymmetric_ras()
    g = _ras_grid(a.shape)
    assert np.array_equal(cut(a, g, View("axial", 3, 1.0)), a[::-1, ::-1, 3].T)
    assert np.array_equal(cut(a, g, View("coronal", 5, 1.0)), a[::-1, a.shape[1] - 1 - 5, ::-1].T)
    assert np.array_equal(cut(a, g, View("sagittal", 4, 1.0)), a[a.shape[0] - 1 - 4, ::-1, ::-1].T)
    # label 2 (left, anterior, superior) sits at the right and top of the axial/coronal views
    ax = cut(a, g, View("axial", 5, 1.0))
    rows, cols = np.nonzero(ax == 2)
    assert cols.min() > ax.shape[1] // 2 and rows.max() < ax.shape[0] // 2
    aspects = {v.plane: v.aspect for v in views_of(g, a == 1)}
    assert aspects == pytest.approx(
        {"axial": 0.9 / 0.8, "coronal": 2.5 / 0.8, "sagittal": 2.5 / 0.9}
    )


def test_lps_and_ras_copies_of_one_scan_give_identical_views(tmp_path):
    """A NIfTI (RAS storage) and a DICOM-like NRRD (LPS storage, written by SimpleITK) copy of
    one asymmetric scan: every rendered view array is the same."""
    ref = _asymmetric_ras()
    pred = ref.copy()
    pred[9:13, 2:5, 1:3] = 0  # one object missed, so the views focus on it
    for name, arr in (("ref", ref), ("pred", pred)):
        nib.save(nib.Nifti1Image(arr, np.diag([*SPACING, 1.0])), tmp_path / f"{name}.nii.gz")
        lps, _ = _lps_copy(arr)
        img = sitk.GetImageFromArray(np.transpose(lps, (2, 1, 0)))  # sitk wants (K, J, I)
        img.SetSpacing(SPACING)
        n = ref.shape
        img.SetOrigin((-(n[0] - 1) * SPACING[0], -(n[1] - 1) * SPACING[1], 0.0))  # LPS mm
        sitk.WriteImage(img, str(tmp_path / f"{name}.nrrd"))
    a = evaluate_pair(
        EvalPair("a", tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz"), {"x": [1]}, 2.0, False
    )
    b = evaluate_pair(
        EvalPair("b", tmp_path / "pred.nrrd", tmp_path / "ref.nrrd"), {"x": [1]}, 2.0, False
    )
    assert a.error is None and b.error is None and a.overlay and b.overlay
    assert [v.view.plane for v in a.overlay.views] == list(PLANES)
    for va, vb in zip(a.overlay.views, b.overlay.views, strict=True):
        assert (va.view.plane, va.view.index) == (vb.view.plane, vb.view.index)
        assert va.view.aspect == pytest.approx(vb.view.aspect)  # NIfTI stores float32 mm
        for f in ("ref", "pred", "background"):
            assert np.array_equal(getattr(va, f), getattr(vb, f)), (va.view.plane, f)
    axial = a.overlay.views[0]
    assert np.array_equal(axial.background, ref[::-1, ::-1, axial.view.index].T)


def test_2d_png_views_equal_the_image_viewers_array(tmp_path):
    """A PNG's overlay (labels and image) is the array PIL shows: row 0 at the top."""
    rng = np.random.default_rng(0)
    lab = np.zeros((30, 44), np.uint8)  # (height, width) as PIL gives it
    lab[2:9, 30:41] = 1  # top right
    lab[20:27, 3:10] = 2  # bottom left
    pred = lab.copy()
    pred[20:27, 3:10] = 0
    img = rng.integers(0, 255, lab.shape, dtype=np.uint8)
    for name, arr in (("ref", lab), ("pred", pred), ("img", img)):
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
    pair = EvalPair("c", tmp_path / "pred.png", tmp_path / "ref.png", tmp_path / "img.png")
    res = evaluate_pair(pair, {"one": [1], "two": [2]}, 2.0, False)
    assert res.overlay is not None and res.overlay.name == "two"
    (view,) = res.overlay.views
    assert view.view.plane == "image"
    assert np.array_equal(view.background, np.asarray(Image.open(tmp_path / "ref.png")))
    assert np.array_equal(view.ref, lab == 2) and np.array_equal(view.pred, pred == 2)
    over = overlay_with_image(res.overlay, pair.image)
    assert np.array_equal(over.views[0].background, np.asarray(Image.open(tmp_path / "img.png")))


def _png_array(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)


def test_overlay_picture_draws_row_zero_at_the_top_large_enough_to_read():
    bg = np.zeros((20, 30))
    bg[:8, :10] = 1.0  # bright top-left corner
    png = _png_array(overlay_png(bg, bg > 0, bg > 0))
    h, w = png.shape
    assert max(h, w) >= 256
    assert png[: h // 4, : w // 4].mean() > 200 and png[-h // 4 :, -w // 4 :].mean() < 50
    # the aspect (pixel height / width, mm) is kept: 2 mm rows double the picture's height
    tall = _png_array(overlay_png(np.zeros((20, 30)), bg > 0, bg > 0, aspect=2.0))
    assert tall.shape[0] / tall.shape[1] == pytest.approx(40 / 30, rel=0.02)
    assert max(tall.shape) >= 256


def test_views_of_a_3d_grid_centre_on_the_disagreement():
    g = _ras_grid((14, 12, 8))
    err = np.zeros(g.shape, bool)
    err[10, 3, 6] = True
    v = {x.plane: x.index for x in views_of(g, err)}
    # LPS indices: I and J reversed
    assert v == {"axial": 6, "coronal": 12 - 1 - 3, "sagittal": 14 - 1 - 10}
