"""Overlap-tile geometry (Ronneberger et al. 2015, Fig. 2), numpy only.

The output volume is partitioned into tiles. Tile origins lie on the ``2**depth`` lattice so
that every pooling sees the same voxel pairs as in a whole-volume forward pass; each tile's
network input is its output box grown by the margin, read from the scan mirrored (reflect,
without repeating the edge voxel) wherever it leaves the scan. Every output voxel is written by
exactly one tile. Because all valid output sizes of a network are congruent modulo
``2**depth``, mirrored tiles (test-time augmentation) stay aligned as well.

Sizes are voxels; shapes are the spatial axes of the network input (``(I, J)`` or
``(I, J, K)``), arrays are ``(C, *spatial)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np

from medseg.model import shapes
from medseg.volume import Box

#: Safety factor on the activation estimate: convolution work buffers and allocator slack.
MEMORY_SAFETY = 1.1
#: Channel counts are rounded up to this: oneDNN's blocked layouts pad channels to 16 (measured:
#: a depth-4 3D U-Net of base width 2 peaks at 5.4x its unpadded activation count, base 8 at 2.1x).
CHANNEL_BLOCK = 16
#: Safety factor in channels-last memory format, where oneDNN does not pad channels. Measured
#: in ``medseg infer`` (peak RSS growth over the tile phase / unpadded activation estimate,
#: depth 4, base width 2, tiles 68^3 and 180x180x164): 1.80 and 1.75; at base 8, 1.01. The
#: tile input buffer and oneDNN's working copies of 1- and 2-channel tensors weigh most in
#: narrow networks; the larger factor keeps ``--max-memory`` honoured for them.
CHANNELS_LAST_SAFETY = 1.8


@dataclass(frozen=True)
class Tile:
    """One network evaluation: output box ``[origin, origin + size)`` and the sub-box
    ``write`` of it that this tile owns in the result (volume voxel coordinates)."""

    origin: tuple[int, ...]
    size: tuple[int, ...]
    write: Box

    def output_box(self) -> Box:
        return Box(self.origin, tuple(o + s for o, s in zip(self.origin, self.size, strict=True)))

    def input_box(self, margin: int) -> Box:
        """The network input: the output box grown by ``margin``; may leave the volume."""
        return self.output_box().grow(margin)

    def local_write(self) -> tuple[slice, ...]:
        """Slices of the tile's network output that land in ``write``."""
        return tuple(
            slice(a - o, b - o)
            for a, b, o in zip(self.write.start, self.write.stop, self.origin, strict=True)
        )


def axis_tiles(n: int, size: int, step: int) -> list[tuple[int, int, int]]:
    """``(origin, write_start, write_stop)`` along one axis of length ``n``.

    Tiles of output ``size`` own consecutive runs of ``floor(size / step) * step`` voxels with
    origins on multiples of ``step``; a tile that would run past the end is moved back (to the
    lattice point at or after ``n - size``) so that little is computed outside the volume.
    """
    if size >= n:
        return [(0, 0, n)]
    stride = (size // step) * step
    if stride < 1:
        raise ValueError(f"tile size {size} is smaller than the lattice step {step}")
    out = []
    for start in range(0, n, stride):
        origin = start
        if start + size > n:
            origin = max(0, -((size - n) // step) * step)  # ceil((n - size) / step) * step
        out.append((origin, start, min(start + stride, n)))
    return out


def plan_tiles(shape: Sequence[int], size: Sequence[int], step: int) -> list[Tile]:
    """Tiles of output ``size`` (per axis) covering ``shape`` once, origins on ``step``."""
    per_axis = [axis_tiles(int(n), int(s), step) for n, s in zip(shape, size, strict=True)]
    tiles = []
    for combo in itertools.product(*per_axis):
        tiles.append(
            Tile(
                origin=tuple(c[0] for c in combo),
                size=tuple(int(s) for s in size),
                write=Box(tuple(c[1] for c in combo), tuple(c[2] for c in combo)),
            )
        )
    return tiles


def reflect_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Indices ``start..stop-1`` folded into ``[0, n)`` by mirroring at the edge voxels
    (numpy's ``"reflect"``: ``-1 -> 1``, ``n -> n - 2``), repeated as often as needed."""
    idx = np.arange(start, stop)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx < n, idx, period - idx)


class TileSource(Protocol):
    """An image whose network input is computed box by box: ``raw`` ``(C, *spatial)`` holds
    stored values and ``convert`` maps a gathered block of them to the input (e.g.
    ``medseg.preprocess.pipeline.LazyImage``: normalisation of an int16 scan per tile)."""

    @property
    def raw(self) -> np.ndarray: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def ndim(self) -> int: ...

    def convert(self, block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray: ...


def extract(image: np.ndarray | TileSource, box: Box, out: np.ndarray | None = None) -> np.ndarray:
    """``image[:, box]`` for a ``(C, *spatial)`` array, mirrored where ``box`` leaves it.

    Written into ``out`` (shape ``(C, *box.shape)``) when given, so a batch buffer is filled
    without an intermediate copy; the mirrored parts are gathered per axis, never by padding
    the whole image. A :class:`TileSource` gathers its ``raw`` block, then converts it.
    """
    if not isinstance(image, np.ndarray) and hasattr(image, "convert"):
        return image.convert(extract(image.raw, box), out)
    # anything indexable like an array (an ndarray, a memmap, a reader) is gathered as is
    image = cast(np.ndarray, image)
    spatial = image.shape[1:]
    if out is None:
        out = np.empty((image.shape[0], *box.shape), dtype=image.dtype)
    if Box.from_shape(tuple(spatial)).contains(box):
        out[...] = image[(slice(None), *box.slices())]
        return out
    index = [reflect_indices(a, b, n) for a, b, n in zip(box.start, box.stop, spatial, strict=True)]
    # slice the inside hull first so that fancy indexing only touches the needed voxels
    lo = [int(i.min()) for i in index]
    hi = [int(i.max()) + 1 for i in index]
    sub = image[(slice(None), *(slice(a, b) for a, b in zip(lo, hi, strict=True)))]
    grids = np.ix_(np.arange(image.shape[0]), *(i - a for i, a in zip(index, lo, strict=True)))
    out[...] = sub[grids]
    return out


def clamp_tile_size(
    shape: Sequence[int], size: int | Sequence[int], depth: int, convs_per_level: int = 2
) -> tuple[int, ...]:
    """A requested output tile size made valid: per axis the largest valid size not above
    the request (at least one lattice step), and no larger than needed to cover the axis."""
    req = [int(size)] * len(shape) if isinstance(size, int) else [int(s) for s in size]
    if len(req) != len(shape):
        raise ValueError(f"tile size {tuple(req)} must have {len(shape)} entries")
    floor = shapes.valid_output_size(shapes.lattice(depth), depth, convs_per_level, "ge")
    out = []
    for n, r in zip(shape, req, strict=True):
        cover = shapes.valid_output_size(int(n), depth, convs_per_level, "ge")
        r = max(r, floor)
        out.append(min(shapes.valid_output_size(r, depth, convs_per_level, "le"), cover))
    return tuple(out)


def tile_bytes(
    size: Sequence[int],
    network: dict,
    bytes_per_value: int = 4,
    *,
    channels_last: bool = False,
    lean: bool = False,
) -> int:
    """Estimated peak memory (bytes) of one tile of output ``size``: its forward pass, plus
    the logits handed to the sink (the network output and its classes-first copy, float32)
    and their int64 argmax, which live alongside the last activations.

    Blocked layouts (default) pad channels to :data:`CHANNEL_BLOCK`; channels-last does not.
    ``lean`` estimates the slab-wise inference forward
    (:func:`medseg.model.shapes.lean_peak_activation_elements`), which
    ``medseg.inference.tiled.inference_model`` copies run, instead of the plain forward, plus two
    float32 copies of the tile input (batch buffer, mirrored gather or channels-last copy).
    """
    safety, block = (CHANNELS_LAST_SAFETY, 1) if channels_last else (MEMORY_SAFETY, CHANNEL_BLOCK)
    out_vox = int(np.prod([int(s) for s in size]))
    logits = out_vox * (2 * 4 * int(network["out_channels"]) + 8)
    if lean:
        # the lean forward is small enough that the tile's input buffers matter: the batch
        # buffer and the mirrored gather / channels-last copy (the activations count the
        # input the forward sees once)
        m = shapes.margin(int(network["depth"]), int(network.get("convs_per_level", 2)))
        in_vox = int(np.prod([int(s) + 2 * m for s in size]))
        logits += 2 * 4 * in_vox * int(network["in_channels"])
    activations = shapes.lean_peak_activation_elements if lean else shapes.peak_activation_elements
    return logits + int(
        safety
        * bytes_per_value
        * activations(tuple(int(s) for s in size), **network, channel_block=block)
    )


def choose_tile_size(
    shape: Sequence[int],
    network: dict,
    budget_bytes: int,
    bytes_per_value: int = 4,
    *,
    channels_last: bool = False,
    lean: bool = False,
) -> tuple[int, ...]:
    """Largest cubic-as-possible valid output tile whose forward pass fits ``budget_bytes``.

    Each axis is capped at the size that covers it in one tile; below the smallest tile
    (one lattice step) the smallest tile is returned even if it exceeds the budget.
    """
    depth = int(network["depth"])
    convs = int(network.get("convs_per_level", 2))
    step = shapes.lattice(depth)
    caps = [shapes.valid_output_size(int(n), depth, convs, "ge") for n in shape]
    t = shapes.valid_output_size(step, depth, convs, "ge")
    best = tuple(min(t, c) for c in caps)
    while t < max(caps):
        t = shapes.valid_output_size(t + 1, depth, convs, "ge")
        cand = tuple(min(t, c) for c in caps)
        need = tile_bytes(cand, network, bytes_per_value, channels_last=channels_last, lean=lean)
        if need > budget_bytes:
            break
        best = cand
    return best


def balance_tile_size(
    shape: Sequence[int], size: Sequence[int], depth: int, convs_per_level: int = 2
) -> tuple[int, ...]:
    """Per axis the smallest valid tile that needs no more tiles than ``size`` does.

    A 192-voxel axis under a 180-voxel tile needs two tiles either way, but two tiles of 100
    compute far fewer margin voxels than two of 180 (each tile also pays ``2 * margin``).
    """
    step = shapes.lattice(depth)
    out = []
    for n, t in zip(shape, size, strict=True):
        count = len(axis_tiles(int(n), int(t), step))
        best = cand = int(t)
        while cand > step:
            try:
                cand = shapes.valid_output_size(cand - 1, depth, convs_per_level, "le")
            except ValueError:  # below the smallest valid size
                break
            if cand < step or len(axis_tiles(int(n), cand, step)) > count:
                break
            best = cand
        out.append(best)
    return tuple(out)


def choose_batch_size(
    size: Sequence[int],
    network: dict,
    budget_bytes: int,
    n_tiles: int,
    max_batch: int = 8,
    bytes_per_value: int = 4,
    *,
    channels_last: bool = False,
    lean: bool = False,
) -> int:
    """How many tiles of output ``size`` to run at once within ``budget_bytes`` (>= 1)."""
    per = max(1, tile_bytes(size, network, bytes_per_value, channels_last=channels_last, lean=lean))
    return int(max(1, min(max_batch, n_tiles, budget_bytes // per)))
