"""The tiled forward pass: exactness against the whole-volume forward pass, mirroring, precision,
memory-driven tiling, the lean forward."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from medseg import runtime
from medseg.errors import ModelError
from medseg.inference.tiled import (
    TileLayout,
    check_tiling,
    inference_model,
    predict_logits,
    run_tiles,
    tile_layout,
)
from medseg.model import shapes
from medseg.runtime import native_bf16
from tests.inference.helpers import CentreCrop, random_unet, whole_volume_logits


def test_tiled_equals_whole_volume_3d(rng: np.random.Generator) -> None:
    net = random_unet(3, 1, 2, depth=2, base=4)
    image = rng.normal(size=(1, 67, 91, 53)).astype(np.float32)
    ref = whole_volume_logits(net, image, [()])
    for tile in (12, 28, (20, 44, 36)):
        got = predict_logits(net, image, tile_size=tile)
        layout = tile_layout(net, image.shape[1:], tile_size=tile)
        assert len(layout.tiles) > 1
        assert np.abs(got - ref).max() <= 1e-4, tile


@pytest.mark.parametrize("upsampling", ["transpose", "interpolate"])
def test_tiled_equals_whole_volume_3d_depth3(rng: np.random.Generator, upsampling: str) -> None:
    net = random_unet(3, 2, 3, depth=3, base=2, upsampling=upsampling, seed=1)
    image = rng.normal(size=(2, 29, 23, 17)).astype(np.float32)
    ref = whole_volume_logits(net, image, [()])
    for tile in (12, 20):
        got = predict_logits(net, image, tile_size=tile, batch_size=3)
        assert np.abs(got - ref).max() <= 1e-4, tile


@pytest.mark.parametrize("depth", [1, 3, 4])
def test_tiled_equals_whole_volume_2d(rng: np.random.Generator, depth: int) -> None:
    net = random_unet(2, 3, 4, depth=depth, base=4, seed=depth)
    image = rng.normal(size=(3, 101, 77)).astype(np.float32)
    ref = whole_volume_logits(net, image, [()])
    q = shapes.lattice(depth)
    for tile in (q + 4, 2 * q + 7, 60):
        got = predict_logits(net, image, tile_size=tile, batch_size=2)
        assert np.abs(got - ref).max() <= 1e-4, tile


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="this CPU has no native bf16")
@pytest.mark.parametrize("dims", [2, 3])
def test_bf16_precision_stays_close_to_float32_logits(rng: np.random.Generator, dims: int) -> None:
    net = random_unet(dims, 2, 3, depth=2, base=8, seed=5)
    image = rng.normal(size=(2, *[40] * dims)).astype(np.float32)
    ref = whole_volume_logits(net, image, [()])
    fp32 = predict_logits(net, image, tile_size=20, prepare=True, precision="float32")
    bf16 = predict_logits(net, image, tile_size=20, prepare=True, precision="bf16")
    scale = np.abs(ref).max()
    assert np.abs(fp32 - ref).max() <= 1e-4 * scale
    err = np.abs(bf16 - ref).max()
    assert 1e-4 * scale < err <= 0.05 * scale  # bf16 really ran, and stayed within its eps
    top = np.sort(ref, axis=0)
    clear = top[-1] - top[-2] > 0.1 * scale
    assert clear.mean() > 0.5
    assert np.array_equal(bf16.argmax(0)[clear], ref.argmax(0)[clear])


def test_unknown_precision_and_missing_bf16_are_refused(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = random_unet(2, 1, 2, depth=1, base=2)
    image = rng.normal(size=(1, 20, 20)).astype(np.float32)
    with pytest.raises(ModelError, match="--precision 'fp8'"):
        predict_logits(net, image, precision="fp8")
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    with pytest.raises(ModelError, match="no native bf16.*--precision float32"):
        predict_logits(net, image, precision="bf16")


def test_tiled_with_flip_tta_equals_whole_with_flip_tta(rng: np.random.Generator) -> None:
    net = random_unet(3, 1, 2, depth=2, base=2, seed=3)
    image = rng.normal(size=(1, 31, 26, 19)).astype(np.float32)
    flips = [s for r in range(4) for s in itertools.combinations(range(3), r)]
    ref = whole_volume_logits(net, image, flips)
    plain = whole_volume_logits(net, image, [()])
    assert np.abs(ref - plain).max() > 1e-2  # mirroring really changes a random network
    for tile in (8, 16):
        got = predict_logits(net, image, tile_size=tile, tta="flip")
        assert np.abs(got - ref).max() <= 1e-4
    net2 = random_unet(2, 1, 2, depth=3, base=2, seed=4)
    img2 = rng.normal(size=(1, 45, 38)).astype(np.float32)
    ref2 = whole_volume_logits(net2, img2, [(), (1,)])
    got2 = predict_logits(net2, img2, tile_size=12, tta=[1])
    assert np.abs(got2 - ref2).max() <= 1e-4


@pytest.mark.parametrize("dims,depth", [(2, 1), (2, 4), (3, 2), (3, 3)])
def test_centre_crop_model_reproduces_input_bit_for_bit(
    rng: np.random.Generator, dims: int, depth: int
) -> None:
    shape = (2, 67, 91, 53)[: dims + 1] if dims == 3 else (2, 67, 91)
    image = rng.normal(size=shape).astype(np.float32)
    model = CentreCrop(dims, 2, depth)
    q = shapes.lattice(depth)
    for tile in (q + 4, 3 * q + 4, 1000):
        assert np.array_equal(predict_logits(model, image, tile_size=tile), image)


def test_flip_tta_of_mirror_symmetric_model_is_identity(rng: np.random.Generator) -> None:
    # integer values: the average of 8 equal numbers is then exact in float32
    image = rng.integers(-50, 50, size=(1, 23, 30, 17)).astype(np.float32)
    model = CentreCrop(3, 1, 2)
    assert np.array_equal(predict_logits(model, image, tile_size=8, tta="flip"), image)


def test_memory_budget_drives_tile_count_not_result(rng: np.random.Generator) -> None:
    net = random_unet(3, 1, 2, depth=2, base=2, seed=5)
    image = rng.normal(size=(1, 40, 37, 30)).astype(np.float32)
    small = tile_layout(net, image.shape[1:], max_memory=2 << 20)
    large = tile_layout(net, image.shape[1:], max_memory=1 << 34)
    assert len(small.tiles) > 1 and len(large.tiles) == 1
    a = predict_logits(net, image, max_memory=2 << 20)
    b = predict_logits(net, image, max_memory=1 << 34)
    assert np.abs(a - b).max() <= 1e-4


def test_progress_counts_every_tile_once(rng: np.random.Generator) -> None:
    image = rng.normal(size=(1, 40, 30)).astype(np.float32)
    model = CentreCrop(2, 1, 2)
    calls: list[tuple[int, int]] = []
    predict_logits(
        model, image, tile_size=8, batch_size=3, progress=lambda d, t: calls.append((d, t))
    )
    n = len(tile_layout(model, (40, 30), tile_size=8).tiles)
    assert calls[-1] == (n, n) and all(t == n for _, t in calls)


def test_wrong_channel_count_is_one_line_error(rng: np.random.Generator) -> None:
    net = random_unet(2, 2, 2, depth=1, base=2)
    with pytest.raises(ModelError, match="channels"):
        predict_logits(net, rng.normal(size=(3, 20, 20)).astype(np.float32))


def test_inference_model_runs_lean_forward_and_stays_tiling_exact(
    rng: np.random.Generator,
) -> None:
    net = random_unet(3, 1, 2, depth=2, base=4, seed=7)
    fast = inference_model(net)
    assert getattr(fast, "lean", False) and not net.lean
    image = rng.normal(size=(1, 47, 60, 38)).astype(np.float32)
    ref = whole_volume_logits(net, image, [()])
    got = predict_logits(net, image, tile_size=20, prepare=True)
    assert np.abs(got - ref).max() <= 1e-4
    budget = 8 << 20
    plain = tile_layout(net, (300, 300, 300), max_memory=budget)
    lean = tile_layout(fast, (300, 300, 300), max_memory=budget)
    assert lean.lean and not plain.lean
    assert math.prod(lean.size) > math.prod(plain.size)


def test_tile_layout_names_the_forward_and_run_tiles_runs_it(rng: np.random.Generator) -> None:
    """The lean forward only where it buys fewer tiles; the layout says so and leaves the
    model as it was, and ``run_tiles`` runs the forward the layout names (the plain forward
    pools once per level and pass, the lean one once per slab)."""
    net = random_unet(3, 1, 2, depth=2, base=4, seed=7)
    fast = inference_model(net)
    small = tile_layout(fast, (20, 24, 20), max_memory=1 << 30)
    large = tile_layout(fast, (300, 300, 300), max_memory=8 << 20)
    assert not small.lean and large.lean
    assert fast.lean  # tile_layout decides per layout; the copy keeps its capability
    pools: list[int] = []
    hook = fast.pool.register_forward_hook(lambda _m, _a, _y: pools.append(1))
    image = rng.normal(size=(1, 20, 24, 20)).astype(np.float32)
    for lean, calls in ((False, lambda n: n == 2), (True, lambda n: n > 2)):
        layout = TileLayout(small.size, small.tiles[:1], 1, lean)
        pools.clear()
        run_tiles(fast, image, layout, lambda _t, _o: None, prepare=False)
        assert calls(len(pools)), (lean, len(pools))
    hook.remove()


# -- settings refused before any case is read ---------------------------------------------------
def _smallest_output_on_the_lattice(net: torch.nn.Module, depth: int) -> int:
    """Independent of medseg.model.shapes: run the network on every input size up to 60 and
    keep the smallest output size it produces that spans one tile lattice step (2^depth)."""
    outputs = set()
    with torch.no_grad():
        for n in range(1, 60):
            try:
                outputs.add(int(net(torch.zeros(1, 1, n, n)).shape[-1]))
            except Exception:  # noqa: BLE001, S112 - sizes the network cannot take
                continue
    return min(o for o in outputs if o >= 2**depth)


def test_tile_size_below_the_networks_smallest_tile_is_refused_naming_the_minimum() -> None:
    net = random_unet(2, 1, 2, depth=2, base=2)
    floor = _smallest_output_on_the_lattice(net, 2)
    with pytest.raises(ModelError, match=rf"--tile-size {floor - 1}: .*give at least {floor}$"):
        check_tiling(net, 2, floor - 1, None)
    with pytest.raises(ModelError, match="needs 1 or 2 sizes"):
        check_tiling(net, 2, (floor, floor, floor), None)
    check_tiling(net, 2, floor, None)  # the smallest tile itself is fine
    check_tiling(net, 2, (floor, 5 * floor), None)


def test_memory_budget_below_one_smallest_tile_is_refused_naming_the_minimum() -> None:
    net = random_unet(2, 1, 2, depth=2, base=2)
    with pytest.raises(ModelError, match=r"--max-memory 10240 bytes: .*give at least (\d+)M") as e:
        check_tiling(net, 2, None, 10 * 1024)
    minimum = int(str(e.value).rsplit(" ", 1)[-1].rstrip("M"))
    check_tiling(net, 2, None, minimum * 2**20)  # what the message asks for is accepted
    check_tiling(net, 2, None, None)  # no budget given: the default is not checked here
