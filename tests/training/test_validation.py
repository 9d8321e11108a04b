"""Validation: whole-case Dice per class and per region of the plan."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from medseg.preprocess.plan import Plan
from medseg.training import train
from medseg.training.validation import validate
from tests.training.synthetic import synthetic_pipeline


def test_region_dice_trains_and_validation_reports_region_dice(prep: Path, tmp_path: Path) -> None:
    plan = Plan.load(prep / "plan.json")
    dataclasses.replace(plan, regions={"disc": [1]}).save(prep / "plan.json")
    pipe = synthetic_pipeline(prep, region_dice=True, val_every=1)
    res = train(pipe, tmp_path / "r", epochs=1, device="cpu", progress=False)
    assert np.isfinite(res.log[-1]["train_loss"])

    info = json.loads((tmp_path / "r" / "training.json").read_text())
    v = validate(res.model, prep, info["val_cases"], Plan.load(prep / "plan.json"), None)
    # one class in the region: the region Dice is that class's Dice
    assert v.region_dice["disc"] == pytest.approx(v.dice["disc"])
    header = (tmp_path / "r" / "train_log.csv").read_text().splitlines()[0]
    assert header.endswith("val_dice_disc,val_dice_region_disc")
