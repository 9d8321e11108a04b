"""medseg.preprocess.restore: predictions on the plan's grid come back onto the scan's own grid
(nearest labels, linear probabilities, the argmax of those without making them), checked
against scipy's interpolation through world coordinates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi

from medseg.errors import GeometryError
from medseg.preprocess.pipeline import CaseRecord, preprocess_case
from medseg.preprocess.restore import (
    resample_argmax,
    restore_classes,
    restore_labels,
    restore_probabilities,
    restore_resamples,
)
from medseg.resample import axis_map
from medseg.volume import Box, Grid
from tests.preprocess.test_pipeline import dice, make_plan
from tests.test_resample import reference


def test_restored_labels_equal_scipy_nearest_through_world_coordinates(scan) -> None:
    """A label restored from a resampled plan grid is, inside the crop, scipy's nearest
    neighbour at every scan voxel centre mapped into the plan grid; outside it, class 0."""
    images, label = scan
    out = preprocess_case(images, make_plan(target_spacing=(1.7, 1.3, 2.1)), label)
    rec = out.record
    classes = out.label.array[0]
    got = restore_labels(classes, rec)
    want = reference(classes, rec.grid, rec.original_grid, 0).astype(got.dtype)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in rec.original_grid.shape], indexing="ij"), -1)
    c = rec.cropped_grid.index(rec.original_grid.world(ijk))
    inside = np.all((c > -0.5 + 1e-3) & (c < np.array(rec.cropped_grid.shape) - 0.5 - 1e-3), -1)
    assert inside.mean() > 0.2 and (~inside).any()
    # away from exact half-voxel ties, where rounding may pick either neighbour
    x = rec.grid.index(rec.original_grid.world(ijk))
    clear = np.all(np.abs(x - np.floor(x) - 0.5) > 1e-3, -1) & inside
    np.testing.assert_array_equal(got[clear], want[clear])
    assert not got[~inside].any()


def test_2d_predictions_get_their_singleton_axis_back() -> None:
    g = Grid.from_spacing((6, 5, 1), (0.5, 0.5, 1.0))
    rec = CaseRecord(g, None, Box.from_shape(g.shape), g, g, [], [])
    classes = np.arange(30, dtype=np.int8).reshape(6, 5) % 3
    np.testing.assert_array_equal(restore_labels(classes, rec), classes[..., None])
    with pytest.raises(GeometryError, match="classes shape"):
        restore_labels(np.zeros((5, 6), np.int8), rec)


def test_crop_and_reorient_then_restore_is_exact(scan) -> None:
    images, label = scan
    out = preprocess_case(images, make_plan(), label)  # no resampling
    assert out.record.crop_box.shape != out.record.original_grid.shape  # it did crop
    restored = restore_labels(out.label.array[0], out.record)
    np.testing.assert_array_equal(restored, make_plan().labels_to_classes(label.array[0]))


def test_resampled_label_maps_back_with_high_dice(scan) -> None:
    images, label = scan
    out = preprocess_case(images, make_plan(target_spacing=(0.5, 0.5, 0.8)), label)
    restored = restore_labels(out.label.array[0], out.record)
    orig = make_plan().labels_to_classes(label.array[0])
    assert restored.shape == label.grid.shape
    for c in (1, 2):
        assert dice(restored == c, orig == c) >= 0.99


def test_probabilities_restore_onto_the_original_grid(scan) -> None:
    images, label = scan
    out = preprocess_case(images, make_plan(target_spacing=(0.5, 0.5, 0.8)), label)
    onehot = np.stack([(out.label.array[0] == c) for c in range(3)]).astype(np.float32)
    p = restore_probabilities(onehot, out.record)
    assert p.shape == (3, *label.grid.shape)
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)
    outside = ~np.any(np.stack([im.array[0] != 0 for im in images]), axis=0)
    assert outside.any() and np.all(p[0][outside] == 1.0)
    orig = make_plan().labels_to_classes(label.array[0])
    for c in (1, 2):
        assert dice(p.argmax(0) == c, orig == c) >= 0.95


@pytest.mark.parametrize("spacing", [(0.5, 0.5, 0.8), (2.0, 1.5, 3.0)])
def test_restore_classes_is_the_argmax_of_the_restored_probabilities(scan, spacing) -> None:
    images, label = scan
    out = preprocess_case(images, make_plan(target_spacing=spacing), label)
    assert restore_resamples(out.record)
    rng = np.random.default_rng(3)
    # background probability 0 on the plan grid: class 0 only outside the crop
    fg = rng.dirichlet(np.ones(2), size=out.record.grid.shape).astype(np.float32)
    probs = np.concatenate([np.zeros((1, *fg.shape[:-1]), np.float32), np.moveaxis(fg, -1, 0)])
    want = restore_probabilities(probs, out.record).argmax(0)
    got = restore_classes(probs, out.record)
    assert got.dtype == np.int8 and got.shape == label.grid.shape
    assert np.array_equal(got, want)
    head = np.any(np.stack([im.array[0] != 0 for im in images]), axis=0)
    assert (got == 0).any() and not np.any((got == 0) & head)
    assert np.isin(got[head], (1, 2)).all() and (got == 1).any() and (got == 2).any()


def test_restore_classes_skips_classes_that_never_win(scan) -> None:
    """A class that holds no probability anywhere may be left out: same labels."""
    images, label = scan
    out = preprocess_case(images, make_plan(target_spacing=(2.0, 1.5, 3.0)), label)
    rng = np.random.default_rng(4)
    two = np.moveaxis(rng.dirichlet(np.ones(2), size=out.record.grid.shape), -1, 0)
    probs = np.concatenate([two, np.zeros((1, *two.shape[1:]))]).astype(np.float32)
    full = restore_classes(probs, out.record)
    assert np.array_equal(restore_classes(probs, out.record, classes=[1]), full)
    assert (full == 1).any() and not (full == 2).any()


def test_crop_and_flip_alone_do_not_resample(scan) -> None:
    images, label = scan
    out = preprocess_case(images, make_plan(orientation=("L", "P", "S")), label)
    assert out.record.crop_box.shape != label.grid.shape or out.record.orientation is not None
    assert not restore_resamples(out.record)


def test_a_half_voxel_shift_at_the_same_spacing_resamples() -> None:
    g = Grid((10, 12, 8), np.diag([1.5, 1.5, 3.0, 1.0]))
    shifted = np.diag([1.5, 1.5, 3.0, 1.0])
    shifted[:3, 3] = (0.75, 0.0, 0.0)
    box = Box((0, 0, 0), g.shape)
    assert not restore_resamples(CaseRecord(g, None, box, g, g, [], []))
    assert restore_resamples(CaseRecord(g, None, box, g, Grid(g.shape, shifted), [], []))


@pytest.mark.parametrize("case", ["brats_2013_pat0001_1", "brats_2013_pat0005_1"])
def test_restored_fractions_beat_nearest_on_brats_labels_at_2mm(data_root: Path, case) -> None:
    """Reference whole-tumour masks taken to 2 mm (linear: the tumour fraction of each 2 mm
    voxel) and back to 1 mm: from the fractions (restore_classes) they keep more of their
    Dice than the nearest-neighbour copy of the 2 mm argmax (restore_labels)."""
    from medseg.io import read_volume
    from medseg.resample import resample_array

    ref = read_volume(data_root / "brats2013" / case / "OTMultiClass.nii.gz", label=True)
    g = ref.grid
    coarse = g.with_spacing((2.0, 2.0, 2.0))
    record = CaseRecord(g, None, Box((0, 0, 0), g.shape), g, coarse, [], [])
    tumour = ref.array[0] > 0
    frac = resample_array(tumour[None].astype(np.float32), g, coarse, order=1)[0]
    probs = np.stack([1.0 - frac, frac])
    from_fractions = restore_classes(probs, record) == 1
    nearest = restore_labels((frac > 0.5).astype(np.int8), record) == 1
    assert dice(from_fractions, tumour) >= 0.96
    assert dice(from_fractions, tumour) > dice(nearest, tumour) + 0.01


# -- argmax of linearly resampled probabilities --------------------------------------------


def _probabilities(rng: np.random.Generator, classes: int, shape, sigma: float = 1.5) -> np.ndarray:
    """Smooth softmax maps: blobs of each class several voxels wide."""
    z = np.stack([ndi.gaussian_filter(rng.normal(size=shape), sigma) for _ in range(classes)])
    e = np.exp(8.0 * (z - z.max(axis=0)))
    return (e / e.sum(axis=0)).astype(np.float32)


def _argmax_reference(probs: np.ndarray, source: Grid, target: Grid) -> tuple[np.ndarray, ...]:
    """scipy's linear interpolation of every class, its argmax and the top-two margin."""
    full = np.stack([reference(c, source, target, 1) for c in probs])
    top = np.sort(full, axis=0)
    return full.argmax(axis=0), top[-1] - top[-2]


def _argmax_targets(grid: Grid) -> dict[str, Grid]:
    t = np.deg2rad(25.0)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    reoriented = grid.reoriented("SRA")[0].with_spacing((1.7, 0.6, 0.9))
    return {
        "finer": grid.with_spacing((0.5, 0.45, 1.1)),
        "coarser": grid.with_spacing((1.9, 1.6, 4.0)),
        "reoriented": reoriented,
        "oblique": Grid.from_spacing((12, 14, 9), (1.2, 1.0, 1.5), grid.origin, rot),
    }


@pytest.mark.parametrize("kind", ["finer", "coarser", "reoriented", "oblique"])
@pytest.mark.parametrize("classes", [2, 4])
def test_resample_argmax_equals_argmax_of_linear_interpolation(
    oblique_grid: Grid, rng, kind: str, classes: int
) -> None:
    probs = _probabilities(rng, classes, oblique_grid.shape)
    target = _argmax_targets(oblique_grid)[kind]
    assert (axis_map(oblique_grid, target) is None) == (kind == "oblique")
    got = resample_argmax(probs, oblique_grid, target)
    ref, margin = _argmax_reference(probs, oblique_grid, target)
    assert got.shape == target.shape and len(np.unique(ref)) == classes
    clear = margin > 1e-5  # float32 vs float64 rounding may swap exact ties
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got[clear], ref[clear])


@pytest.mark.parametrize("kind", ["finer", "reoriented", "oblique"])
def test_resample_argmax_reads_probabilities_only_where_the_argmax_changes(
    oblique_grid: Grid, rng, kind: str
) -> None:
    """Away from the source argmax's boundaries the nearest copy is exact: probabilities
    there are never read (NaN would otherwise spread into the result)."""
    probs = _probabilities(rng, 2, oblique_grid.shape, sigma=4.0)
    labels = probs.argmax(axis=0).astype(np.int8)
    target = _argmax_targets(oblique_grid)[kind]
    ref, margin = _argmax_reference(probs, oblique_grid, target)
    interior = ndi.maximum_filter(labels, 5, mode="nearest") == ndi.minimum_filter(
        labels, 5, mode="nearest"
    )
    assert 0.2 < interior.mean() < 0.9
    poisoned = probs.copy()
    poisoned[:, interior] = np.nan
    got = resample_argmax(poisoned, oblique_grid, target, labels=labels)
    clear = margin > 1e-5
    np.testing.assert_array_equal(got[clear], ref[clear])


def test_resample_argmax_restricted_classes_ignore_the_others(oblique_grid: Grid, rng) -> None:
    probs = _probabilities(rng, 4, oblique_grid.shape)
    target = _argmax_targets(oblique_grid)["finer"]
    got = resample_argmax(probs, oblique_grid, target, classes=[2])
    ref, margin = _argmax_reference(probs[[0, 2]], oblique_grid, target)
    clear = margin > 1e-5
    np.testing.assert_array_equal(got[clear], np.where(ref == 1, 2, 0)[clear])


def test_resample_argmax_refuses_a_mismatched_array(oblique_grid: Grid) -> None:
    with pytest.raises(GeometryError, match="do not match"):
        resample_argmax(np.zeros((2, 3, 4, 5), np.float32), oblique_grid, oblique_grid)
