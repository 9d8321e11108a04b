"""Intensity normalisation of one channel, as the plan's ``ChannelPlan`` says.

- ``ct``: clip to the data set's foreground 0.5 / 99.5 percentiles, then z-score with the data
  set's foreground mean and std (HU are comparable across scans; Isensee et al., nnU-Net,
  Nature Methods 2021).
- ``zscore_nonzero``: per-case z-score over the foreground voxels (MR: intensities are
  arbitrary per scan; skull-stripped scans are constant outside the brain); voxels outside
  become 0. The mask is the non-zero voxels, or what the caller passes (the pipeline passes
  voxels that differ from the background value, see ``fingerprint.foreground_mask``).
- ``zscore``: per-case z-score over all voxels.
- ``none``: values unchanged (cast to float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medseg.preprocess.plan import ChannelPlan

#: Floor for a standard deviation so that a constant channel does not divide by zero.
_MIN_STD = 1e-8


def normalise(
    array: np.ndarray, channel: ChannelPlan, *, nonzero: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Normalise one channel ``(I, J, K)``; returns float32 and a JSON-able record.

    ``nonzero`` is the mask used by ``zscore_nonzero`` (default: ``array != 0``); the record
    holds the method and the mean/std (and clip) actually applied, so the step can be undone.
    """
    a = np.asarray(array, dtype=np.float32)
    method = channel.normalisation
    rec: dict[str, Any] = {"channel": channel.name, "method": method}
    if method == "none":
        return a.copy(), rec
    if method == "ct":
        assert channel.mean is not None and channel.std is not None
        lo, hi = channel.clip if channel.clip is not None else (-np.inf, np.inf)
        out = (np.clip(a, lo, hi) - channel.mean) / max(channel.std, _MIN_STD)
        rec.update(mean=channel.mean, std=channel.std, clip=channel.clip)
        return out.astype(np.float32), rec
    if method == "zscore":
        mean, std = float(a.mean(dtype=np.float64)), float(a.std(dtype=np.float64))
        rec.update(mean=mean, std=std)
        return ((a - mean) / max(std, _MIN_STD)).astype(np.float32), rec
    if method == "zscore_nonzero":
        mask = a != 0 if nonzero is None else nonzero
        vals = a[mask]
        if vals.size == 0:
            rec.update(mean=0.0, std=1.0)
            return a.copy(), rec
        mean, std = float(vals.mean(dtype=np.float64)), float(vals.std(dtype=np.float64))
        out = np.zeros_like(a)
        out[mask] = (vals - mean) / max(std, _MIN_STD)
        rec.update(mean=mean, std=std)
        return out, rec
    raise ValueError(f"unknown normalisation {method!r}")  # ChannelPlan validated it already


def apply_normalisation(
    array: np.ndarray,
    channel: ChannelPlan,
    record: dict[str, Any],
    *,
    nonzero: np.ndarray | None = None,
) -> np.ndarray:
    """The voxel-wise step of :func:`normalise` with the statistics ``record`` holds.

    ``record`` is what :func:`normalise` returned for the whole channel; ``array`` is any part
    of that channel (a tile, mirrored or not) and ``nonzero`` the same part of its mask. The
    float32 result equals :func:`normalise`'s at the same voxels bit for bit: the same
    expressions on the same scalars, element by element. This lets inference normalise tile by
    tile from the stored integer scan instead of holding a float32 copy of it.
    """
    a = np.asarray(array, dtype=np.float32)
    method = record["method"]
    if method == "none":
        return a
    if method == "ct":
        assert channel.mean is not None and channel.std is not None
        lo, hi = channel.clip if channel.clip is not None else (-np.inf, np.inf)
        return ((np.clip(a, lo, hi) - channel.mean) / max(channel.std, _MIN_STD)).astype(
            np.float32, copy=False
        )
    mean, std = record["mean"], record["std"]
    if method == "zscore":
        return ((a - mean) / max(std, _MIN_STD)).astype(np.float32, copy=False)
    if method == "zscore_nonzero":
        mask = a != 0 if nonzero is None else nonzero
        out = np.zeros_like(a)
        out[mask] = (a[mask] - mean) / max(std, _MIN_STD)
        return out
    raise ValueError(f"unknown normalisation {method!r}")
