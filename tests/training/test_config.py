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
