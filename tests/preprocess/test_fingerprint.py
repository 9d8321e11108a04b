"""Fingerprint: counts, boxes, statistics and warnings against numpy on the same arrays."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import GeometryError
from medseg.preprocess.fingerprint import (
    CaseFingerprint,
    Fingerprint,
    channel_stats,
    fingerprint_case,
    nonzero_box,
)
from medseg.volume import Grid, Volume


@pytest.fixture
def case(rng):
    grid = Grid.from_spacing((20, 18, 8), (0.9, 0.9, 3.0))
    img = np.zeros((1, *grid.shape), dtype=np.float32)
    img[0, 3:15, 2:16, 1:7] = rng.normal(300, 50, size=(12, 14, 6))
    lab = np.zeros((1, *grid.shape), dtype=np.uint8)
    lab[0, 5:10, 5:10, 2:5] = 1
    lab[0, 10:12, 5:10, 2:5] = 2
    return Volume(img, grid), Volume(lab, grid, True)


def test_counts_box_and_foreground_statistics_match_numpy(case) -> None:
    img, lab = case
    fp, samples = fingerprint_case("c1", [img], lab, declared=[0, 1, 2], samples=10**6)
    values, counts = np.unique(lab.array, return_counts=True)
    assert fp.label_counts == dict(zip(values.tolist(), counts.tolist(), strict=True))
    assert fp.nonzero_box.start == (3, 2, 1) and fp.nonzero_box.stop == (15, 16, 7)
    fg = img.array[0][lab.array[0] > 0]
    np.testing.assert_array_equal(np.sort(samples[0]), np.sort(fg))
    st = channel_stats(["MR"], [samples])[0]
    assert st.mean == pytest.approx(float(fg.astype(np.float64).mean()))
    assert st.p99_5 == pytest.approx(float(np.percentile(fg.astype(np.float64), 99.5)))
    assert fp.warnings == []


def test_sampling_bounds_the_number_of_voxels(case) -> None:
    img, lab = case
    _, samples = fingerprint_case("c1", [img], lab, samples=50)
    assert samples[0].size == 50


def test_undeclared_labels_and_grid_mismatch_are_warned(case) -> None:
    img, lab = case
    fp, _ = fingerprint_case("c1", [img], lab, declared=[0, 1])
    assert any("[2] not in the declared set" in w for w in fp.warnings)
    shifted = Grid.from_spacing(img.grid.shape, img.grid.spacing, (0.0, 0.0, 2.0))
    fp2, _ = fingerprint_case("c1", [img], Volume(lab.array, shifted, True))
    assert any("differ by up to 2 mm" in w for w in fp2.warnings)


def test_channel_grids_must_agree(case) -> None:
    img, _ = case
    other = Volume(img.array, Grid.from_spacing(img.grid.shape, (1.0, 1.0, 1.0)))
    with pytest.raises(GeometryError, match="differ"):
        fingerprint_case("c1", [img, other], None)


def test_nonzero_box_of_empty_volume_is_everything() -> None:
    box = nonzero_box(np.zeros((2, 4, 5, 6)))
    assert box.start == (0, 0, 0) and box.stop == (4, 5, 6)


def test_json_round_trip(case) -> None:
    img, lab = case
    fp, samples = fingerprint_case("c1", [img], lab, declared=[0, 1, 2])
    full = Fingerprint(
        "d", ["MR"], ["MR"], {0: "bg", 1: "a", 2: "b"}, None, [fp], channel_stats(["MR"], [samples])
    )
    back = Fingerprint.from_json(full.to_json())
    assert back.to_json() == full.to_json()
    assert isinstance(back.cases[0], CaseFingerprint) and back.cases[0].grid == fp.grid
