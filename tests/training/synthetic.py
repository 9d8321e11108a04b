"""A tiny 2D synthetic cache (five 40x36 scans of a bright disc, K == 1) written in the
documented cache layout by the cache's own writer, and a pipeline that trains on it; the network
is a depth-2 U-Net with 4 base channels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import Pipeline
from medseg.model import shapes
from medseg.preprocess.plan import ChannelPlan, Plan

DEPTH = 2


def tiny_plan(dropout: float = 0.0) -> Plan:
    m = shapes.margin(DEPTH)
    out = shapes.valid_output_size(12, DEPTH)
    net = dict(
        spatial_dims=2, in_channels=1, out_channels=2, depth=DEPTH, base_channels=4,
        channel_multiplier=2, convs_per_level=2, upsampling="transpose", norm="batch",
        dropout=dropout,
    )  # fmt: skip
    return Plan(
        spatial_dims=2, channels=[ChannelPlan("x")], label_values=[0, 255],
        class_names=["background", "disc"], network=net, patch_output_size=(out, out),
        tile_output_size=(out, out), margin=(m, m),
    )  # fmt: skip


def write_synthetic_cache(
    prep: Path, n: int = 5, weights: bool = True, dropout: float = 0.0
) -> Plan:
    """Cases written by the cache's own writer (image, label, weights, locations, record);
    ``dropout`` goes into the plan's network (the U-Net's dropout at the bottom)."""
    from medseg.preprocess.cache import sample_locations, write_case
    from medseg.preprocess.pipeline import CaseRecord
    from medseg.volume import Box, Grid

    rng = np.random.default_rng(0)
    plan = tiny_plan(dropout)
    prep.mkdir(parents=True)
    plan.save(prep / "plan.json")
    grid = Grid.from_spacing((40, 36, 1))
    record = CaseRecord(grid, None, Box((0, 0, 0), (40, 36, 1)), grid, grid, [], [])
    for i in range(n):
        ii, jj = np.mgrid[:40, :36]
        ci, cj = rng.integers(10, 30), rng.integers(10, 26)
        lab = ((ii - ci) ** 2 + (jj - cj) ** 2 < 40).astype(np.int16)[None, :, :, None]
        img = (lab + rng.normal(0, 0.3, lab.shape)).astype(np.float32)
        write_case(
            prep, f"case{i}", image=img, label=lab,
            weights=(1.0 + 4.0 * lab).astype(np.float32) if weights else None,
            locations=sample_locations(lab[0], 2, f"case{i}"), record=record, digest="x",
        )  # fmt: skip
    return plan


def synthetic_pipeline(prep: Path, **train_opts: Any) -> Pipeline:
    """A pipeline on the synthetic cache: 4 steps of 2 patches per epoch, no worker processes."""
    opts = {
        "iterations_per_epoch": 4,
        "batch_size": 2,
        "workers": 0,
        "augment": {"p_elastic": 0.5, "elastic_sigma": 2.0},
    }
    opts.update(train_opts)
    return Pipeline(name="synthetic", prep_dir=prep, train=opts, text='name = "synthetic"\n')
