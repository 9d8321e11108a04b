"""Resampling: equals scipy.ndimage.map_coordinates on the same grid, identity on its own grid,
labels survive a there-and-back trip."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from medseg.resample import axis_map, resample, resample_array
from medseg.volume import Grid, Volume


def reference(array: np.ndarray, source: Grid, target: Grid, order: int) -> np.ndarray:
    """map_coordinates at every target voxel centre mapped through world coordinates."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in target.shape], indexing="ij"), -1)
    coords = np.moveaxis(source.index(target.world(ijk)), -1, 0)
    return ndi.map_coordinates(array.astype(np.float64), coords, order=order, mode="nearest")


@pytest.fixture
def smooth(rng: np.random.Generator) -> tuple[np.ndarray, Grid]:
    grid = Grid.from_spacing((21, 26, 9), (0.8, 0.7, 2.5), (3.0, -5.0, 10.0))
    arr = ndi.gaussian_filter(rng.normal(size=grid.shape), 1.2) * 100 + 50
    return arr[None].astype(np.float32), grid


def sphere(grid: Grid, centre_mm: np.ndarray, radius_mm: float) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1)
    return (np.linalg.norm(grid.world(ijk) - centre_mm, axis=-1) < radius_mm).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("order", [1, 3])
def test_new_spacing_matches_map_coordinates(smooth, order: int) -> None:
    arr, grid = smooth
    target = grid.with_spacing((1.1, 0.5, 1.0))
    out = resample_array(arr, grid, target, order=order)[0]
    ref = reference(arr[0], grid, target, order)
    assert out.shape == target.shape
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.ptp(ref))


def test_nearest_matches_map_coordinates_away_from_ties(smooth) -> None:
    arr, grid = smooth
    target = grid.with_spacing((1.1, 0.5, 1.0))
    out = resample_array(arr, grid, target, order=0)[0]
    ref = reference(arr[0], grid, target, 0)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in target.shape], indexing="ij"), -1)
    frac = np.abs(np.modf(grid.index(target.world(ijk)))[0])
    clear = np.all(np.abs(frac - 0.5) > 1e-3, axis=-1)
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(out[clear], ref[clear])


@pytest.mark.parametrize("order", [1, 3])
def test_oblique_target_matches_map_coordinates(oblique_grid: Grid, rng, order: int) -> None:
    arr = ndi.gaussian_filter(rng.normal(size=oblique_grid.shape), 1.5)[None].astype(np.float32)
    t = np.deg2rad(25.0)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    target = Grid.from_spacing((12, 14, 9), (1.2, 1.0, 1.5), oblique_grid.origin, rot)
    assert axis_map(oblique_grid, target) is None  # exercises the general path
    out = resample_array(arr, oblique_grid, target, order=order)[0]
    ref = reference(arr[0], oblique_grid, target, order)
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.ptp(ref))


@pytest.mark.parametrize("order", [1, 3])
def test_through_reorientation_matches_map_coordinates(oblique_grid: Grid, rng, order) -> None:
    arr = ndi.gaussian_filter(rng.normal(size=oblique_grid.shape), 1.5)[None].astype(np.float32)
    target, perm, flips = oblique_grid.reoriented("SRA")
    assert perm != (0, 1, 2) and any(flips)
    target = target.with_spacing((1.7, 0.6, 0.9))
    assert axis_map(oblique_grid, target) is not None  # fast separable path
    out = resample_array(arr, oblique_grid, target, order=order)[0]
    ref = reference(arr[0], oblique_grid, target, order)
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.ptp(ref))


def test_reorientation_alone_is_an_exact_permutation(image_volume: Volume) -> None:
    target = image_volume.reoriented("RAS")
    out = resample(image_volume, target.grid, order=3)
    np.testing.assert_allclose(out.array, target.array, rtol=0, atol=1e-4)
    # and the world position of a voxel's value is unchanged
    i, j, k = 3, 5, 2
    xyz = image_volume.grid.world([i, j, k])
    ti, tj, tk = np.round(target.grid.index(xyz)).astype(int)
    assert out.array[0, ti, tj, tk] == pytest.approx(image_volume.array[0, i, j, k], abs=1e-3)


def test_per_axis_orders_equal_sequential_1d_interpolation(smooth) -> None:
    arr, grid = smooth
    target = grid.with_spacing((0.6, 0.9, 1.0))
    out = resample_array(arr, grid, target, order=(3, 3, 1))[0]
    ref = arr[0].astype(np.float64)
    for axis, order in enumerate((3, 3, 1)):
        shape = list(ref.shape)
        shape[axis] = target.shape[axis]
        idx = list(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
        sc = target.spacing[axis] / grid.spacing[axis]
        off = grid.index(target.origin)[axis]
        idx[axis] = idx[axis] * sc + off
        ref = ndi.map_coordinates(ref, np.stack(idx), order=order, mode="nearest")
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.ptp(ref))


@pytest.mark.parametrize("order", [0, 1, 3])
def test_own_grid_is_identity(image_volume: Volume, order: int) -> None:
    out = resample(image_volume, image_volume.grid, order=order)
    np.testing.assert_array_equal(out.array, image_volume.array)


def test_label_own_grid_is_identity(oblique_grid: Grid) -> None:
    lab = Volume(
        sphere(oblique_grid, oblique_grid.world([11, 15, 5]), 6.0)[None], oblique_grid, True
    )
    out = resample(lab, oblique_grid)
    assert out.array.dtype == lab.array.dtype
    np.testing.assert_array_equal(out.array, lab.array)


def _there_and_back(spacing, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    grid = Grid.from_spacing((48, 44, 30), (0.8, 0.8, 1.5), (0.0, 0.0, 0.0))
    centre = grid.world([24, 22, 15])
    lab = np.zeros(grid.shape, dtype=np.uint8)
    lab[sphere(grid, centre, 13.0) > 0] = 1
    lab[sphere(grid, centre + [2.0, 0, 0], 7.0) > 0] = 3
    there = resample(Volume(lab[None], grid, True), grid.with_spacing(spacing), order=order)
    back = resample(there, grid, order=0).array[0]
    return lab, there.array, back


@pytest.mark.parametrize("order", [0, 1])
def test_label_there_and_back_finer_keeps_smooth_shapes(order: int) -> None:
    lab, there, back = _there_and_back((0.5, 0.5, 0.5), order)
    assert set(np.unique(there)) == {0, 1, 3}
    for c in (1, 3):
        assert dice(back == c, lab == c) >= 0.99


@pytest.mark.parametrize("order", [0, 1])
def test_label_there_and_back_coarser_loses_only_the_boundary(order: int) -> None:
    # Halving the resolution loses sub-voxel boundary detail; the shapes themselves stay.
    lab, there, back = _there_and_back((1.6, 1.2, 1.0), order)
    assert set(np.unique(there)) == {0, 1, 3}
    for c in (1, 3):
        assert dice(back == c, lab == c) >= 0.93


def test_2d_grid_resamples_in_plane_only(rng) -> None:
    grid = Grid.from_spacing((30, 40, 1), (1.0, 1.0, 1.0))
    arr = ndi.gaussian_filter(rng.normal(size=(30, 40)), 2)[None, :, :, None].astype(np.float32)
    target = grid.with_spacing((0.5, 2.0, 7.0))
    assert target.shape == (60, 20, 1)
    out = resample_array(arr, grid, target, order=3)[0]
    ref = reference(arr[0], grid, target, 3)
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.ptp(ref))
