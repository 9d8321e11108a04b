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
    assert applied and all(d["dice_after"] > d["dice_before"] for d in applied)
    assert applied[0]["dice_before"] < 1.0 and applied[0]["dice_after"] == pytest.approx(1.0)
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
    assert tried["largest_component"]["dice_after"] < tried["largest_component"]["dice_before"]
