"""Fold splits: seeded, disjoint, saved once beside the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.errors import PlanError
from medseg.training.splits import fold_cases, load_or_create_splits, make_splits


def test_splits_are_seeded_disjoint_and_cover_every_case(tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(12)]
    splits = make_splits(ids, 5, seed=3)
    assert len(splits) == 5
    vals = [c for s in splits for c in s["val"]]
    assert sorted(vals) == sorted(ids)  # each case validates exactly once
    for s in splits:
        assert not set(s["train"]) & set(s["val"])
        assert sorted(s["train"] + s["val"]) == sorted(ids)
    assert make_splits(ids, 5, seed=3) == splits
    assert make_splits(ids, 5, seed=4) != splits
    first = load_or_create_splits(tmp_path, ids, 5, 3)
    assert json.loads((tmp_path / "splits.json").read_text()) == first
    # saved once: a different seed later does not redraw it
    assert load_or_create_splits(tmp_path, ids, 5, 99) == first
    assert fold_cases(first, "all", ids) == (sorted(ids), [])
    with pytest.raises(PlanError, match="out of range"):
        fold_cases(first, 7, ids)
