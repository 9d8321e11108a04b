"""Augmentation geometry: identity, label/image alignment through one map, exact mirroring."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import PlanError
from medseg.training.augment import (
    AugmentConfig,
    SpatialParams,
    augment_intensity,
    coordinate_map,
    draw_spatial,
    elastic_field,
    extract_patch,
)
from medseg.training.sampling import SamplingConfig, crop_label, read_region
from medseg.volume import Box


@pytest.fixture
def case2d(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 48x44 2D scan (K == 1) with a blobby 3-class label."""
    ii, jj = np.mgrid[:48, :44]
    lab = np.zeros((48, 44), dtype=np.int16)
    lab[(ii - 20) ** 2 + (jj - 18) ** 2 < 90] = 1
    lab[(ii - 30) ** 2 / 4 + (jj - 30) ** 2 < 30] = 2
    img = rng.normal(size=(2, 48, 44, 1)).astype(np.float32)
    return img, lab[None, :, :, None]


def _params(dims: int, matrix=None, disp=None, flips=None) -> SpatialParams:
    return SpatialParams(
        np.eye(dims) if matrix is None else matrix, disp, tuple(flips or (False,) * dims)
    )


def test_identity_warp_reproduces_the_plain_crop_2d(case2d) -> None:
    img, lab = case2d
    cfg = SamplingConfig((12, 10), (5, 6))
    ob = Box((-2, 30, 0), (10, 40, 1))  # input and output leave the scan
    zero = np.zeros((2, 3, 3))
    i0, l0, _ = extract_patch(img, lab, None, ob, cfg, None)
    i1, l1, _ = extract_patch(img, lab, None, ob, cfg, _params(2, disp=zero))
    assert _params(2, disp=zero).warps
    assert np.array_equal(i0, read_region(img, ob.grow((5, 6, 0)))[..., 0])
    assert np.allclose(i1, i0, atol=1e-6)
    assert np.array_equal(l1, l0)
    assert np.array_equal(l0, crop_label(lab, ob)[..., 0])


def test_identity_coordinate_map_3d_and_cubic_interpolation_is_identity(rng) -> None:
    size = (7, 6, 5)
    c = coordinate_map(_params(3, disp=np.zeros((3, 3, 3, 3))), size)
    assert np.array_equal(c, np.stack(np.meshgrid(*map(np.arange, size), indexing="ij")))
    img = rng.normal(size=(1, 20, 18, 16)).astype(np.float32)
    cfg = SamplingConfig((6, 6, 4), (2, 3, 2))
    ob = Box((5, 4, 3), (11, 10, 7))
    i_cubic, _, _ = extract_patch(
        img, None, None, ob, cfg, _params(3, disp=np.zeros((3, 3, 3, 3))), image_order=3
    )
    assert np.allclose(i_cubic, read_region(img, ob.grow((2, 3, 2))), atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_label_stays_aligned_with_image_under_rotation_scale_elastic_2d(case2d, seed) -> None:
    _, lab = case2d
    img = np.concatenate([(lab == c).astype(np.float32) for c in (1, 2)])  # image = indicators
    cfg = SamplingConfig((16, 14), (6, 7))
    aug = AugmentConfig(p_elastic=1.0, elastic_sigma=4.0, p_rotate=1.0, p_scale=1.0)
    params = draw_spatial(aug, np.random.default_rng(seed), 2)
    assert params.warps and params.displacement is not None
    ob = Box((14, 12, 0), (30, 26, 1))
    # nearest for both: same coordinates -> identical picks in the output region
    im0, l0, _ = extract_patch(img, lab, None, ob, cfg, params, image_order=0)
    inner = im0[:, 6:22, 7:21]
    valid = l0[0] >= 0
    for k, c in enumerate((1, 2)):
        assert np.array_equal((l0[0] == c)[valid], inner[k][valid] > 0.5)
    # linear interpolation of the image agrees except on boundary voxels
    im1, l1, _ = extract_patch(img, lab, None, ob, cfg, params, image_order=1)
    assert np.array_equal(l1, l0)
    agree = ((im1[0, 6:22, 7:21] > 0.5) == (l1[0] == 1))[valid]
    assert agree.mean() > 0.9
    # the warp did something
    assert not np.array_equal(l0, crop_label(lab, ob)[..., 0])


def test_label_stays_aligned_with_image_under_elastic_3d(rng) -> None:
    lab = np.zeros((1, 24, 22, 20), dtype=np.int16)
    ii, jj, kk = np.mgrid[:24, :22, :20]
    lab[0][(ii - 12) ** 2 + (jj - 10) ** 2 + (kk - 9) ** 2 < 40] = 1
    img = (lab == 1).astype(np.float32)
    cfg = SamplingConfig((10, 10, 8), (3, 3, 3))
    aug = AugmentConfig(p_elastic=1.0, elastic_sigma=3.0, p_rotate=1.0)
    params = draw_spatial(aug, np.random.default_rng(5), 3)
    ob = Box((7, 5, 5), (17, 15, 13))
    im, la, _ = extract_patch(img, lab, None, ob, cfg, params, image_order=0)
    assert im.shape == (1, 16, 16, 14) and la.shape == (1, 10, 10, 8)
    v = la[0] >= 0
    assert np.array_equal((la[0] == 1)[v], im[0, 3:13, 3:13, 3:11][v] > 0.5)


def test_rotation_by_90_degrees_is_an_exact_rot90(rng) -> None:
    img = rng.normal(size=(1, 30, 30, 1)).astype(np.float32)
    cfg = SamplingConfig((9, 9), (2, 2))
    ob = Box((10, 11, 0), (19, 20, 1))
    rot = np.array([[0.0, -1.0], [1.0, 0.0]])
    out, _, _ = extract_patch(img, None, None, ob, cfg, _params(2, matrix=rot))
    plain = read_region(img, ob.grow((2, 2, 0)))[0, :, :, 0]
    assert any(np.allclose(out[0], np.rot90(plain, k), atol=1e-5) for k in (1, -1))


def test_mirroring_is_an_exact_flip_of_image_label_and_weights(case2d) -> None:
    img, lab = case2d
    w = np.random.default_rng(0).random(lab.shape).astype(np.float32)
    cfg = SamplingConfig((12, 10), (3, 4))
    ob = Box((10, 12, 0), (22, 22, 1))
    i0, l0, w0 = extract_patch(img, lab, w, ob, cfg, None)
    i1, l1, w1 = extract_patch(img, lab, w, ob, cfg, _params(2, flips=(True, True)))
    assert np.array_equal(i1, i0[:, ::-1, ::-1])
    assert np.array_equal(l1, l0[:, ::-1, ::-1])
    assert np.array_equal(w1, w0[:, ::-1, ::-1])
    # a flip keeps input and output concentric: the output is still the centre of the input
    assert np.array_equal(i1[:, 3:15, 4:14], img[:, 10:22, 12:22, 0][:, ::-1, ::-1])


def test_label_from_outside_the_scan_is_ignored() -> None:
    lab = np.ones((1, 20, 20, 1), dtype=np.int16)
    img = np.ones((1, 20, 20, 1), dtype=np.float32)
    cfg = SamplingConfig((8, 8), (2, 2))
    zoom_out = np.eye(2) * 2.0  # reads a source region twice as large
    ob = Box((0, 0, 0), (8, 8, 1))
    _, la, w = extract_patch(img, lab, img.copy(), ob, cfg, _params(2, matrix=zoom_out))
    assert (la == -1).any() and (la == 1).any()
    assert np.all(w[la == -1] == 0)


def test_elastic_field_passes_through_control_points_and_is_smooth(rng) -> None:
    disp = rng.normal(0, 10, size=(2, 3, 3))
    f = elastic_field(disp, (33, 41))
    assert f.shape == (2, 33, 41)
    assert np.allclose(f[:, ::16, ::20], disp, atol=1e-6)
    # smooth: per-voxel steps stay within (a little overshoot of) the control-point slope
    slope = np.abs(np.diff(disp, axis=1)).max() / 16
    assert np.abs(np.diff(f, axis=1)).max() <= 1.5 * slope


def test_intensity_augmentation_off_is_identity_and_on_changes_values(rng) -> None:
    x = rng.normal(size=(2, 10, 10)).astype(np.float32)
    assert np.array_equal(augment_intensity(x, AugmentConfig.none(), rng), x)
    on = AugmentConfig(
        p_brightness=1.0, brightness_range=(2.0, 2.0), p_contrast=0, p_gamma=0, p_noise=0
    )
    assert np.allclose(augment_intensity(x, on, rng), 2 * x)
    gamma = AugmentConfig(p_brightness=0, p_contrast=0, p_gamma=1.0, p_noise=0)
    y = augment_intensity(x, gamma, rng)
    assert np.allclose([y.min(), y.max()], [x.min(), x.max()], atol=1e-5)
    assert not np.allclose(y, x)


def test_unknown_augment_key_is_a_clear_error() -> None:
    with pytest.raises(PlanError, match="p_elastc"):
        AugmentConfig.from_dict({"p_elastc": 0.5})
    assert AugmentConfig.from_dict({"scale_range": [0.9, 1.1]}).scale_range == (0.9, 1.1)
