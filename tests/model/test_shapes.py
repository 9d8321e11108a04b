"""Shape arithmetic of the valid U-Net, checked exhaustively against the real network."""

from __future__ import annotations

import pytest
import torch

from medseg.model import UNet, shapes


def _network_output(net: UNet, size: int, other: int) -> int | None:
    """Output size along axis 0 for input ``size``, or None when the network rejects it:
    a forward that fails, or a pooling that sees an odd size (silently dropping a voxel)."""
    odd: list[tuple[int, ...]] = []
    hook = net.pool.register_forward_pre_hook(
        lambda _m, args: odd.extend(s for s in [tuple(args[0].shape[2:])] if any(v % 2 for v in s))
    )
    try:
        with torch.no_grad():
            # the meta device runs the real modules' shape logic without any arithmetic
            y = net(torch.zeros(1, 1, size, other, device="meta"))
    except RuntimeError:
        return None
    finally:
        hook.remove()
    if odd or min(y.shape[2:]) < 1:
        return None
    return int(y.shape[2])


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("convs", [1, 2, 3])
def test_shape_rules_match_network_for_every_size(depth: int, convs: int) -> None:
    net = UNet(2, 1, 1, depth=depth, base_channels=1, convs_per_level=convs, norm="none")
    net = net.to("meta").eval()
    m = shapes.margin(depth, convs)
    other = shapes.input_size(shapes.min_output_size(depth, convs), depth, convs)
    assert _network_output(net, other, other) == shapes.min_output_size(depth, convs)
    hi = 2 * m + 3 * (1 << depth) + 8
    n_valid = 0
    for size in range(1, hi):
        got = _network_output(net, size, other)
        assert shapes.is_valid_input(size, depth, convs) == (got is not None), size
        if got is None:
            with pytest.raises(ValueError):
                shapes.output_size(size, depth, convs)
            continue
        n_valid += 1
        assert shapes.output_size(size, depth, convs) == got == size - 2 * m
        assert shapes.input_size(got, depth, convs) == size
        assert net.output_shape((size, other))[0] == got
    assert n_valid >= 2


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("convs", [1, 2, 3])
def test_valid_output_size_is_nearest_valid(depth: int, convs: int) -> None:
    valid = [s for s in range(1, 200) if shapes.is_valid_output(s, depth, convs)]
    q = shapes.lattice(depth)
    # all valid outputs are congruent modulo 2**depth (what keeps mirrored tiles aligned)
    assert len({v % q for v in valid}) == 1
    for n in range(1, 150):
        ge = shapes.valid_output_size(n, depth, convs, "ge")
        assert ge == min(v for v in valid if v >= n)
        below = [v for v in valid if v <= n]
        if below:
            assert shapes.valid_output_size(n, depth, convs, "le") == max(below)
        else:
            with pytest.raises(ValueError):
                shapes.valid_output_size(n, depth, convs, "le")
        vi = shapes.valid_input_size(n + 2 * shapes.margin(depth, convs), depth, convs)
        assert shapes.output_size(vi, depth, convs) == ge


def test_paper_margin_and_sizes() -> None:
    # Ronneberger et al. 2015, Fig. 1: 572 -> 388, bottom 32 -> 28
    assert shapes.margin(4) == 92
    assert shapes.output_size(572, 4) == 388
    assert shapes.input_size(388, 4) == 572
    t = shapes.trace(572, 4)
    assert t.encoder == (568, 280, 136, 64)
    assert t.bottom == 28
    assert t.decoder == (52, 100, 196, 388)


def test_input_size_rejects_unreachable_output() -> None:
    with pytest.raises(ValueError):
        shapes.input_size(387, 4)


def test_peak_activation_counts_at_least_largest_layer_output() -> None:
    """The estimate covers the biggest tensor the real network creates plus its input."""
    net = UNet(3, 2, 3, depth=2, base_channels=4, norm="none").eval()
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda _m, _a, y: sizes.append(y.numel()))
        for m in net.modules()
        if not list(m.children())
    ]
    with torch.no_grad():
        net(torch.zeros(1, 2, *(shapes.input_size(12, 2),) * 3))
    for h in hooks:
        h.remove()
    est = shapes.peak_activation_elements((12, 12, 12), **net.network)
    assert est >= max(sizes) + 2 * 12**3
    assert est <= 4 * sum(sizes)


@pytest.mark.parametrize("depth,convs", [(1, 2), (2, 1), (3, 2)])
def test_skip_crops_match_the_crops_of_the_network(depth: int, convs: int) -> None:
    with torch.device("meta"):
        net = UNet(3, 1, 2, depth=depth, base_channels=2, convs_per_level=convs)
    enc: list[tuple[int, ...]] = []
    ups: list[tuple[int, ...]] = []
    for block in net.down:
        block.register_forward_hook(lambda _m, _a, y: enc.append(tuple(y.shape[2:])))
    for up in net.up:
        up.register_forward_hook(lambda _m, _a, y: ups.append(tuple(y.shape[2:])))
    size = tuple(
        shapes.input_size(shapes.valid_output_size(o, depth, convs), depth, convs)
        for o in (3, 11, 6)
    )
    with torch.device("meta"):
        net(torch.empty(1, 1, *size))
    crops = shapes.skip_crops(size, depth, convs)
    for level, crop in enumerate(crops):
        up = ups[depth - 1 - level]
        assert crop.size == up
        assert crop.offset == tuple((e - u) // 2 for e, u in zip(enc[level], up, strict=True))


@pytest.mark.parametrize("rows", [2, 4, 16, 18, 40, 184, 230])
@pytest.mark.parametrize("cap", [1, 2, 5, 16])
def test_slab_bounds_cover_rows_with_even_bounds_within_cap(rows: int, cap: int) -> None:
    bounds = shapes.slab_bounds(rows, cap)
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(b0[1] == b1[0] for b0, b1 in zip(bounds[:-1], bounds[1:], strict=True))
    assert all(a % 2 == 0 and b % 2 == 0 and a < b for a, b in bounds)
    limit = max(2, cap // 2 * 2)
    assert max(b - a for a, b in bounds) <= limit
    assert len(bounds) == -(-rows // limit)


def test_lean_peak_is_far_below_plain_peak_for_large_3d_tiles() -> None:
    net = {"depth": 4, "in_channels": 1, "out_channels": 5, "base_channels": 8}
    for out in (4, 52, 100):
        plain = shapes.peak_activation_elements((out,) * 3, **net)
        lean = shapes.lean_peak_activation_elements((out,) * 3, **net, slab_rows=16)
        assert lean == shapes.lean_peak_activation_elements((out,) * 3, **net)
        # at least the tile input (held throughout) and the pooled level-0 map
        top = out + 2 * shapes.margin(4)
        assert lean >= top**3 + ((top - 4) // 2) ** 3 * 8
        assert lean < 0.25 * plain
