"""The patch dataset: a batch is a function of (seed, rank, step) alone, input patches carry the
network's margin around the labelled output box."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medseg.training.augment import AugmentConfig
from medseg.training.data import PatchBatches, StepRange
from medseg.training.sampling import SamplingConfig
from tests.training.synthetic import tiny_plan


def _batches(prep: Path, rank: int = 0) -> PatchBatches:
    plan = tiny_plan()
    sampling = SamplingConfig(plan.patch_output_size, plan.margin, 1.0 / 3.0)
    augment = AugmentConfig.from_dict({"p_elastic": 1.0, "elastic_sigma": 2.0, "p_rotate": 0.5})
    ids = [f"case{i}" for i in range(5)]
    return PatchBatches(prep, ids, sampling, augment, 3, seed=7, rank=rank, with_weights=True)


def test_a_batch_depends_on_its_step_only_not_on_the_steps_drawn_before(prep: Path) -> None:
    walked = _batches(prep)
    for step in range(4):
        walked[step]
    direct = _batches(prep)[3]
    again = walked[3]
    for key in ("image", "label", "weights"):
        assert torch.equal(direct[key], again[key]), key
    assert not torch.equal(walked[2]["image"], direct["image"])  # other steps draw other patches
    assert not torch.equal(_batches(prep, rank=1)[3]["image"], direct["image"])  # and ranks


def test_input_patches_carry_the_margin_around_the_output_box(prep: Path) -> None:
    plan = tiny_plan()
    batch = _batches(prep)[0]
    out = tuple(plan.patch_output_size)
    inp = tuple(s + 2 * m for s, m in zip(out, plan.margin, strict=True))
    assert tuple(batch["image"].shape) == (3, 1, *inp)
    assert tuple(batch["label"].shape) == (3, 1, *out)
    assert batch["label"].dtype == torch.int64
    assert set(np.unique(batch["label"].numpy())) <= {0, 1}
    assert tuple(batch["weights"].shape) == (3, 1, *out)


def test_step_range_is_the_steps_from_start_to_stop() -> None:
    assert list(StepRange(5, 9)) == [5, 6, 7, 8] and len(StepRange(5, 9)) == 4
    assert list(StepRange(9, 5)) == [] and len(StepRange(9, 5)) == 0
