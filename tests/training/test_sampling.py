"""Patch sampling: reflect reads, output/input box geometry, foreground oversampling, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.training.sampling import (
    SamplingConfig,
    batch_rng,
    crop_label,
    foreground_slots,
    input_box,
    output_box,
    read_region,
)
from medseg.volume import Box


@pytest.mark.parametrize(
    "box",
    [
        Box((2, 3, 1), (9, 11, 4)),  # inside
        Box((-5, -2, 0), (4, 20, 3)),  # leaves on low I and both J sides
        Box((10, -7, -3), (21, 3, 9)),  # leaves on high I, low J and both K sides
    ],
)
def test_patch_read_equals_pad_reflect_of_whole_array(box: Box, rng: np.random.Generator) -> None:
    arr = rng.normal(size=(2, 14, 12, 6)).astype(np.float32)
    pad = 10
    ref_full = np.pad(arr, [(0, 0)] + [(pad, pad)] * 3, mode="reflect")
    ref = ref_full[
        (slice(None), *(slice(a + pad, b + pad) for a, b in zip(box.start, box.stop, strict=True)))
    ]
    assert np.array_equal(read_region(arr, box), ref)


def test_read_region_reads_only_the_needed_slab(tmp_path) -> None:
    arr = np.lib.format.open_memmap(
        tmp_path / "a.npy", mode="w+", dtype=np.float32, shape=(1, 50, 50, 1)
    )
    arr[:] = np.arange(2500, dtype=np.float32).reshape(1, 50, 50, 1)
    arr.flush()
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")

    class Spy:
        shape = mm.shape
        dtype = mm.dtype
        asked: list = []

        def __getitem__(self, key):
            self.asked.append(key)
            return mm[key]

    spy = Spy()
    out = read_region(spy, Box((-3, 10, 0), (5, 14, 1)))  # type: ignore[arg-type]
    assert out.shape == (1, 8, 4, 1)
    (key,) = spy.asked
    assert key[1] == slice(0, 5) and key[2] == slice(10, 14)


def test_input_box_is_output_box_grown_by_margin_2d_keeps_k() -> None:
    cfg = SamplingConfig((20, 24), (6, 5))
    ob = Box((3, 4, 2), (23, 28, 3))
    ib = input_box(ob, cfg)
    assert ib == Box((-3, -1, 2), (29, 33, 3))
    assert cfg.input_size == (32, 34)


def test_random_output_boxes_lie_inside_and_cover_the_scan() -> None:
    cfg = SamplingConfig((8, 8, 4), (2, 2, 2), foreground_fraction=0.0)
    shape = (12, 10, 6)
    rng = np.random.default_rng(0)
    hits = np.zeros(shape, dtype=int)
    for _ in range(400):
        b = output_box(shape, cfg, rng)
        assert b.shape == (8, 8, 4)
        assert Box.from_shape(shape).contains(b)
        hits[b.slices()] += 1
    assert hits.min() > 0  # every voxel is reachable


def test_foreground_patches_contain_a_voxel_of_every_rare_class_equally_often() -> None:
    cfg = SamplingConfig((6, 6), (3, 3), foreground_fraction=1.0)
    shape = (40, 40, 1)
    label = np.zeros((1, *shape), dtype=np.int16)
    label[0, 30:40, 0:10, 0] = 1  # large class
    label[0, 5, 35, 0] = 2  # a single voxel of a rare class
    locations = {c: np.argwhere(label[0] == c).astype(np.int32) for c in (0, 1, 2)}
    rng = np.random.default_rng(1)
    seen = {1: 0, 2: 0}
    n = 600
    for _ in range(n):
        b = output_box(shape, cfg, rng, locations, force_foreground=True)
        assert Box.from_shape(shape).contains(b)
        lab = label[(0, *b.slices())]
        assert (lab > 0).any()
        for c in seen:
            seen[c] += int((lab == c).any())
    # class-balanced: the single voxel of class 2 is in about half of all forced patches
    assert 0.4 * n < seen[2] < 0.6 * n


def test_foreground_slots_follow_fraction() -> None:
    rng = np.random.default_rng(0)
    assert foreground_slots(3, 1 / 3, rng) == [False, False, True]
    assert foreground_slots(2, 1 / 3, rng) == [False, True]
    assert not any(foreground_slots(4, 0.0, rng))
    assert all(foreground_slots(4, 1.0, rng))
    # batch of one: forced with probability 1/3, not always
    share = np.mean([foreground_slots(1, 1 / 3, rng)[0] for _ in range(3000)])
    assert 0.3 < share < 0.37


def test_crop_label_ignores_voxels_outside_the_scan() -> None:
    lab = np.arange(16, dtype=np.int16).reshape(1, 4, 4, 1)
    out = crop_label(lab, Box((-1, 2, 0), (2, 6, 1)))
    assert out.shape == (1, 3, 4, 1)
    assert np.all(out[0, 0] == -1) and np.all(out[0, :, 2:] == -1)
    assert np.array_equal(out[0, 1:, :2, 0], lab[0, 0:2, 2:4, 0])


def test_batch_rng_streams_depend_only_on_seed_rank_step() -> None:
    a = batch_rng(7, 0, 3).random(5)
    assert np.array_equal(a, batch_rng(7, 0, 3).random(5))
    assert not np.array_equal(a, batch_rng(7, 1, 3).random(5))
    assert not np.array_equal(a, batch_rng(7, 0, 4).random(5))
