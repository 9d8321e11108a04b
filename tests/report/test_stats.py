"""Structure statistics against analytic shapes and scipy.ndimage on oblique, anisotropic grids."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.report.stats import csv_text, rows_from_json, stats_json, stats_rows, structure_stats
from medseg.volume import Grid, Volume


def _oblique_affine() -> np.ndarray:
    """Spacing 0.7 x 1.1 x 2.5 mm, rotated 30 degrees about z and flipped along y, offset."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.0, -1.0, 1.0])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([0.7, 1.1, 2.5])
    a[:3, 3] = (-12.0, 40.0, 7.5)
    return a


@pytest.fixture
def grid() -> Grid:
    return Grid((30, 24, 12), _oblique_affine())


def test_box_volume_centroid_and_extent_are_the_analytic_values(grid: Grid) -> None:
    lab = np.zeros(grid.shape, np.uint8)
    lab[3:13, 5:9, 2:7] = 4  # 10 x 4 x 5 voxels
    (s,) = structure_stats(Volume(lab[None], grid, True))
    a = grid.affine
    assert s.label == 4 and s.voxels == 200
    assert s.volume_ml == pytest.approx(200 * 0.7 * 1.1 * 2.5 / 1000.0, rel=1e-12)
    centre = a @ np.array([(3 + 12) / 2, (5 + 8) / 2, (2 + 6) / 2, 1.0])
    assert np.allclose(s.centroid_mm, centre[:3], atol=1e-9)
    corners = np.array([[i, j, k, 1.0] for i in (3, 12) for j in (5, 8) for k in (2, 6)]) @ a.T
    assert np.allclose(s.bbox_min_mm, corners[:, :3].min(axis=0), atol=1e-9)
    assert np.allclose(s.bbox_max_mm, corners[:, :3].max(axis=0), atol=1e-9)
    assert s.bbox_voxels == {"start": [3, 5, 2], "stop": [13, 9, 7]}


def test_ball_volume_approaches_four_thirds_pi_r_cubed() -> None:
    a = np.diag([0.5, 0.5, 0.5, 1.0])
    a[:3, 3] = -20.0
    g = Grid((80, 80, 80), a)
    ijk = np.indices(g.shape) * 0.5 - 20.0
    lab = (np.sum(ijk**2, axis=0) <= 15.0**2).astype(np.uint8)
    (s,) = structure_stats(Volume(lab[None], g, True))
    assert s.volume_ml == pytest.approx(4 / 3 * np.pi * 15.0**3 / 1000.0, rel=5e-3)
    assert np.allclose(s.centroid_mm, [0.0, 0.0, 0.0], atol=1e-9)


def test_counts_centroids_and_channel_moments_match_scipy_ndimage(grid: Grid) -> None:
    rng = np.random.default_rng(3)
    lab = ndimage.median_filter(rng.integers(0, 4, grid.shape), size=3).astype(np.int16)
    ch = rng.normal(100.0, 20.0, (2, *grid.shape)).astype(np.float32)
    t2 = rng.normal(-5.0, 2.0, grid.shape)
    images = [Volume(ch, grid), Volume(t2[None], grid)]
    stats = structure_stats(
        Volume(lab[None], grid, True), images, channel_names=["a", "b", "t2"], names={2: "liver"}
    )
    values = [1, 2, 3]
    assert [s.label for s in stats] == values
    assert stats[1].name == "liver" and stats[0].name == "label 1"
    com = ndimage.center_of_mass(np.ones_like(lab), lab, values)
    for s, v, c in zip(stats, values, com, strict=True):
        assert s.voxels == int(ndimage.sum_labels(np.ones_like(lab), lab, v))
        assert np.allclose(s.centroid_mm, (grid.affine @ [*c, 1.0])[:3], atol=1e-6)
        for name, arr in (("a", ch[0]), ("b", ch[1]), ("t2", t2)):
            assert s.channels[name]["mean"] == pytest.approx(ndimage.mean(arr, lab, v), rel=1e-6)
            sd = ndimage.standard_deviation(arr, lab, v)
            assert s.channels[name]["sd"] == pytest.approx(sd, rel=1e-6)
        idx = np.argwhere(lab == v)
        world = np.c_[idx, np.ones(len(idx))] @ grid.affine.T
        assert np.allclose(s.bbox_min_mm, world[:, :3].min(axis=0), atol=1e-9)
        assert np.allclose(s.bbox_max_mm, world[:, :3].max(axis=0), atol=1e-9)


def test_a_requested_absent_label_has_zero_volume_and_no_position(grid: Grid) -> None:
    lab = np.zeros(grid.shape, np.uint8)
    lab[0, 0, 0] = 1
    img = Volume(np.ones((1, *grid.shape), np.float32), grid)
    one, absent = structure_stats(Volume(lab[None], grid, True), [img], values=[0, 1, 5])
    assert one.voxels == 1 and one.channels["ch0"] == {"mean": 1.0, "sd": 0.0}
    assert absent.label == 5 and absent.voxels == 0 and absent.volume_ml == 0.0
    assert absent.centroid_mm is None and absent.channels["ch0"]["mean"] is None


def test_an_image_on_another_grid_is_refused(grid: Grid) -> None:
    lab = np.ones(grid.shape, np.uint8)
    other = Grid(grid.shape, grid.affine @ np.diag([1.0, 1.0, 1.02, 1.0]))
    with pytest.raises(MedsegError, match="mm apart"):
        structure_stats(Volume(lab[None], grid, True), [Volume(lab[None].astype(float), other)])


def test_json_and_csv_carry_the_same_numbers(grid: Grid) -> None:
    lab = np.zeros(grid.shape, np.uint8)
    lab[2:6, 2:6, 2:6], lab[10:12, 10:12, 3:5] = 1, 2
    img = Volume(np.arange(lab.size, dtype=np.float32).reshape(1, *grid.shape), grid)
    stats = structure_stats(Volume(lab[None], grid, True), [img], values=[1, 2, 3])
    doc = json.loads(json.dumps(stats_json(stats, prediction="p.nii.gz")))
    assert "RAS" in doc["coordinates"]
    rows = list(csv.DictReader(io.StringIO(csv_text(rows_from_json("c1", doc)))))
    assert [r["label"] for r in rows] == ["1", "2", "3"]
    assert float(rows[0]["volume_ml"]) == pytest.approx(64 * 0.7 * 1.1 * 2.5 / 1000)
    assert float(rows[1]["centroid_z_mm"]) == pytest.approx(stats[1].centroid_mm[2])
    assert float(rows[0]["mean_ch0"]) == pytest.approx(stats[0].channels["ch0"]["mean"])
    assert rows[2]["centroid_x_mm"] == "" and rows[2]["voxels"] == "0"
    assert stats_rows("c1", stats)[1]["sd_ch0"] == pytest.approx(stats[1].channels["ch0"]["sd"])
