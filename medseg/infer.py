"""Inference: load a model folder, run exact overlap-tile prediction, write labels on the
scan's own grid.

``predict_logits`` runs a network over an image of any size by overlap-tile
(:mod:`medseg.tiling`) and returns float32 logits for every voxel; ``predict_case`` /
``infer_case`` add the plan's preprocessing, streaming argmax, restoration onto the original
grid, postprocessing and the data set's own label values. Images are ``(C, I, J)`` for 2D and
``(C, I, J, K)`` for 3D networks.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg import heap, tiling
from medseg.errors import CohortError, MedsegError, ModelError, PlanError, ReadError, WriteError
from medseg.io import split_suffix
from medseg.model import shapes
from medseg.preprocess.plan import Plan
from medseg.preprocess.restore import SparseProbabilities, class_changes, whole_indices
from medseg.resample import axis_map
from medseg.runtime import (  # noqa: F401  (re-exported for callers of medseg.infer)
    PRECISIONS,
    check_precision,
    default_memory_budget,
    native_bf16,
    parse_bytes,
    resolve_device,
)
from medseg.volume import Volume

#: Outputs larger than this fraction of the budget are kept in a memory-mapped temp file.
MEMMAP_FRACTION = 0.25
#: Resampled cases of models with at most this many classes take their labels from the
#: restored probabilities (see ``preprocess.pipeline.restore_resamples``), kept only near
#: class boundaries (``_BoundaryProbabilities``) and interpolated only there
#: (``resample.resample_argmax``). A 512x512x200 scan planned at 1 mm (358x358x500) with a
#: trivial network: 5 classes 7.3 s and 2.5-3.0 GiB vs 4.1 s and 2.9 GiB by nearest
#: neighbour (all probabilities on the plan grid: 8.9-9.8 s, 3.5 GiB); 20 classes 20 s and
#: 6.4 GiB vs 9.8 s and 6.5 GiB (all probabilities: 35 s, 9.5 GiB). The tile budget still
#: sets aside room for all probabilities, so models with more classes (whole-body atlases)
#: keep the nearest-neighbour restore until that reservation is sized to the boundary store.
PROBABILITY_RESTORE_MAX_CLASSES = 8

#: ``progress(done, total)``: tiles finished so far and the total for the case.
Progress = Callable[[int, int], None]


def _model_device(model: nn.Module) -> torch.device:
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
    and whether freed activations stay in the process heap while they run
    (:func:`medseg.heap.keep_freed_memory`)."""

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
) -> TileLayout:
    """Tiles for an image of ``spatial_shape``: forced ``tile_size`` (output side, made valid)
    or the largest that fits ``max_memory`` bytes (default: half the available memory), then
    shrunk per axis to the smallest size needing no more tiles (fewer margin voxels).

    A model with ``lean`` set (the :func:`inference_model` copy) may run its tiles through the
    lean forward; the layout says whether it does (``lean``), and the memory estimate follows
    the forward it names. On the CPU the layout keeps freed activations in the heap
    (``keep_heap``, :mod:`medseg.heap`): planned within the budget divided by
    :data:`medseg.heap.KEEP_OVERHEAD`, where that computes at most
    :data:`medseg.heap.KEEP_SPEEDUP` times the input voxels of the layout the whole budget
    gets; a tight budget gets more of its memory for tiles instead."""
    device = _model_device(model)
    budget = _tile_budget(default_memory_budget() if max_memory is None else max_memory, device)
    layout = _layout_within(model, spatial_shape, tile_size, budget, batch_size)
    if device.type != "cpu":
        return layout
    kept = _layout_within(
        model, spatial_shape, tile_size, int(budget / heap.KEEP_OVERHEAD), batch_size
    )
    network: dict[str, Any] = model.network  # type: ignore[assignment]
    need = kept.batch_size * tiling.tile_bytes(
        kept.size, network, channels_last=default_channels_last(model), lean=kept.lean
    )
    fits = need * heap.KEEP_OVERHEAD <= budget
    if fits and computed_voxels(kept, network) <= heap.KEEP_SPEEDUP * computed_voxels(
        layout, network
    ):
        return replace(kept, keep_heap=True)
    return layout


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

    return (
        isinstance(model, UNet) and model.spatial_dims == 3 and _model_device(model).type == "cpu"
    )


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
    device = _model_device(model)
    total = len(layout.tiles) if total is None else total
    fmt = channels_last_format(dims)
    in_size = tuple(s + 2 * margin for s in layout.size)
    buf = np.empty(
        (min(layout.batch_size, len(layout.tiles)), image.shape[0], *in_size), np.float32
    )
    # tiles repeat the same allocations: with the layout's keep_heap they reuse the heap
    with heap.kept_freed_memory(layout.keep_heap):
        for b0 in range(0, len(layout.tiles), layout.batch_size):
            batch = layout.tiles[b0 : b0 + layout.batch_size]
            x = buf[: len(batch)]
            for t, slot in zip(batch, x, strict=True):
                tiling.extract(image, t.input_box(margin), out=slot)
            xt = torch.from_numpy(x).to(device)
            if cl:
                xt = xt.contiguous(memory_format=fmt)
            with torch.inference_mode(), _autocast(device, precision):
                acc: torch.Tensor | None = None
                for axes in flips:
                    fd = [2 + a for a in axes]
                    y = forward(torch.flip(xt, fd) if fd else xt)
                    y = (torch.flip(y, fd) if fd else y).float()
                    acc = y if acc is None else acc + y
                assert acc is not None
                if len(flips) > 1:
                    acc = acc / len(flips)
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

    check_precision(precision, _model_device(model))
    run_tiles(
        model, image, layout, sink, tta=tta, progress=progress, prepare=False, precision=precision
    )
    return out


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    """Numerically stable float32 softmax over the class axis."""
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# model folders
# ---------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A network in eval mode on its device, with the plan and postprocessing it came with."""

    model: nn.Module
    plan: Plan
    postprocessing: dict[str, Any] | None = None
    folder: Path | None = None


def _strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    # DistributedDataParallel and torch.compile wrap the module and prefix every key
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_model(folder: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Read ``plan.json``, ``model.pt`` (tensors only) and optional ``postprocessing.json``.

    ``model.pt`` is loaded with ``torch.load(weights_only=True)``: a checkpoint that needs
    arbitrary pickled code is refused. Raises ``PlanError`` / ``ModelError`` naming the file.
    """
    from medseg.model import UNet

    root = Path(folder)
    if not root.is_dir():
        raise ModelError(f"{root}: model folder not found; point --model to a training run")
    plan = Plan.load(root / "plan.json")
    dev = resolve_device(device)
    try:
        model: nn.Module = UNet(**plan.network)
    except (TypeError, ValueError) as exc:
        raise PlanError(
            f"{root / 'plan.json'}: network settings do not build a UNet ({exc})"
        ) from exc
    net = plan.network
    checks = {
        "spatial_dims": (net.get("spatial_dims"), plan.spatial_dims),
        "in_channels": (net.get("in_channels"), plan.in_channels),
        "out_channels": (net.get("out_channels"), plan.num_classes),
    }
    for key, (have, want) in checks.items():
        if have != want:
            raise PlanError(
                f"{root / 'plan.json'}: network {key} = {have} but the plan needs {want}"
            )
    if tuple(plan.margin) != (model.margin,) * plan.spatial_dims:  # type: ignore[attr-defined]
        raise PlanError(
            f"{root / 'plan.json'}: margin {tuple(plan.margin)} does not match the network's "
            f"{model.margin} voxels per side; regenerate the plan"  # type: ignore[attr-defined]
        )
    weights = root / "model.pt"
    if not weights.is_file():
        raise ModelError(f"{weights}: weights not found; is training finished?")
    try:
        state = torch.load(weights, map_location=dev, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"{weights}: refused, the file holds pickled objects or code, not plain tensors; "
            "save it with torch.save(model.state_dict(), path)"
        ) from exc
    except Exception as exc:  # torch raises RuntimeError/EOFError/zip errors for bad files
        raise ModelError(f"{weights}: not a readable PyTorch weights file ({exc})") from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelError(f"{weights}: expected a state_dict (names -> tensors)")
    state = _strip_prefixes(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shape = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        if shape:
            parts.append(f"shape mismatch {shape[:3]}{' ...' if len(shape) > 3 else ''}")
        raise ModelError(
            f"{weights}: weights do not fit the network in plan.json: {'; '.join(parts)}"
        )
    model.load_state_dict(state)
    model.to(dev).eval()
    post = None
    post_path = root / "postprocessing.json"
    if post_path.is_file():
        try:
            post = json.loads(post_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{post_path}: not readable JSON ({exc}); delete or fix it") from exc
    return LoadedModel(model, plan, post, root)


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------
@dataclass
class CasePrediction:
    """Labels (data set values, on the scan's grid) and, on request, class probabilities."""

    labels: Volume
    probabilities: Volume | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _label_dtype(values: Sequence[int]) -> np.dtype:
    lo, hi = min(values), max(values)
    for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32):
        if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.int64)


def _classes_to_labels(plan: Plan, classes: np.ndarray) -> np.ndarray:
    to_labels = getattr(plan, "classes_to_labels", None)
    if to_labels is not None:
        return np.asarray(to_labels(classes))
    return np.asarray(plan.label_values)[classes]


def _class_dtype(n_classes: int) -> type[np.signedinteger]:
    """dtype of the streamed class-index map (the argmax of every tile)."""
    return np.int8 if n_classes <= 127 else np.int16


def _outputs_bytes(shape: tuple[int, ...], n_classes: int, probabilities: bool) -> int:
    """Bytes of the class map and (optionally) the float32 probabilities of ``shape``."""
    per_voxel = np.dtype(_class_dtype(n_classes)).itemsize + (4 * n_classes if probabilities else 0)
    return math.prod(shape) * per_voxel


def _outputs_nbytes(
    shape: tuple[int, ...], n_classes: int, probabilities: bool, budget: int
) -> int:
    """Bytes of the outputs :func:`_output_arrays` keeps in memory (0 when memory-mapped)."""
    nbytes = _outputs_bytes(shape, n_classes, probabilities)
    return nbytes if nbytes <= MEMMAP_FRACTION * budget else 0


@contextlib.contextmanager
def _output_arrays(
    shape: tuple[int, ...], n_classes: int, probabilities: bool, budget: int
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Preallocated class and probability arrays, memory-mapped when they exceed the budget."""
    cls_dtype = _class_dtype(n_classes)
    if _outputs_bytes(shape, n_classes, probabilities) <= MEMMAP_FRACTION * budget:
        probs = np.zeros((n_classes, *shape), np.float32) if probabilities else None
        yield np.zeros(shape, cls_dtype), probs
        return
    with tempfile.TemporaryDirectory(prefix="medseg-infer-") as tmp:
        cls = np.memmap(Path(tmp) / "classes.dat", dtype=cls_dtype, mode="w+", shape=shape)
        pm = None
        if probabilities:
            pm = np.memmap(
                Path(tmp) / "probabilities.dat",
                dtype=np.float32,
                mode="w+",
                shape=(n_classes, *shape),
            )
        try:
            yield cls, pm
        finally:
            del cls, pm


def check_channels(images: Sequence[Volume], plan: Plan) -> None:
    """``ModelError`` unless the volumes hold exactly the plan's channels."""
    if not images:
        raise ReadError("no input volumes given")
    n_channels = sum(v.channels for v in images)
    if n_channels != plan.in_channels:
        names = ", ".join(c.name for c in plan.channels)
        raise ModelError(
            f"{images[0].meta.get('source', 'input')}: the scan has {n_channels} channel(s) but "
            f"the model expects {plan.in_channels} ({names}); give one --volume per channel"
        )


def _boundary_suffices(plan: Plan, record: Any) -> bool:
    """Whether tiles can collect the boundary probabilities of a resampled case: always in 3D;
    for 2D plans (tiles are single slices) only where the restore samples whole slices, so
    that no restored voxel blends two slices."""
    if plan.spatial_dims == 3:
        return True
    amap = axis_map(record.grid, record.original_grid)
    if amap is None:
        return False
    t = amap.perm.index(2)
    return whole_indices(amap.coords(t, record.original_grid.shape[t]))


class _BoundaryProbabilities:
    """Softmax values of the plan voxels the restore of a resampled case may read
    (:func:`medseg.preprocess.resample.resample_argmax`): per tile, those whose 3x3(x3)
    neighbourhood inside the tile changes class, and the tile's faces, whose neighbours lie in
    other tiles. A superset of every voxel whose neighbourhood changes class in the whole
    case, at a fraction of the memory of all probabilities."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        self._keys: list[np.ndarray] = []
        self._values: list[np.ndarray] = []

    def add(self, labels: np.ndarray, logits: np.ndarray, start: tuple[int, ...]) -> None:
        """A tile's argmax ``labels`` and ``logits`` ``(C, *labels.shape)`` whose first voxel
        is plan voxel ``start`` (three indices; a 2D tile lies in slice ``start[2]``)."""
        keep = class_changes(labels)
        for ax in range(labels.ndim):
            keep[(slice(None),) * ax + (0,)] = True
            keep[(slice(None),) * ax + (-1,)] = True
        local = np.nonzero(keep)
        coords = [q + s for q, s in zip(local, start, strict=False)]
        if labels.ndim == 2:
            coords.append(np.full_like(coords[0], start[2]))
        self._keys.append(np.ravel_multi_index(tuple(coords), self.shape))
        self._values.append(softmax(logits[:, keep]))

    def finish(self) -> SparseProbabilities:
        """Everything added, sorted by flat index."""
        keys = np.concatenate(self._keys)
        order = np.argsort(keys)
        values = np.concatenate(self._values, axis=1)[:, order]
        self._keys, self._values = [], []
        return SparseProbabilities(keys[order], values, self.shape)


def predict_case(
    images: Sequence[Volume],
    loaded: LoadedModel,
    *,
    tile_size: int | Sequence[int] | None = None,
    tta: str | Sequence[int] | None = None,
    max_memory: int | None = None,
    save_probabilities: bool = False,
    progress: Progress | None = None,
    precision: str = "auto",
) -> CasePrediction:
    """Segment one case: ``images`` are its channels in the plan's order (a Volume may hold
    several channels, e.g. RGB). Returns labels on ``images[0]``'s grid in the data set's
    own label values; probabilities (linear resampling) only when asked for. ``precision``:
    see :func:`check_precision`."""
    from medseg.postprocess import apply_postprocessing, needs_probabilities
    from medseg.preprocess.pipeline import LazyImage, prepare_for_inference
    from medseg.preprocess.restore import (
        restore_classes,
        restore_labels,
        restore_probabilities,
        restore_resamples,
    )

    plan, model = loaded.plan, loaded.model
    check_channels(images, plan)
    check_precision(precision, _model_device(model))
    heap.return_freed_memory()
    original = images[0].grid
    budget = default_memory_budget() if max_memory is None else int(max_memory)
    # 3D without resampling: tiles are normalised from the stored (e.g. int16) scan, no
    # float32 copy of the whole case
    prepared = prepare_for_inference(list(images), plan)
    image = prepared.image if isinstance(prepared.image, LazyImage) else prepared.image.array
    spatial = image.shape[1:]
    slices: list[np.ndarray | tiling.TileSource]
    if plan.spatial_dims == 3:
        slices = [image]
    else:
        arr = image.materialise() if isinstance(image, LazyImage) else image
        slices = [arr[..., k] for k in range(spatial[2])]
    fast = inference_model(model)
    # probability postprocessing steps (threshold, watershed) need them on the scan's grid, and
    # resampled cases of few classes take their labels from them (see restore_resamples)
    resampled = plan.num_classes <= PROBABILITY_RESTORE_MAX_CLASSES and restore_resamples(
        prepared.record
    )
    full_probs = save_probabilities or needs_probabilities(loaded.postprocessing)
    # for the labels alone the probabilities are kept only near class boundaries
    boundary = (
        _BoundaryProbabilities(tuple(spatial))  # type: ignore[arg-type]
        if resampled and not full_probs and _boundary_suffices(plan, prepared.record)
        else None
    )
    want_probs = full_probs or (resampled and boundary is None)
    # the budget covers tiles and outputs: output arrays held in memory come off the tiles'
    # (the boundary store is budgeted as if every probability were kept)
    held = _outputs_nbytes(tuple(spatial), plan.num_classes, resampled or full_probs, budget)
    layout = tile_layout(
        fast, slices[0].shape[1:], tile_size=tile_size, max_memory=max(0, budget - held)
    )
    total = len(layout.tiles) * len(slices)
    with _output_arrays(tuple(spatial), plan.num_classes, want_probs, budget) as (
        classes,
        probs,
    ):
        done = 0
        # one kept heap for all slices of a 2D case: not given back and regrown per slice
        with heap.kept_freed_memory(layout.keep_heap):
            for k, img in enumerate(slices):
                cls_view = classes if plan.spatial_dims == 3 else classes[..., k]
                prob_view = probs if probs is None or plan.spatial_dims == 3 else probs[..., k]

                def sink(
                    t: tiling.Tile,
                    logits: np.ndarray,
                    cls_view: np.ndarray = cls_view,
                    prob_view: np.ndarray | None = prob_view,
                    k: int = k,
                ) -> None:
                    lab = logits.argmax(axis=0)
                    cls_view[t.write.slices()] = lab
                    if prob_view is not None:
                        prob_view[(slice(None), *t.write.slices())] = softmax(logits)
                    if boundary is not None:
                        boundary.add(lab, logits, (*t.write.start, k)[:3])

                done = run_tiles(
                    fast,
                    img,
                    layout,
                    sink,
                    tta=tta,
                    progress=progress,
                    done=done,
                    total=total,
                    prepare=False,
                    precision=precision,
                )
        prob_vol = None
        if probs is not None and full_probs:
            p = np.asarray(restore_probabilities(np.asarray(probs), prepared.record), np.float32)
            prob_vol = Volume(p, original, meta={"kind": "probabilities"})
        if not resampled:
            restored = np.asarray(restore_labels(np.asarray(classes), prepared.record))
        elif prob_vol is not None:
            restored = prob_vol.array.argmax(axis=0).astype(classes.dtype)
        else:
            held_probs = boundary.finish() if boundary is not None else probs
            assert held_probs is not None
            # classes no plan voxel's argmax holds are not restored (nearest neighbour never
            # gave them either): a many-class model pays for what the scan shows
            shown = [c for c in range(1, plan.num_classes) if (classes == c).any()]
            restored = restore_classes(held_probs, prepared.record, classes.dtype, shown, classes)
    if loaded.postprocessing:
        restored = apply_postprocessing(
            restored,
            original.spacing,
            loaded.postprocessing,
            None if prob_vol is None else prob_vol.array,
        )
    if not save_probabilities:
        prob_vol = None
    labels = _classes_to_labels(plan, np.asarray(restored)).astype(
        _label_dtype(plan.label_values), copy=False
    )
    meta = {k: v for k, v in images[0].meta.items() if k in ("source", "series_uid")}
    meta["model"] = str(loaded.folder) if loaded.folder else None
    vol = Volume(labels.reshape((1, *original.shape)), original, is_label=True, meta=meta)
    info = {"tile_size": layout.size, "tiles": total, "batch_size": layout.batch_size}
    return CasePrediction(vol, prob_vol, info)


def infer_case(
    images: Sequence[Volume],
    loaded: LoadedModel,
    *,
    tile_size: int | Sequence[int] | None = None,
    tta: str | Sequence[int] | None = None,
    max_memory: int | None = None,
    progress: Progress | None = None,
) -> Volume:
    """Labels of one case in the data set's own values on the scan's own grid."""
    return predict_case(
        images, loaded, tile_size=tile_size, tta=tta, max_memory=max_memory, progress=progress
    ).labels


# ---------------------------------------------------------------------------------------------
# files and cohorts
# ---------------------------------------------------------------------------------------------
_WRITABLE = (".nii.gz", ".nii", ".nrrd", ".mha", ".png")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def output_suffix(first_input: Path, suffix: str | None = None) -> str:
    """Output file suffix: ``suffix`` if given, else the input's when writable (2D images
    become ``.png``, DICOM ``.nii.gz``)."""
    if suffix:
        return suffix if suffix.startswith(".") else "." + suffix
    _, s = split_suffix(first_input)
    s = s.lower()
    if s in _WRITABLE:
        return s
    if s in (".tif", ".tiff", ".gif", ".jpg", ".jpeg", ".bmp"):
        return ".png"
    return ".nii.gz"


def probabilities_path(output: Path) -> Path:
    """Where ``--save-probabilities`` writes: ``<stem>_probabilities.nii.gz`` beside the labels."""
    stem, _ = split_suffix(output)
    return output.with_name(f"{stem}_probabilities.nii.gz")


@dataclass(frozen=True)
class CaseInput:
    case_id: str
    images: list[Path]


def discover_cases(input_dir: Path, n_channels: int) -> list[CaseInput]:
    """Cases in a folder: nnU-Net style ``CASE_0000.ext``, ``CASE_0001.ext`` ... (one file per
    channel), else one file (or DICOM sub-folder) per case. Hidden files are ignored."""
    if not input_dir.is_dir():
        raise ReadError(f"{input_dir}: input folder not found")
    entries = sorted(p for p in input_dir.iterdir() if not p.name.startswith("."))
    if not entries:
        raise ReadError(f"{input_dir}: the folder is empty")
    stems = [(p, *split_suffix(p)) for p in entries]
    matched = [(p, _CHANNEL_RE.match(stem)) for p, stem, _ in stems]
    if all(m is not None for _, m in matched):
        groups: dict[str, dict[int, Path]] = {}
        for p, m in matched:
            assert m is not None
            groups.setdefault(m["case"], {})[int(m["ch"])] = p
        cases = []
        for cid, chans in sorted(groups.items()):
            if sorted(chans) != list(range(len(chans))):
                raise ReadError(
                    f"{input_dir}: case {cid} has channel files {sorted(chans)}; expected "
                    f"_0000 .. _{len(chans) - 1:04d}"
                )
            cases.append(CaseInput(cid, [chans[i] for i in range(len(chans))]))
        return cases
    if n_channels > 1:
        raise ReadError(
            f"{input_dir}: the model needs {n_channels} channels per case; name the files "
            "CASE_0000.nii.gz, CASE_0001.nii.gz, ... or use --manifest"
        )
    return [CaseInput(stem, [p]) for p, stem, _ in stems]


def select_shard(items: Sequence[Any], shard: str | None) -> list[Any]:
    """Items of shard ``"i/n"`` (0-based ``i``): every n-th item starting at ``i``."""
    if not shard:
        return list(items)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise MedsegError(f"--shard {shard!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    i, n = int(m[1]), int(m[2])
    return list(items)[i::n]


def read_case(paths: Sequence[Path], series: str | None = None) -> list[Volume]:
    """Read one case's channel files (``series`` applies to DICOM inputs only)."""
    from medseg.io import read_volume, volume_format

    vols = []
    for p in paths:
        opts: dict[str, Any] = (
            {"series": series} if series is not None and volume_format(p) == "dicom" else {}
        )
        vols.append(read_volume(p, **opts))
    return vols


def write_prediction(pred: CasePrediction, output: Path) -> list[Path]:
    """Write labels (and probabilities when present) atomically; returns the paths written."""
    from medseg.io import write_volume

    if not output.parent.is_dir():
        raise WriteError(f"{output}: folder {output.parent} does not exist; create it first")
    written = []
    if pred.probabilities is not None:
        pp = probabilities_path(output)
        write_volume(pred.probabilities, pp)
        written.append(pp)
    write_volume(pred.labels, output)
    written.append(output)
    return written


def run_cohort(
    cases: Sequence[CaseInput],
    loaded: LoadedModel,
    output_dir: Path,
    *,
    overwrite: bool = False,
    suffix: str | None = None,
    series: str | None = None,
    on_case: Callable[[str, str], None] | None = None,
    **predict_kw: Any,
) -> dict[str, str]:
    """Segment every case into ``output_dir/<case_id><suffix>``; skip finished cases unless
    ``overwrite``. Bad cases are collected; ``CohortError`` lists them at the end.
    Returns ``{case_id: "done" | "skipped"}``."""
    if not output_dir.is_dir():
        raise WriteError(f"{output_dir}: output folder does not exist; create it first")
    status: dict[str, str] = {}
    failures: dict[str, str] = {}
    for case in cases:
        out = output_dir / f"{case.case_id}{output_suffix(case.images[0], suffix)}"
        if out.exists() and not overwrite:
            status[case.case_id] = "skipped"
        else:
            try:
                pred = predict_case(read_case(case.images, series), loaded, **predict_kw)
                write_prediction(pred, out)
                status[case.case_id] = "done"
            except MedsegError as exc:
                failures[case.case_id] = str(exc)
                status[case.case_id] = "failed"
        if on_case is not None:
            on_case(case.case_id, status[case.case_id])
    if failures:
        raise CohortError(
            f"{len(failures)} of {len(cases)} cases failed; the others were written to "
            f"{output_dir}",
            failures,
        )
    return status
