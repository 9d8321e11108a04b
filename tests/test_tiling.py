"""Overlap-tile geometry: coverage, lattice alignment, mirroring, tile-size choice."""

from __future__ import annotations

import numpy as np
import pytest

from medseg import tiling
from medseg.model import shapes
from medseg.volume import Box

NET = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "depth": 2,
    "base_channels": 4,
    "channel_multiplier": 2,
    "convs_per_level": 2,
}


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(67, 91, 53), (5, 17, 1), (40, 3, 100)])
@pytest.mark.parametrize("request_size", [1, 10, 37, 64])
def test_tiles_cover_every_voxel_exactly_once(
    depth: int, shape: tuple[int, int, int], request_size: int
) -> None:
    size = tiling.clamp_tile_size(shape, request_size, depth)
    assert all(shapes.is_valid_output(s, depth) for s in size)
    q = shapes.lattice(depth)
    tiles = tiling.plan_tiles(shape, size, q)
    count = np.zeros(shape, np.int32)
    for t in tiles:
        assert all(o % q == 0 for o in t.origin)  # pooling stays aligned
        assert t.output_box().contains(t.write)  # a tile writes only what it computed
        assert not t.write.is_empty()
        count[t.write.slices()] += 1
    assert count.min() == 1 and count.max() == 1


def test_axis_tiles_move_last_tile_back_inside() -> None:
    # depth 2: valid outputs 4, 8, 12, ...; tile 12 owns 12 voxels; axis 30
    got = tiling.axis_tiles(30, 12, 4)
    assert got == [(0, 0, 12), (12, 12, 24), (20, 24, 30)]
    assert tiling.axis_tiles(7, 12, 4) == [(0, 0, 7)]


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_reflect_indices_match_numpy_reflect_pad(n: int) -> None:
    a = np.arange(n)
    pad = 3 * n + 5
    ref = np.pad(a, (pad, pad), mode="reflect") if n > 1 else np.zeros(n + 2 * pad, int)
    assert np.array_equal(tiling.reflect_indices(-pad, n + pad, n), ref)


def test_extract_equals_numpy_reflect_padding(rng: np.random.Generator) -> None:
    img = rng.normal(size=(2, 9, 4, 6)).astype(np.float32)
    pad = ((0, 0), (20, 20), (20, 20), (20, 20))
    padded = np.pad(img, pad, mode="reflect")
    for box in [
        Box((-5, -7, 2), (12, 3, 26)),
        Box((1, 0, 0), (8, 4, 6)),
        Box((-20,) * 3, (3,) * 3),
    ]:
        ref = padded[(slice(None), *box.shift((20, 20, 20)).slices())]
        assert np.array_equal(tiling.extract(img, box), ref)


def test_clamp_tile_size_never_exceeds_request_or_volume() -> None:
    size = tiling.clamp_tile_size((67, 91, 9), 40, 2)
    assert size == (40, 40, 12)  # 12: smallest valid size covering 9 voxels
    assert tiling.clamp_tile_size((67, 91, 9), (41, 43, 100), 2) == (40, 40, 12)
    assert tiling.clamp_tile_size((67, 91, 9), 1, 3) == (12, 12, 12)  # one lattice step minimum


def test_choose_tile_size_fits_budget_and_grows_with_it() -> None:
    shape = (160, 150, 90)
    prev = 0
    for budget in [1 << 20, 1 << 24, 1 << 27, 1 << 30]:
        size = tiling.choose_tile_size(shape, NET, budget)
        assert all(shapes.is_valid_output(s, 2) for s in size)
        vox = int(np.prod(size))
        assert vox >= prev
        prev = vox
        smallest = (shapes.valid_output_size(4, 2),) * 3
        assert tiling.tile_bytes(size, NET) <= budget or size == smallest
        # the next larger tile would not fit (unless the volume is already covered)
        bigger = tuple(
            min(shapes.valid_output_size(s + 1, 2), shapes.valid_output_size(n, 2))
            for s, n in zip(size, shape, strict=True)
        )
        assert bigger == size or tiling.tile_bytes(bigger, NET) > budget
    assert tiling.choose_tile_size(shape, NET, 1 << 40) == (160, 152, 92)


def test_batch_size_respects_budget() -> None:
    per = tiling.tile_bytes((20, 20, 20), NET)
    assert tiling.choose_batch_size((20, 20, 20), NET, 3 * per + 1, 100) == 3
    assert tiling.choose_batch_size((20, 20, 20), NET, 1, 100) == 1
    assert tiling.choose_batch_size((20, 20, 20), NET, 100 * per, 2) == 2


def test_balance_tile_size_keeps_tile_count_and_shrinks_margin_work() -> None:
    shape = (192, 192, 160)
    big = (180, 180, 164)  # valid for depth 4; two tiles along the first two axes
    bal = tiling.balance_tile_size(shape, big, 4)
    assert all(shapes.is_valid_output(s, 4) for s in bal)
    assert all(b <= s for b, s in zip(bal, big, strict=True))
    step = shapes.lattice(4)
    for n, b, s in zip(shape, bal, big, strict=True):
        assert len(tiling.axis_tiles(n, b, step)) == len(tiling.axis_tiles(n, s, step))
    assert bal[:2] == (100, 100) and bal[2] == 164  # 2 x 100 covers 192; 164 is one tile
    m = shapes.margin(4)
    work = [
        len(tiling.plan_tiles(shape, t, step)) * np.prod([s + 2 * m for s in t]) for t in (big, bal)
    ]
    assert work[1] < work[0]


def test_lean_estimate_allows_larger_tiles_within_the_same_budget() -> None:
    net = {"spatial_dims": 3, "in_channels": 1, "out_channels": 5, "depth": 4, "base_channels": 8}
    for size in ((4, 4, 4), (52, 52, 52)):
        lean = tiling.tile_bytes(size, net, channels_last=True, lean=True)
        assert lean < 0.5 * tiling.tile_bytes(size, net, channels_last=True)
    budget = tiling.tile_bytes((52, 52, 52), net, channels_last=True)
    plain = tiling.choose_tile_size((400, 400, 400), net, budget, channels_last=True)
    lean_size = tiling.choose_tile_size((400, 400, 400), net, budget, channels_last=True, lean=True)
    assert plain == (52, 52, 52) and min(lean_size) > 52
    assert tiling.tile_bytes(lean_size, net, channels_last=True, lean=True) <= budget
    assert tiling.choose_batch_size((52,) * 3, net, budget, 8, channels_last=True, lean=True) > 1
