"""Geometry core: Grid, Box, Volume."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import GeometryError
from medseg.volume import Box, Grid, Volume


def test_orientation_matches_nibabel_for_random_affines(rng: np.random.Generator) -> None:
    for _ in range(200):
        a = np.eye(4)
        a[:3, :3] = rng.normal(size=(3, 3))
        a[:3, 3] = rng.normal(size=3) * 50
        g = Grid((5, 6, 7), a)
        assert g.orientation == nib.aff2axcodes(a)


def test_reoriented_keeps_world_coordinates(image_volume: Volume) -> None:
    for codes in ("RAS", "LPS", "PIL", "SAR"):
        out = image_volume.reoriented(codes)
        assert out.orientation == tuple(codes)
        src = image_volume.grid
        # every voxel value sits at the same world position after reorientation
        idx = np.argwhere(np.ones(out.shape, bool))[::37]
        world = out.grid.world(idx)
        back = np.rint(src.index(world)).astype(int)
        np.testing.assert_allclose(src.world(back), world, atol=1e-9)
        np.testing.assert_array_equal(
            out.array[0][tuple(idx.T)], image_volume.array[0][tuple(back.T)]
        )


def test_reorientation_equals_nibabel_as_closest_canonical(image_volume: Volume) -> None:
    img = nib.Nifti1Image(image_volume.array[0], image_volume.affine)
    canon = nib.as_closest_canonical(img)
    ours = image_volume.reoriented("RAS")
    np.testing.assert_array_equal(ours.array[0], np.asarray(canon.dataobj))
    np.testing.assert_allclose(ours.affine, canon.affine, atol=1e-9)


def test_crop_grid_places_voxels_at_same_world_position(oblique_grid: Grid) -> None:
    box = Box((3, 4, 2), (10, 20, 9))
    sub = oblique_grid.crop(box)
    assert sub.shape == (7, 16, 7)
    np.testing.assert_allclose(sub.world([1, 2, 3]), oblique_grid.world([4, 6, 5]), atol=1e-9)
    with pytest.raises(GeometryError):
        oblique_grid.crop(Box((0, 0, 0), (99, 5, 5)))


def test_pad_grid_extends_beyond_scan(oblique_grid: Grid) -> None:
    padded = oblique_grid.pad(Box((-2, -3, -1), (25, 34, 12)))
    np.testing.assert_allclose(padded.world([2, 3, 1]), oblique_grid.world([0, 0, 0]), atol=1e-9)


def test_with_spacing_keeps_physical_extent(oblique_grid: Grid) -> None:
    new = oblique_grid.with_spacing((1.6, 1.4, 1.25))
    assert new.shape == (12, 16, 22)  # round(23*0.8/1.6)=12 (11.5 rounds to even), 31*.7/1.4, 11*2
    np.testing.assert_allclose(new.direction, oblique_grid.direction, atol=1e-12)
    # outer corner (voxel -0.5) is kept
    np.testing.assert_allclose(
        new.world([-0.5, -0.5, -0.5]), oblique_grid.world([-0.5, -0.5, -0.5]), atol=1e-9
    )


def test_box_algebra() -> None:
    b = Box((0, 0, 0), (4, 5, 6))
    assert b.shape == (4, 5, 6)
    g = b.grow(2)
    assert g.start == (-2, -2, -2) and g.stop == (6, 7, 8)
    assert g.contains(b) and not b.contains(g)
    assert g.clip_to((4, 5, 6)) == b
    assert b.intersect(Box((10, 10, 10), (12, 12, 12))).is_empty()
    with pytest.raises(GeometryError):
        Box((3,), (1,))


def test_grid_comparison_reports_millimetres(oblique_grid: Grid) -> None:
    a = oblique_grid.affine.copy()
    a[0, 3] += 0.5
    other = Grid(oblique_grid.shape, a)
    assert oblique_grid.max_corner_distance(other) == pytest.approx(0.5)
    assert not oblique_grid.allclose(other, atol_mm=0.1)
    with pytest.raises(GeometryError, match="0.5 mm"):
        oblique_grid.check_same(other, 1e-3, "image vs label")


def test_volume_rejects_mismatched_array(oblique_grid: Grid) -> None:
    with pytest.raises(GeometryError):
        Volume(np.zeros((1, 2, 3, 4)), oblique_grid)
    with pytest.raises(GeometryError):
        Volume(np.zeros((1, *oblique_grid.shape), np.float32), oblique_grid, is_label=True)


def test_singular_affine_is_refused() -> None:
    with pytest.raises(GeometryError, match="singular"):
        Grid((2, 2, 2), np.diag([1.0, 0.0, 1.0, 1.0]))
