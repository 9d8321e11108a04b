"""Normalisation: known statistics come out as z-scores, clipping and masks behave."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.preprocess.normalise import normalise
from medseg.preprocess.plan import ChannelPlan


def test_ct_with_known_dataset_statistics_normalises_to_zero_mean_unit_std(rng) -> None:
    # synthetic CT: air -1000 around a body of N(40, 12) HU
    ct = np.full((40, 40, 20), -1000.0, dtype=np.float32)
    body = np.zeros(ct.shape, dtype=bool)
    body[8:32, 8:32, 4:16] = True
    ct[body] = rng.normal(40.0, 12.0, size=body.sum())
    ch = ChannelPlan("CT", "CT", "ct", clip=(-100.0, 200.0), mean=40.0, std=12.0)
    out, rec = normalise(ct, ch)
    assert out.dtype == np.float32
    assert abs(out[body].mean()) < 0.02
    assert abs(out[body].std() - 1.0) < 0.02
    # air is clipped to the lower clip value before the z-score
    assert np.allclose(out[~body], (-100.0 - 40.0) / 12.0)
    assert rec == {
        "channel": "CT",
        "method": "ct",
        "mean": 40.0,
        "std": 12.0,
        "clip": (-100.0, 200.0),
    }


def test_zscore_nonzero_uses_only_the_mask_and_keeps_outside_zero(rng) -> None:
    mr = np.zeros((30, 30, 10), dtype=np.float32)
    mr[5:25, 5:25, 2:8] = rng.gamma(3.0, 100.0, size=(20, 20, 6))
    out, rec = normalise(mr, ChannelPlan("T1", "MR", "zscore_nonzero"))
    inside = mr != 0
    assert np.all(out[~inside] == 0)
    assert out[inside].mean() == pytest.approx(0.0, abs=1e-5)
    assert out[inside].std() == pytest.approx(1.0, abs=1e-4)
    assert rec["mean"] == pytest.approx(float(mr[inside].mean()), rel=1e-6)


def test_zscore_over_all_voxels_and_none(rng) -> None:
    a = rng.normal(7.0, 3.0, size=(10, 12, 5)).astype(np.float32)
    out, _ = normalise(a, ChannelPlan("x", "other", "zscore"))
    assert out.mean() == pytest.approx(0.0, abs=1e-5)
    assert out.std() == pytest.approx(1.0, abs=1e-5)
    same, rec = normalise(a, ChannelPlan("x", "other", "none"))
    np.testing.assert_array_equal(same, a)
    assert rec["method"] == "none"


def test_constant_channel_does_not_divide_by_zero() -> None:
    out, _ = normalise(np.full((4, 4, 4), 5.0), ChannelPlan("x", "other", "zscore"))
    assert np.all(np.isfinite(out)) and np.all(out == 0)
