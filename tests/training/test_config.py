"""``[train]`` options: switches must be TOML booleans."""

from __future__ import annotations

import pytest

from medseg.errors import PlanError
from medseg.training.config import TrainConfig


@pytest.mark.parametrize("key", ["amp", "batch_dice", "postprocess"])
def test_switches_that_are_not_booleans_fail_naming_the_key(key: str) -> None:
    with pytest.raises(PlanError, match=rf"\[train\] {key} = 'false' must be true or false"):
        TrainConfig.from_dict({key: "false"})
    assert getattr(TrainConfig.from_dict({key: False}), key) is False


def test_training_length_is_steps_else_epochs_times_iterations() -> None:
    assert TrainConfig.from_dict({"epochs": 3, "iterations_per_epoch": 7}).total_steps == 21
    cfg = TrainConfig.from_dict({"epochs": 3, "iterations_per_epoch": 7, "steps": 15})
    assert cfg.total_steps == 15 and cfg.total_epochs == 3  # 7 + 7 + 1


@pytest.mark.parametrize("bad", [0, -3, 2.5, "100", True])
def test_steps_that_are_not_a_positive_whole_number_fail_naming_the_key(bad: object) -> None:
    with pytest.raises(PlanError, match=r"\[train\] steps"):
        TrainConfig.from_dict({"steps": bad})


@pytest.mark.parametrize("bad", [0, -1.0, "25"])
def test_a_time_cap_that_is_not_positive_minutes_fails(bad: object) -> None:
    with pytest.raises(PlanError, match="time_budget_minutes"):
        TrainConfig.from_dict({"time_budget_minutes": bad})
