"""Postprocessing steps against scipy.ndimage and the validation-driven decision."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.errors import PlanError
from medseg.postprocess import (
    apply_postprocessing,
    decide_postprocessing,
    empty_config,
    region_decode,
)


def _map():
    a = np.zeros((20, 20, 10), np.int16)
    a[2:10, 2:10, 2:8] = 1  # big class-1 object (384 voxels)
    a[15:17, 15:17, 2:4] = 1  # small class-1 island (8 voxels)
    a[12:14, 2:4, 2:3] = 2  # class-2 object (4 voxels)
    a[5, 5, 5] = 0  # a hole inside class 1
    return a


def test_largest_component_per_class_keeps_only_the_biggest_island():
    cfg = {
        "format": "medseg-postprocessing",
        "version": 1,
        "steps": [{"op": "largest_component", "classes": [1]}],
    }
    out = apply_postprocessing(_map(), (1.0, 1.0, 1.0), cfg)
    assert not out[15:17, 15:17, 2:4].any()  # island gone
    assert (out[12:14, 2:4, 2:3] == 2).all()  # class 2 untouched
    assert (out == 1).sum() == 383


def test_largest_component_of_all_foreground_removes_other_classes_islands():
    cfg = {"steps": [{"op": "largest_component_foreground"}]}
    out = apply_postprocessing(_map(), (1.0, 1.0, 1.0), cfg)
    assert (out == 2).sum() == 0 and (out == 1).sum() == 383


def test_connectivity_full_joins_diagonal_neighbours():
    a = np.zeros((6, 6), np.int16)
    a[1:3, 1:3] = 1
    a[3, 3] = 1  # touches the square only by a corner
    face = apply_postprocessing(
        a,
        (1.0, 1.0),
        {"steps": [{"op": "largest_component", "classes": [1], "connectivity": "face"}]},
    )
    full = apply_postprocessing(
        a,
        (1.0, 1.0),
        {"steps": [{"op": "largest_component", "classes": [1], "connectivity": "full"}]},
    )
    assert face[3, 3] == 0 and full[3, 3] == 1


def test_remove_small_uses_millimetres():
    cfg = {"steps": [{"op": "remove_small", "classes": [1], "min_volume_mm3": 50.0}]}
    # island: 8 voxels; at 1 mm^3 it is removed, at 8 mm^3 per voxel (64 mm^3) it stays
    assert not apply_postprocessing(_map(), (1.0, 1.0, 1.0), cfg)[15:17, 15:17, 2:4].any()
    assert apply_postprocessing(_map(), (2.0, 2.0, 2.0), cfg)[15:17, 15:17, 2:4].all()


def test_fill_holes_fills_only_enclosed_background():
    cfg = {"steps": [{"op": "fill_holes", "classes": [1]}]}
    a = _map()
    out = apply_postprocessing(a, (1.0, 1.0, 1.0), cfg)
    assert out[5, 5, 5] == 1
    assert np.array_equal(
        out != a,
        np.isin(np.arange(out.size), [np.ravel_multi_index((5, 5, 5), a.shape)]).reshape(a.shape),
    )


def test_fill_holes_does_not_overwrite_another_class():
    a = np.zeros((7, 7), np.int16)
    a[1:6, 1:6] = 1
    a[3, 3] = 2  # class 2 enclosed by class 1 stays class 2
    out = apply_postprocessing(a, (1.0, 1.0), {"steps": [{"op": "fill_holes", "classes": [1]}]})
    assert out[3, 3] == 2


def test_empty_config_changes_nothing_and_bad_configs_fail_clearly():
    a = _map()
    assert np.array_equal(apply_postprocessing(a, (1.0, 1.0, 1.0), empty_config()), a)
    assert np.array_equal(apply_postprocessing(a, (1.0, 1.0, 1.0), None), a)
    with pytest.raises(PlanError, match="op must be"):
        apply_postprocessing(a, (1.0, 1.0, 1.0), {"steps": [{"op": "smooth"}]})
    with pytest.raises(PlanError, match="version"):
        apply_postprocessing(
            a, (1.0, 1.0, 1.0), {"format": "medseg-postprocessing", "version": 99, "steps": []}
        )


def test_decide_keeps_largest_component_when_it_helps_and_records_numbers():
    rng = np.random.default_rng(0)
    refs, preds = [], []
    for _ in range(3):
        ref = np.zeros((24, 24, 8), np.int16)
        ref[4:16, 4:16, 2:6] = 1
        pred = ref.copy()
        # spurious far-away islands of class 1 lower its Dice; keeping the largest removes them
        for _ in range(3):
            i, j = rng.integers(18, 22, 2)
            pred[i : i + 2, j : j + 2, 3:5] = 1
        refs.append(ref)
        preds.append(pred)
    cfg = decide_postprocessing(preds, refs, [(1.0, 1.0, 2.0)] * 3, num_classes=2)
    json.dumps(cfg)  # JSON-able as postprocessing.json
    assert cfg["steps"][0]["op"] in ("largest_component_foreground", "largest_component")
    applied = [d for d in cfg["decisions"] if d["applied"]]
    assert applied and all(d["after"] > d["before"] for d in applied)
    assert applied[0]["before"] < 1.0 and applied[0]["after"] == pytest.approx(1.0)
    out = apply_postprocessing(preds[0], (1.0, 1.0, 2.0), cfg)
    assert np.array_equal(out, refs[0])


def test_decide_rejects_a_step_that_would_lower_dice():
    # the reference has two objects of class 1: keeping the largest would delete a true one
    ref = np.zeros((20, 20), np.int16)
    ref[2:8, 2:8] = 1
    ref[12:15, 12:15] = 1
    pred = ref.copy()
    pred[2, 2] = 0
    cfg = decide_postprocessing([pred], [ref], [(1.0, 1.0)], num_classes=2)
    assert all(
        s["op"] not in ("largest_component", "largest_component_foreground") for s in cfg["steps"]
    )
    tried = {d["op"]: d for d in cfg["decisions"]}
    assert tried["largest_component"]["applied"] is False
    assert tried["largest_component"]["after"] < tried["largest_component"]["before"]


# -- probability steps ---------------------------------------------------------------------------
def _touching_cells(size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Two cells separated by a membrane that has a gap: (probability of 'cell', true labels).

    The membrane runs down column 20; rows 18-21 of columns 19-21 are a faint gap (p = 0.6),
    so the argmax joins the two cells through it while the probability still dips there.
    """
    i, j = np.mgrid[0:size, 0:size]
    p = np.clip(0.95 - 0.9 * np.exp(-((j - 20) ** 2) / 2.0), 0.0, 1.0)
    p[18:22, 19:22] = 0.6
    truth = np.where(j < 20, 1, 2)
    truth[:, 20] = 0
    return p.astype(np.float32), truth


def test_watershed_split_separates_cells_the_argmax_joins():
    from skimage.metrics import adapted_rand_error

    from medseg.postprocess import watershed_split

    p, truth = _touching_cells()
    merged, n_merged = _label_face(p > 0.5)
    assert n_merged == 1  # the gap joins them
    split = watershed_split(p, (1.0, 1.0), seed=0.9)
    lab, n = _label_face(split)
    assert n == 2
    assert adapted_rand_error(truth, lab)[0] < 0.01  # skimage's scoring, truth 0 ignored
    assert adapted_rand_error(truth, merged)[0] > 0.3
    assert (~split).sum() <= 40 + 2  # one-pixel line down the membrane column


def _label_face(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    return lab, int(n)


def test_watershed_split_never_joins_two_seeds():
    from scipy import ndimage

    from medseg.postprocess import remove_small, watershed_split

    rng = np.random.default_rng(3)
    p = ndimage.gaussian_filter(rng.random((48, 40, 6)), 2.0)
    p = (p - p.min()) / (p.max() - p.min())
    split = watershed_split(p, (1.0, 1.0, 2.0), seed=0.6, min_seed_mm3=8.0)
    seeds, n_seeds = ndimage.label(remove_small(p > 0.6, (1.0, 1.0, 2.0), 8.0))
    assert n_seeds > 1
    assert split[seeds > 0].all()  # every seed is inside an object
    comps = ndimage.label(split)[0]  # face connectivity, scipy's default
    pairs = {(int(c), int(s)) for c, s in zip(comps[seeds > 0], seeds[seeds > 0], strict=True)}
    assert len({c for c, _ in pairs}) == n_seeds  # one object per seed: none joined
    assert (~split).mean() < 0.2  # lines, not a thick boundary class
    assert not watershed_split(0.9 * p, (1.0, 1.0, 2.0), seed=0.95).any()  # no seed: nothing


def test_decide_picks_the_threshold_that_recovers_a_faint_class():
    rng = np.random.default_rng(1)
    refs, preds, probs = [], [], []
    for _ in range(3):
        ref = (rng.random((30, 30)) < 0.3).astype(np.int16)
        # the network is under-confident on class 1: 0.38 there, 0.1 elsewhere
        p1 = np.where(ref == 1, 0.38, 0.1).astype(np.float32)
        refs.append(ref)
        probs.append(np.stack([1 - p1, p1]))
        preds.append((p1 > 0.5).astype(np.int16))
    cfg = decide_postprocessing(preds, refs, [(1.0, 1.0)] * 3, 2, probabilities=probs)
    assert cfg["steps"][0]["op"] == "threshold" and cfg["steps"][0]["value"] < 0.38
    out = apply_postprocessing(preds[0], (1.0, 1.0), cfg, probs[0])
    assert np.array_equal(out, refs[0])


def test_decide_with_rand_metric_chooses_watershed_for_touching_cells():
    p, truth = _touching_cells()
    ref = (truth > 0).astype(np.int16)
    probs = [np.stack([1 - p, p])]
    pred = (p > 0.5).astype(np.int16)
    dice_cfg = decide_postprocessing([pred], [ref], [(1.0, 1.0)], 2, probabilities=probs)
    assert all(s["op"] != "watershed_split" for s in dice_cfg["steps"])  # only for "rand"
    cfg = decide_postprocessing([pred], [ref], [(1.0, 1.0)], 2, probabilities=probs, metric="rand")
    assert cfg["metric"] == "rand" and cfg["steps"][0]["op"] == "watershed_split"
    out = apply_postprocessing(pred, (1.0, 1.0), cfg, probs[0])
    assert _label_face(out > 0)[1] == 2


def test_probability_step_without_probabilities_is_refused():
    cfg = {"steps": [{"op": "threshold", "classes": [1], "value": 0.3}]}
    with pytest.raises(PlanError, match="probabilities"):
        apply_postprocessing(np.zeros((4, 4), np.int16), (1.0, 1.0), cfg)
    with pytest.raises(PlanError, match="value"):
        apply_postprocessing(
            np.zeros((4, 4), np.int16),
            (1.0, 1.0),
            {"steps": [{"op": "threshold", "classes": [1], "value": 1.5}]},
            np.zeros((2, 4, 4), np.float32),
        )
    with pytest.raises(PlanError, match="metric"):
        decide_postprocessing([], [], [], 2, metric="hd95")


BRATS_REGIONS = [[1, 2, 3, 4], [1, 3, 4], [4]]


def _dirichlet(shape: tuple[int, ...], classes: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.moveaxis(rng.dirichlet(np.full(classes, 0.5), size=shape), -1, 0).astype(np.float32)


def test_region_decode_by_hand():
    # background 0.4 is the argmax, but the tumour classes hold 0.6: whole tumour. Core
    # (0.05 + 0.1 + 0.2 = 0.35) beats oedema (0.25); enhancing 0.2 beats 1 + 3 (0.15): class 4
    p = np.array([0.4, 0.05, 0.25, 0.1, 0.2], np.float32).reshape(5, 1, 1)
    assert int(p.argmax(0)[0, 0]) == 0
    assert int(region_decode(p, BRATS_REGIONS)[0, 0]) == 4
    # enhancing 0.1 < necrosis + non-enhancing 0.15 + 0.1 -> the argmax of {1, 3}: class 3
    q = np.array([0.3, 0.1, 0.25, 0.25, 0.1], np.float32).reshape(5, 1, 1)
    assert int(region_decode(q, BRATS_REGIONS)[0, 0]) == 3


def test_region_decode_whole_region_is_the_half_cut_of_its_probability():
    p = _dirichlet((12, 11, 7))
    out = region_decode(p, BRATS_REGIONS)
    assert np.array_equal(out > 0, p[1:].sum(0) > 0.5)
    # nested: enhancing within core within whole
    core, enh = np.isin(out, [1, 3, 4]), out == 4
    assert not (enh & ~core).any() and not (core & (out == 0)).any()


def test_region_decode_equals_argmax_where_one_class_holds_the_majority():
    p = _dirichlet((20, 20, 5), seed=2)
    out = region_decode(p, BRATS_REGIONS)
    sure = p.max(0) > 0.5
    assert sure.any() and np.array_equal(out[sure], p.argmax(0)[sure])


def test_decide_keeps_region_decode_when_the_argmax_loses_split_tumour():
    refs, preds, probs = [], [], []
    rng = np.random.default_rng(4)
    for _ in range(2):
        ref = np.zeros((24, 24), np.int16)
        ref[4:20, 4:20] = 2
        ref[8:16, 8:16] = 1
        # inside the tumour the network splits its belief: background 0.4, 0.3 / 0.3
        p = np.zeros((3, 24, 24), np.float32)
        p[0] = 0.9
        p[1] = p[2] = 0.05
        tum = ref > 0
        p[0][tum] = 0.4
        p[1][tum] = np.where(ref[tum] == 1, 0.35, 0.25) + rng.uniform(-0.01, 0.01, tum.sum())
        p[2][tum] = 0.6 - p[1][tum]
        refs.append(ref)
        probs.append(p)
        preds.append(p.argmax(0).astype(np.int16))
    assert not (preds[0] > 0).any()  # the argmax finds no tumour at all
    regions = {"whole": [1, 2], "core": [1]}
    cfg = decide_postprocessing(
        preds, refs, [(1.0, 1.0)] * 2, 3, probabilities=probs, regions=regions
    )
    assert cfg["steps"][0] == {"op": "region_decode", "regions": [[1, 2], [1]]}
    first = cfg["decisions"][0]
    assert first["before"] == 0.0 and first["after"] == pytest.approx(1.0)
    out = apply_postprocessing(preds[0], (1.0, 1.0), cfg, probs[0])
    assert np.array_equal(out > 0, refs[0] > 0)


def test_region_decode_refuses_bad_steps():
    p = _dirichlet((4, 4), classes=3)
    for bad in ({"op": "region_decode"}, {"op": "region_decode", "regions": [["a"]]}):
        with pytest.raises(PlanError, match="regions"):
            apply_postprocessing(np.zeros((4, 4), np.int16), (1.0, 1.0), {"steps": [bad]}, p)
    with pytest.raises(PlanError, match="not among"):
        apply_postprocessing(
            np.zeros((4, 4), np.int16),
            (1.0, 1.0),
            {"steps": [{"op": "region_decode", "regions": [[1, 2, 3]]}]},
            p,
        )
    with pytest.raises(PlanError, match="probabilities"):
        apply_postprocessing(
            np.zeros((4, 4), np.int16),
            (1.0, 1.0),
            {"steps": [{"op": "region_decode", "regions": [[1, 2]]}]},
        )
