"""The tiled forward pass: cut an image into overlap tiles, run the network over each, hand
every tile's float32 logits to a sink.

``tile_layout`` decides tile size, batch size, plain or lean forward, and whether a kept heap
pays for itself; ``run_tiles`` runs the tiles; ``predict_logits`` returns the logits of a whole
image. Images are ``(C, I, J)`` for 2D and ``(C, I, J, K)`` for 3D networks. Nothing here
changes process-wide state: whether freed memory stays in the heap while tiles run is the
caller's choice (the command line's, :mod:`medseg.heap`), made with the layout's ``keep_heap``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg import tiling
from medseg.errors import ModelError
from medseg.heap import KEEP_OVERHEAD, KEEP_SPEEDUP
from medseg.model import shapes
from medseg.runtime import check_precision, default_memory_budget, kept_heap_pays

Progress = Callable[[int, int], None]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the CPU for a model without any)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _tile_budget(budget: int, device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(budget, 0.8 * free))
    return budget


def _flip_sets(tta: str | Sequence[int] | None, dims: int) -> list[tuple[int, ...]]:
    """Spatial axes to mirror for each test-time augmentation pass (``()`` = unmirrored)."""
    if tta is None or tta == "none":
        return [()]
    if tta == "flip":
        axes: tuple[int, ...] = tuple(range(dims))
    elif isinstance(tta, str):
        raise ModelError(f"--tta {tta!r}: expected 'none' or 'flip'")
    else:
        axes = tuple(int(a) for a in tta)
        if any(not 0 <= a < dims for a in axes):
            raise ModelError(f"tta axes {axes} must be spatial axes 0..{dims - 1}")
    return [s for r in range(len(axes) + 1) for s in itertools.combinations(axes, r)]


# ---------------------------------------------------------------------------------------------
# overlap-tile prediction
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileLayout:
    """How an image is cut: output tile size, the tiles, how many run per batch, whether
    they run through the memory-lean forward (:meth:`medseg.model.unet.UNet.forward_lean`),
    and whether keeping freed activations in the process heap while they run pays
    (``keep_heap``): the tiles were planned for it. Applying it is the caller's (the command
    line wraps the tiles of a case in :func:`medseg.heap.kept_freed_memory`)."""

    size: tuple[int, ...]
    tiles: list[tiling.Tile]
    batch_size: int
    lean: bool = False
    keep_heap: bool = False


def tile_layout(
    model: nn.Module,
    spatial_shape: Sequence[int],
    *,
    tile_size: int | Sequence[int] | None = None,
    max_memory: int | None = None,
    batch_size: int | None = None,
    keep_heap: bool | None = None,
) -> TileLayout:
    """Tiles for an image of ``spatial_shape``: forced ``tile_size`` (output side, made valid)
    or the largest that fits ``max_memory`` bytes (default: half the available memory), then
    shrunk per axis to the smallest size needing no more tiles (fewer margin voxels).

    A model with ``lean`` set (the :func:`inference_model` copy) may run its tiles through the
    lean forward; the layout says whether it does (``lean``), and the memory estimate follows
    the forward it names. With ``keep_heap`` (default: where
    :func:`medseg.runtime.kept_heap_pays` measured it faster) a CPU layout is planned for
    freed activations kept in the heap (:mod:`medseg.heap`): within the budget divided by
    :data:`medseg.heap.KEEP_OVERHEAD`, where that computes at most
    :data:`medseg.heap.KEEP_SPEEDUP` times the input voxels of the layout the whole budget
    gets; a tight budget gets more of its memory for tiles instead. The layout's
    ``keep_heap`` says which was chosen."""
    device = model_device(model)
    budget = _tile_budget(default_memory_budget() if max_memory is None else max_memory, device)
    layout = _layout_within(model, spatial_shape, tile_size, budget, batch_size)
    if keep_heap is None:
        keep_heap = kept_heap_pays(device)
    if device.type != "cpu" or not keep_heap:
        return layout
    kept = _layout_within(model, spatial_shape, tile_size, int(budget / KEEP_OVERHEAD), batch_size)
    network: dict[str, Any] = model.network  # type: ignore[assignment]
    need = kept.batch_size * tiling.tile_bytes(
        kept.size, network, channels_last=default_channels_last(model), lean=kept.lean
    )
    fits = need * KEEP_OVERHEAD <= budget
    if fits and computed_voxels(kept, network) <= KEEP_SPEEDUP * computed_voxels(layout, network):
        return replace(kept, keep_heap=True)
    return layout


def smallest_tile(network: dict[str, Any]) -> int:
    """The smallest output tile side (voxels) ``network`` computes: one step of the
    ``2^depth`` lattice tiles sit on, made valid (:func:`medseg.tiling.clamp_tile_size`'s floor)."""
    depth = int(network["depth"])
    convs = int(network.get("convs_per_level", 2))
    return shapes.valid_output_size(shapes.lattice(depth), depth, convs, "ge")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def check_tiling(
    model: nn.Module, dims: int, tile_size: int | Sequence[int] | None, max_memory: int | None
) -> None:
    """Refuse, before any case is read, a ``--tile-size`` below the network's smallest tile
    (or with the wrong number of axes) and a ``--max-memory`` that cannot hold its smallest tile:
    either would only make a job run for hours on the smallest tiles."""
    network: dict[str, Any] = model.network  # type: ignore[assignment]
    floor = smallest_tile(network)
    size = (floor,) * dims
    if tile_size is not None:
        req = (int(tile_size),) * dims if isinstance(tile_size, int) else tuple(tile_size)
        shown = str(tile_size) if isinstance(tile_size, int) else ",".join(map(str, req))
        if len(req) != dims:
            raise ModelError(
                f"--tile-size {shown}: this {dims}D network needs 1 or {dims} sizes, e.g. "
                f"{','.join([str(floor * 4)] * dims)}"
            )
        if min(req) < floor:
            raise ModelError(
                f"--tile-size {shown}: below the smallest tile this network computes ({floor} "
                f"voxels per axis, depth {network['depth']}); give at least {floor}"
            )
    if max_memory is not None:
        cl = default_channels_last(model)
        need = min(
            tiling.tile_bytes(size, network, channels_last=cl, lean=lean)
            for lean in (False, bool(getattr(model, "lean", False)))
        )
        if max_memory < need:
            raise ModelError(
                f"--max-memory {_size(max_memory)}: the smallest tile of this network "
                f"({'x'.join(map(str, size))} voxels) needs {_size(need)}; give at least "
                f"{math.ceil(need / 2**20)}M"
            )


def computed_voxels(layout: TileLayout, network: dict[str, Any]) -> int:
    """Input voxels the network runs over for ``layout``: tiles times tile input size."""
    margin = shapes.margin(int(network["depth"]), int(network.get("convs_per_level", 2)))
    return len(layout.tiles) * math.prod(s + 2 * margin for s in layout.size)


def _layout_within(
    model: nn.Module,
    spatial_shape: Sequence[int],
    tile_size: int | Sequence[int] | None,
    budget: int,
    batch_size: int | None,
) -> TileLayout:
    """:func:`tile_layout` for a budget of ``budget`` bytes of tiles, glibc's heap aside."""
    network: dict[str, Any] = model.network  # type: ignore[assignment]
    depth = int(network["depth"])
    convs = int(network.get("convs_per_level", 2))
    cl = default_channels_last(model)
    lean = bool(getattr(model, "lean", False))
    step = 1 << depth
    if tile_size is not None:
        size = tiling.clamp_tile_size(spatial_shape, tile_size, depth, convs)
        tiles = tiling.plan_tiles(spatial_shape, size, step)
    else:
        largest = tiling.choose_tile_size(
            spatial_shape, network, budget, channels_last=cl, lean=lean
        )
        size = tiling.balance_tile_size(spatial_shape, largest, depth, convs)
        tiles = tiling.plan_tiles(spatial_shape, size, step)
        if lean:
            # the lean forward is slower per voxel (measured 1.25x on one 196^3 tile): use it
            # only where its smaller memory buys fewer tiles than the plain forward gets
            plain = tiling.balance_tile_size(
                spatial_shape,
                tiling.choose_tile_size(spatial_shape, network, budget, channels_last=cl),
                depth,
                convs,
            )
            plain_tiles = tiling.plan_tiles(spatial_shape, plain, step)
            if len(plain_tiles) <= len(tiles):
                size, tiles, lean = plain, plain_tiles, False
    if batch_size is None:
        batch_size = tiling.choose_batch_size(
            size, network, budget, len(tiles), channels_last=cl, lean=lean
        )
    return TileLayout(size, tiles, max(1, int(batch_size)), lean)


def _autocast(
    device: torch.device, precision: str = "auto"
) -> contextlib.AbstractContextManager[Any]:
    """The autocast context tiles run under (``precision`` as in :func:`check_precision`)."""
    if precision == "float32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


Sink = Callable[[tiling.Tile, np.ndarray], None]


def default_channels_last(model: nn.Module) -> bool:
    """Channels-last (``torch.channels_last_3d``) for 3D U-Nets on the CPU: oneDNN runs its
    convolutions without padding channels to blocks of 8/16 and without layout conversions
    around every batch-norm/ReLU/pooling (measured on a depth-4 base-8 3D U-Net, 2 threads:
    1.6x faster per tile)."""
    from medseg.model import UNet

    return isinstance(model, UNet) and model.spatial_dims == 3 and model_device(model).type == "cpu"


def inference_model(model: nn.Module, *, channels_last: bool | None = None) -> nn.Module:
    """The network as tiles run it: for a :class:`medseg.model.UNet` in eval mode a copy with
    batch norm folded into the convolutions (:func:`medseg.model.unet.fold_batch_norm`), in
    channels-last memory format when ``channels_last`` (default: :func:`default_channels_last`),
    marked ``lean``: :func:`tile_layout` may then run its tiles through
    :meth:`medseg.model.unet.UNet.forward_lean` (same results, a fraction of the tile memory).
    Other modules, and models in training mode, are returned as they are."""
    from medseg.model import UNet
    from medseg.model.unet import channels_last_format, fold_batch_norm

    if not isinstance(model, UNet) or model.training:
        return model
    if channels_last is None:
        channels_last = default_channels_last(model)
    fast = fold_batch_norm(model)
    if channels_last:
        fast = fast.to(memory_format=channels_last_format(model.spatial_dims))  # type: ignore[call-overload]
    fast.channels_last = channels_last  # type: ignore[assignment]
    fast.lean = True
    return fast


def _mirrored_forward(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    flips: list[tuple[int, ...]],
    device: torch.device,
    precision: str,
) -> torch.Tensor:
    """Float32 logits of batch ``x`` ``(N, C, *spatial)``, averaged over the mirrorings
    ``flips`` (spatial axes; ``()`` unmirrored), each mirrored back before it is added."""
    with torch.inference_mode(), _autocast(device, precision):
        acc: torch.Tensor | None = None
        for axes in flips:
            fd = [2 + a for a in axes]
            y = forward(torch.flip(x, fd) if fd else x)
            y = (torch.flip(y, fd) if fd else y).float()
            acc = y if acc is None else acc + y
        assert acc is not None
        return acc / len(flips) if len(flips) > 1 else acc


def run_tiles(
    model: nn.Module,
    image: np.ndarray | tiling.TileSource,
    layout: TileLayout,
    sink: Sink,
    *,
    tta: str | Sequence[int] | None = None,
    progress: Progress | None = None,
    done: int = 0,
    total: int | None = None,
    channels_last: bool | None = None,
    prepare: bool = True,
    precision: str = "auto",
) -> int:
    """Run every tile of ``layout`` over ``image`` ``(C, *spatial)`` (an array, or a
    :class:`medseg.tiling.TileSource` normalised per tile) and hand ``sink(tile, logits)`` the
    float32 logits ``(classes, *tile.write.shape)`` it owns.

    With ``prepare`` the model first goes through :func:`inference_model` (batch norm folded,
    channels-last on the CPU unless ``channels_last=False``); pass ``prepare=False`` with a
    model that already did. Tile inputs are mirrored straight into one reused batch buffer.
    Logits of mirrored passes (``tta``) are averaged in float32; under reduced ``precision``
    (:func:`check_precision`; "auto" is autocast on CUDA) the network's result is cast to
    float32 before averaging and stitching.
    Returns the number of tiles done (``done`` + this image's tiles) for the progress count.
    """
    from medseg.model.unet import channels_last_format

    if prepare:
        model = inference_model(model, channels_last=channels_last)
    cl = bool(getattr(model, "channels_last", False)) if channels_last is None else channels_last
    dims = image.ndim - 1
    margin = int(model.margin)  # type: ignore[arg-type]
    flips = _flip_sets(tta, dims)
    forward: Callable[[torch.Tensor], torch.Tensor] = (
        model.forward_lean if layout.lean else model  # type: ignore[assignment,operator]
    )
    device = model_device(model)
    total = len(layout.tiles) if total is None else total
    fmt = channels_last_format(dims)
    in_size = tuple(s + 2 * margin for s in layout.size)
    buf = np.empty(
        (min(layout.batch_size, len(layout.tiles)), image.shape[0], *in_size), np.float32
    )
    for b0 in range(0, len(layout.tiles), layout.batch_size):
        batch = layout.tiles[b0 : b0 + layout.batch_size]
        x = buf[: len(batch)]
        for t, slot in zip(batch, x, strict=True):
            tiling.extract(image, t.input_box(margin), out=slot)
        xt = torch.from_numpy(x).to(device)
        if cl:
            xt = xt.contiguous(memory_format=fmt)
        acc = _mirrored_forward(forward, xt, flips, device, precision)
        if tuple(acc.shape[2:]) != layout.size:
            raise ModelError(
                f"network output {tuple(acc.shape[2:])} differs from the planned tile "
                f"{layout.size}; plan.network does not describe this model"
            )
        # classes first in memory, so that the sink's argmax and copies stream
        out = acc.cpu().contiguous().numpy()
        for t, o in zip(batch, out, strict=True):
            sink(t, o[(slice(None), *t.local_write())])
        done += len(batch)
        if progress is not None:
            progress(done, total)
    return done


def predict_logits(
    model: nn.Module,
    image: np.ndarray,
    *,
    tile_size: int | Sequence[int] | None = None,
    tta: str | Sequence[int] | None = None,
    max_memory: int | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
    prepare: bool = False,
    precision: str = "auto",
) -> np.ndarray:
    """Float32 logits ``(classes, *spatial)`` for every voxel of ``image`` ``(C, *spatial)``.

    ``model`` is a :class:`medseg.model.UNet` (or any module with ``network``, ``margin`` and
    the same valid-convolution shape rule) in eval mode; the image is mirrored at its border
    inside. ``tile_size`` forces the output tile size (voxels, made valid); ``tta="flip"``
    averages the logits over all mirrorings of the spatial axes (or a sequence of axes).
    By default the model runs exactly as given, so the result equals its whole-volume forward
    pass to float32 rounding of the same arithmetic; ``prepare=True`` runs the faster
    :func:`inference_model` copy (batch norm folded, channels-last), whose different rounding
    can reach ~1e-6 of the logit magnitude. ``precision``: see :func:`check_precision`.
    """
    network: dict[str, Any] = model.network  # type: ignore[assignment]
    dims = int(network["spatial_dims"])
    if image.ndim != dims + 1:
        raise ModelError(
            f"image of shape {image.shape} does not fit a {dims}D model: expected (C, "
            f"{', '.join('IJK'[:dims])})"
        )
    if image.shape[0] != int(network["in_channels"]):
        raise ModelError(
            f"image has {image.shape[0]} channels, the model expects {network['in_channels']}"
        )
    if prepare:  # before the layout: the prepared copy needs less memory per tile
        model = inference_model(model)
    layout = tile_layout(
        model, image.shape[1:], tile_size=tile_size, max_memory=max_memory, batch_size=batch_size
    )
    out = np.empty((int(network["out_channels"]), *image.shape[1:]), dtype=np.float32)

    def sink(t: tiling.Tile, logits: np.ndarray) -> None:
        out[(slice(None), *t.write.slices())] = logits

    check_precision(precision, model_device(model))
    run_tiles(
        model, image, layout, sink, tta=tta, progress=progress, prepare=False, precision=precision
    )
    return out


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    """Numerically stable float32 softmax over the class axis."""
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32, copy=False)
