"""Metrics against analytic values, MONAI and DeepMind surface-distance."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from medseg import metrics as M


def _sphere(shape, centre, radius_vox):
    g = np.indices(shape, dtype=np.float64)
    d2 = sum((g[i] - centre[i]) ** 2 for i in range(len(shape)))
    return d2 <= radius_vox**2


def _blob(rng, shape, sigma=2.0):
    a = ndimage.gaussian_filter(rng.random(shape), sigma)
    return a > np.quantile(a, rng.uniform(0.5, 0.95))


def test_cube_of_10mm_is_one_millilitre():
    m = np.zeros((20, 20, 20), bool)
    m[2:7, 5:15, 3:8] = True  # 5 x 10 x 5 voxels at 2 x 1 x 2 mm = 10 x 10 x 10 mm
    assert M.volume_ml(m, (2.0, 1.0, 2.0)) == pytest.approx(1.000, abs=1e-12)
    res = M.all_metrics(m, np.zeros_like(m), (2.0, 1.0, 2.0))
    assert res["vol_pred_ml"] == pytest.approx(1.0) and res["vol_diff_ml"] == pytest.approx(1.0)


def test_spheres_shifted_two_voxels_at_2p5mm_have_hd_5mm():
    ref = _sphere((30, 30, 30), (15, 15, 15), 8)
    pred = _sphere((30, 30, 30), (17, 15, 15), 8)
    assert M.hausdorff_distance(pred, ref, (2.5, 2.5, 2.5)) == pytest.approx(5.0, abs=1e-6)


def test_mask_against_itself_is_perfect():
    m = _sphere((16, 18, 12), (8, 9, 6), 5)
    r = M.all_metrics(m, m, (0.7, 0.9, 3.0))
    assert r["dice"] == 1.0 and r["iou"] == 1.0 and r["hd"] == 0.0 and r["hd95"] == 0.0
    assert r["assd"] == 0.0 and r["nsd"] == 1.0 and r["vol_diff_ml"] == 0.0


def test_anisotropic_spacing_scales_distances_per_axis():
    ref = np.zeros((20, 20, 20), bool)
    ref[5:10, 5:10, 5:10] = True
    pred = np.roll(ref, 3, axis=2)  # shifted along the third axis only
    assert M.hausdorff_distance(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert M.hausdorff_distance(pred, ref, (0.5, 0.5, 2.0)) == pytest.approx(6.0)
    assert M.hausdorff_distance(pred, ref, (7.0, 7.0, 0.25)) == pytest.approx(0.75)


@pytest.mark.parametrize("ndim", [2, 3])
def test_both_empty_masks(ndim):
    z = np.zeros((6,) * ndim, bool)
    r = M.all_metrics(z, z, (1.0,) * ndim)
    assert r == {
        "dice": 1.0,
        "iou": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "hd": 0.0,
        "hd95": 0.0,
        "assd": 0.0,
        "nsd": 1.0,
        "vol_ref_ml": 0.0,
        "vol_pred_ml": 0.0,
        "vol_diff_ml": 0.0,
    }
    assert M.dice(z, z) == 1.0 and M.hausdorff_distance(z, z, 1.0, 95) == 0.0
    assert M.surface_dice(z, z, 1.0, 2.0) == 1.0 and M.assd(z, z, 1.0) == 0.0


@pytest.mark.parametrize("empty", ["pred", "ref"])
def test_one_empty_mask_gives_zero_overlap_and_infinite_distances(empty):
    m = _sphere((12, 12, 12), (6, 6, 6), 3)
    z = np.zeros_like(m)
    pred, ref = (z, m) if empty == "pred" else (m, z)
    r = M.all_metrics(pred, ref, (1.0, 1.0, 2.0))
    assert r["dice"] == 0.0 and r["iou"] == 0.0 and r["nsd"] == 0.0
    assert math.isinf(r["hd"]) and math.isinf(r["hd95"]) and math.isinf(r["assd"])
    assert r["precision"] == 0.0 and r["recall"] == 0.0
    assert not any(math.isnan(v) for v in r.values())
    assert math.isinf(M.hausdorff_distance(pred, ref, 1.0)) and M.dice(pred, ref) == 0.0
    assert M.surface_dice(pred, ref, 1.0, 1.0) == 0.0


def test_overlap_metrics_count_voxels():
    p = np.zeros(10, bool)
    r = np.zeros(10, bool)
    p[0:4] = True  # 4 predicted
    r[2:8] = True  # 6 reference, 2 shared
    assert M.dice(p, r) == pytest.approx(0.4)
    assert M.iou(p, r) == pytest.approx(0.25)
    assert M.precision(p, r) == pytest.approx(0.5)
    assert M.recall(p, r) == pytest.approx(1 / 3)


def test_hausdorff_works_in_one_and_four_dimensions():
    a = np.zeros(20, bool)
    a[3:8] = True
    b = np.zeros(20, bool)
    b[5:12] = True
    # boundaries {3,7} and {5,11}: directed maxima 2 and 4 voxels
    assert M.hausdorff_distance(a, b, 0.5) == pytest.approx(2.0)
    m4 = np.zeros((5, 5, 5, 5), bool)
    m4[1:3, 1:3, 1:3, 1:3] = True
    assert M.hausdorff_distance(m4, np.roll(m4, 1, axis=3), (1, 1, 1, 3.0)) == pytest.approx(3.0)


def _monai(pred, ref, spacing):
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    p = torch.from_numpy(pred[None, None].astype(np.float32))
    r = torch.from_numpy(ref[None, None].astype(np.float32))
    kw = {"include_background": True, "spacing": list(spacing)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = float(monai_metrics.compute_hausdorff_distance(p, r, **kw))
        hd95 = float(monai_metrics.compute_hausdorff_distance(p, r, percentile=95, **kw))
        asd = float(monai_metrics.compute_average_surface_distance(p, r, symmetric=True, **kw))
    return hd, hd95, asd


@pytest.mark.parametrize("seed", range(8))
def test_distances_equal_monai_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    ndim = 2 if seed % 2 else 3
    shape = tuple(int(s) for s in rng.integers(10, 36, ndim))
    spacing = tuple(float(s) for s in rng.uniform(0.3, 3.0, ndim))
    pred, ref = _blob(rng, shape), _blob(rng, shape)
    hd, hd95, asd = _monai(pred, ref, spacing)
    r = M.all_metrics(pred, ref, spacing)
    assert r["hd"] == pytest.approx(hd, abs=1e-6, rel=0)
    assert r["hd95"] == pytest.approx(hd95, abs=1e-6, rel=0)
    # MONAI sums ASSD in float32: allow its own rounding (2 float32 ulps) on top of 1e-6
    assert r["assd"] == pytest.approx(
        asd, abs=max(1e-6, 2 * float(np.spacing(np.float32(asd)))), rel=0
    )
    assert M.hausdorff_distance(pred, ref, spacing, 95) == r["hd95"]
    assert M.assd(pred, ref, spacing) == r["assd"]


def test_hd95_equals_monai_for_large_far_apart_surfaces():
    # many boundary points and distances beyond the local search radius (KD-tree path)
    ref = _sphere((60, 60, 40), (30, 30, 20), 15)
    pred = _sphere((60, 60, 40), (36, 27, 22), 12) | _sphere((60, 60, 40), (8, 8, 8), 3)
    spacing = (0.8, 0.8, 2.5)
    hd, hd95, asd = _monai(pred, ref, spacing)
    assert M.hausdorff_distance(pred, ref, spacing) == pytest.approx(hd, abs=1e-6, rel=0)
    assert M.hausdorff_distance(pred, ref, spacing, 95) == pytest.approx(hd95, abs=1e-6, rel=0)


def _far_apart_pair(seed):
    """Two smooth blobs ~5k boundary voxels each, most boundary points beyond the local search.

    Ellipsoids of different radii with a smooth random radius modulation: the surfaces lie
    a few millimetres apart almost everywhere (like benchmarks/bench_metrics.py's smooth case).
    """
    rng = np.random.default_rng(seed)
    shape = (56, 56, 30)
    g = np.indices(shape, dtype=np.float64)
    centre = np.array(shape) / 2

    def blob(radii, shift):
        r2 = sum(((g[i] - centre[i] - shift[i]) / radii[i]) ** 2 for i in range(3))
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), 4)
        return np.sqrt(r2) + 0.03 * noise / noise.std() < 1.0

    return blob((22, 21, 11), (0, 0, 0)), blob((18, 19, 9), tuple(rng.integers(-2, 3, 3)))


@pytest.fixture
def small_probe(monkeypatch):
    """Probe from 1000 boundary points (not 4096): small test shapes take the paths of big scans."""
    monkeypatch.setattr(M, "_PROBE_POINTS", 1000)


def _full_hausdorff(pred, ref, spacing, percentile):
    """Every boundary distance measured (the path all_metrics takes), then the percentile."""
    return M.boundary_distances(pred, ref, spacing).hausdorff(percentile)


@pytest.mark.parametrize("seed", range(3))
def test_hd95_selection_equals_full_computation_and_monai_when_most_points_are_far(
    seed, small_probe
):
    pred, ref = _far_apart_pair(seed)
    spacing = (0.8, 0.8, 2.5)
    bd = M.boundary_distances(pred, ref, spacing)
    radius = 4 * min(spacing)  # the local search radius
    # the premise: many points beyond the local search, and enough to take the sampled path
    assert bd.ref_to_pred.size > 1000 and np.mean(bd.ref_to_pred > radius) > 0.3
    hd, hd95, _ = _monai(pred, ref, spacing)
    assert M.hausdorff_distance(pred, ref, spacing, 95) == bd.hausdorff(95)
    assert M.hausdorff_distance(pred, ref, spacing, 95) == pytest.approx(hd95, abs=1e-6, rel=0)
    assert M.hausdorff_distance(pred, ref, spacing) == bd.hausdorff(None)
    assert M.hausdorff_distance(pred, ref, spacing) == pytest.approx(hd, abs=1e-6, rel=0)


@pytest.mark.parametrize("percentile", [1, 5, 30, 50, 75, 90, 99, 99.9, 100])
def test_every_percentile_by_selection_equals_full_computation(percentile, small_probe):
    # low ranks (answered by the local search), middle ones (local search, then selection
    # among the points left) and high ones (selection among all points)
    pred, ref = _far_apart_pair(7)
    spacing = (0.8, 0.8, 2.5)
    for p, r in ((pred, ref), (ref, pred)):
        expected = _full_hausdorff(p, r, spacing, percentile)
        assert M.hausdorff_distance(p, r, spacing, percentile) == expected


def test_selection_falls_back_to_measuring_everything_when_the_sample_misleads(
    monkeypatch, small_probe
):
    # a negative margin puts the thresholds on the wrong side of the wanted ranks on purpose:
    # the check must notice and the answer must still be exact
    pred, ref = _far_apart_pair(1)
    spacing = (0.8, 0.8, 2.5)
    expected = {q: _full_hausdorff(pred, ref, spacing, q) for q in (95, None)}
    calls = []
    nearest = M._Surface.nearest

    def counting(self, q):
        calls.append(len(q))
        return nearest(self, q)

    monkeypatch.setattr(M._Surface, "nearest", counting)
    monkeypatch.setattr(M, "_SAMPLE_MARGIN", -40.0)
    assert M.hausdorff_distance(pred, ref, spacing, 95) == expected[95]
    assert M.hausdorff_distance(pred, ref, spacing) == expected[None]
    n_ref = int(M._face_boundary(np.pad(ref, 1)).sum())
    assert n_ref in calls  # the fallback measured every boundary point of one direction


def test_hd95_rank_just_past_the_local_search_equals_monai(small_probe):
    # a good segmentation: the 95th percentile lies just beyond the local search radius, the
    # case the extended search answers without a KD-tree
    ref = _sphere((50, 50, 30), (25, 25, 15), 19)
    pred = ndimage.binary_dilation(ref, iterations=2) & ~_sphere((50, 50, 30), (36, 25, 15), 6)
    spacing = (0.8, 0.8, 2.5)
    hd, hd95, _ = _monai(pred, ref, spacing)
    assert M.hausdorff_distance(pred, ref, spacing, 95) == pytest.approx(hd95, abs=1e-6, rel=0)
    assert M.hausdorff_distance(pred, ref, spacing, 95) == _full_hausdorff(pred, ref, spacing, 95)
    assert M.hausdorff_distance(pred, ref, spacing) == pytest.approx(hd, abs=1e-6, rel=0)


def test_bounding_box_of_both_masks_matches_nonzero_extents():
    rng = np.random.default_rng(4)
    for shape in ((7,), (9, 5), (6, 8, 10), (3, 4, 5, 6)):
        p = rng.random(shape) > 0.97
        r = np.zeros(shape, bool)
        r[(shape[0] - 1,) + (0,) * (len(shape) - 1)] = True
        both = np.argwhere(p | r)
        expected = tuple(
            slice(int(lo), int(hi) + 1) for lo, hi in zip(both.min(0), both.max(0), strict=True)
        )
        assert M._union_bbox(p, r) == expected
    assert M._union_bbox(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) is None


def test_face_boundary_equals_mask_minus_scipy_erosion():
    rng = np.random.default_rng(6)
    for shape in ((30,), (12, 17), (9, 11, 13), (5, 6, 7, 4)):
        m = np.pad(_blob(rng, shape, 1.0), 1)
        structure = ndimage.generate_binary_structure(m.ndim, 1)
        expected = m & ~ndimage.binary_erosion(m, structure, border_value=0)
        assert np.array_equal(M._face_boundary(m), expected)


def test_masks_touching_the_array_border_match_monai():
    rng = np.random.default_rng(5)
    pred = _blob(rng, (14, 15, 9), 1.0)
    ref = _blob(rng, (14, 15, 9), 1.0)
    pred[0], ref[:, -1] = True, True
    hd, hd95, _ = _monai(pred, ref, (1.1, 0.6, 2.0))
    assert M.hausdorff_distance(pred, ref, (1.1, 0.6, 2.0)) == pytest.approx(hd, abs=1e-6)
    assert M.hausdorff_distance(pred, ref, (1.1, 0.6, 2.0), 95) == pytest.approx(hd95, abs=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_surface_dice_equals_deepmind_on_random_shapes(seed):
    sd = pytest.importorskip("surface_distance")
    rng = np.random.default_rng(100 + seed)
    ndim = 2 if seed % 2 else 3
    shape = tuple(int(s) for s in rng.integers(10, 36, ndim))
    spacing = tuple(float(s) for s in rng.uniform(0.3, 3.0, ndim))
    pred, ref = _blob(rng, shape), _blob(rng, shape)
    dists = sd.compute_surface_distances(ref, pred, spacing)
    for tol in (0.5, 1.0, 2.0, 5.0):
        expected = sd.compute_surface_dice_at_tolerance(dists, tol)
        assert M.surface_dice(pred, ref, spacing, tol) == pytest.approx(expected, abs=1e-6)
    r = M.all_metrics(pred, ref, spacing, tolerance_mm=2.0)
    assert r["nsd"] == pytest.approx(sd.compute_surface_dice_at_tolerance(dists, 2.0), abs=1e-6)


def test_surface_dice_on_integer_spacing_ties_equals_deepmind():
    # isotropic 1 mm: many distances are exactly 1 or 2 mm, so "<= tolerance" ties matter
    sd = pytest.importorskip("surface_distance")
    ref = _sphere((24, 24, 24), (12, 12, 12), 7)
    pred = _sphere((24, 24, 24), (13, 12, 11), 6)
    dists = sd.compute_surface_distances(ref, pred, (1.0, 1.0, 1.0))
    for tol in (1.0, 2.0, math.sqrt(2.0)):
        expected = sd.compute_surface_dice_at_tolerance(dists, tol)
        assert M.surface_dice(pred, ref, (1.0, 1.0, 1.0), tol) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.7, 2.5)])
def test_surfel_area_table_equals_deepmind(spacing):
    lt = pytest.importorskip("surface_distance.lookup_tables")
    ours = M._surfel_area_table(spacing)
    theirs = lt.create_table_neighbour_code_to_surface_area(spacing)
    kernel = lt.ENCODE_NEIGHBOURHOOD_3D_KERNEL
    # our bit b is voxel delta number b of np.ndindex(2, 2, 2); map their codes onto ours
    for code in range(256):
        ours_code = sum(1 << b for b, d in enumerate(np.ndindex(2, 2, 2)) if code & int(kernel[d]))
        assert ours[ours_code] == pytest.approx(theirs[code], abs=1e-12)


def test_surface_dice_rejects_other_dimensions():
    with pytest.raises(ValueError, match="2D or 3D"):
        M.surface_dice(np.ones(5, bool), np.ones(5, bool), 1.0, 1.0)


def test_spacing_must_fit_the_masks():
    with pytest.raises(ValueError, match="spacing"):
        M.hausdorff_distance(np.ones((3, 3), bool), np.ones((3, 3), bool), (1.0, 1.0, 1.0))


def test_adapted_rand_error_matches_skimage_and_is_zero_for_identical_segmentations():
    from skimage.metrics import adapted_rand_error

    rng = np.random.default_rng(3)
    ref = ndimage.label(_blob(rng, (40, 40), 1.5))[0]
    pred = ndimage.label(_blob(rng, (40, 40), 1.5))[0]
    assert M.adapted_rand_error(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert M.adapted_rand_error(pred, ref) == pytest.approx(adapted_rand_error(ref, pred)[0])
    assert 0.0 < M.adapted_rand_error(pred, ref) <= 1.0


def test_label_metrics_regions_and_fov_mask():
    ref = np.zeros((12, 12, 6), np.int16)
    ref[2:6, 2:6, 1:4] = 1
    ref[6:9, 2:6, 1:4] = 2
    pred = ref.copy()
    pred[6:9, 2:6, 1:4] = 1  # class 2 predicted as 1
    res = M.label_metrics(pred, ref, (1.0, 1.0, 2.0), {"a": [1], "b": [2], "ab": [1, 2]})
    assert res["ab"]["dice"] == 1.0 and res["b"]["dice"] == 0.0
    assert res["a"]["dice"] == pytest.approx(2 * 48 / (84 + 48))
    fov = np.zeros(ref.shape, bool)
    fov[:6] = True  # hides the disagreement
    res = M.label_metrics(pred, ref, (1.0, 1.0, 2.0), {"a": [1], "b": [2]}, mask=fov)
    assert res["a"]["dice"] == 1.0 and res["b"]["dice"] == 1.0 and res["b"]["hd"] == 0.0


def test_label_metrics_score_label_zero_over_the_whole_array():
    """Value 0 named as a class (ISBI 2012's membrane) covers the background outside the
    objects' box: its Dice and volume count every voxel, not just the foreground crop."""
    ref = np.zeros((20, 16), np.int16)
    ref[5:12, 4:10] = 1
    pred = np.zeros_like(ref)
    pred[6:13, 4:10] = 1
    res = M.label_metrics(pred, ref, (1.0, 1.0), {"zero": [0], "one": [1]})
    p0, r0 = pred == 0, ref == 0
    assert res["zero"]["dice"] == pytest.approx(2 * (p0 & r0).sum() / (p0.sum() + r0.sum()))
    assert res["zero"]["vol_ref_ml"] == pytest.approx(r0.sum() / 1000.0)
    fov = np.zeros(ref.shape, bool)
    fov[:, :12] = True
    res = M.label_metrics(pred, ref, (1.0, 1.0), {"zero": [0]}, mask=fov)
    assert res["zero"]["vol_ref_ml"] == pytest.approx((r0 & fov).sum() / 1000.0)
    assert res["zero"]["dice"] == pytest.approx(
        2 * (p0 & r0 & fov).sum() / ((p0 & fov).sum() + (r0 & fov).sum())
    )
