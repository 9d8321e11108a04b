"""Fixtures shared by the preprocessing and restore tests."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.volume import Grid, Volume


@pytest.fixture
def scan(oblique_grid: Grid, rng) -> tuple[list[Volume], Volume]:
    """Two channels that are zero outside a head-like ellipsoid, and a two-class label."""
    g = oblique_grid
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij"), -1)
    xyz = g.world(ijk)
    centre = g.world(np.array(g.shape) / 2.0)
    r = np.linalg.norm((xyz - centre) / [8.0, 9.0, 12.0], axis=-1)
    head = r < 1.0
    t1 = np.where(head, 200 + 30 * rng.normal(size=g.shape), 0).astype(np.float32)
    t2 = np.where(head, 50 + xyz[..., 2], 0).astype(np.float32)
    lab = np.zeros(g.shape, np.uint8)
    lab[r < 0.7] = 1
    lab[r < 0.4] = 4
    images = [
        Volume(t1[None], g, meta={"source": "t1.nii.gz"}),
        Volume(t2[None], g, meta={"source": "t2.nii.gz"}),
    ]
    return images, Volume(lab[None], g, True, {"source": "seg.nii.gz"})
