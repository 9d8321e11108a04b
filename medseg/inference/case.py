"""One case: the plan's preprocessing, the tiled forward pass streamed into an argmax, the
labels restored onto the scan's own grid, postprocessing, and the data set's label values.

``predict_case`` runs the steps below in order; each is a short function of its own. Nothing
here changes process-wide state: a caller that wants freed memory kept in the heap while the
tiles run passes ``tile_scope`` (each process that segments does, once, through
:func:`medseg.inference.cohort.load_for_infer`; :mod:`medseg.heap`).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from medseg import tiling
from medseg.errors import ModelError, ReadError
from medseg.inference.model_folder import LoadedModel
from medseg.inference.tiled import (
    Progress,
    TileLayout,
    inference_model,
    model_device,
    run_tiles,
    softmax,
    tile_layout,
)
from medseg.preprocess.pipeline import InferenceInput, LazyImage, prepare_for_inference
from medseg.preprocess.plan import Plan
from medseg.preprocess.restore import (
    SparseProbabilities,
    class_changes,
    restore_classes,
    restore_labels,
    restore_probabilities,
    restore_resamples,
    whole_indices,
)
from medseg.resample import axis_map
from medseg.runtime import check_precision, default_memory_budget
from medseg.volume import Grid, Volume

#: Outputs larger than this fraction of the budget are kept in a memory-mapped temp file.
MEMMAP_FRACTION = 0.25
#: Resampled cases of models with at most this many classes take their labels from the
#: restored probabilities (see ``preprocess.restore.restore_resamples``), kept only near
#: class boundaries (``_BoundaryProbabilities``) and interpolated only there
#: (``preprocess.restore.resample_argmax``). A 512x512x200 scan planned at 1 mm (358x358x500) with a
#: trivial network: 5 classes 7.3 s and 2.5-3.0 GiB vs 4.1 s and 2.9 GiB by nearest
#: neighbour (all probabilities on the plan grid: 8.9-9.8 s, 3.5 GiB); 20 classes 20 s and
#: 6.4 GiB vs 9.8 s and 6.5 GiB (all probabilities: 35 s, 9.5 GiB). The tile budget still
#: sets aside room for all probabilities, so models with more classes (whole-body atlases)
#: keep the nearest-neighbour restore until that reservation is sized to the boundary store.
PROBABILITY_RESTORE_MAX_CLASSES = 8


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
    (:func:`medseg.preprocess.restore.resample_argmax`): per tile, those whose 3x3(x3)
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


#: ``tile_scope(layout)``: the context all tiles of one case run in, given their layout (the
#: command line's keeps freed memory in the heap where ``layout.keep_heap`` says).
TileScope = Callable[[TileLayout], contextlib.AbstractContextManager[Any]]


@dataclass(frozen=True)
class _Outputs:
    """What a case keeps of its tiles besides the class map: ``resampled`` cases take their
    labels from restored probabilities; ``full`` probabilities are kept (saved, or needed by a
    postprocessing step); ``boundary`` keeps them only near class boundaries."""

    resampled: bool
    full: bool
    boundary: _BoundaryProbabilities | None

    @property
    def probabilities(self) -> bool:
        """Whether every probability of the plan grid is held."""
        return self.full or (self.resampled and self.boundary is None)


def _prepare(
    images: Sequence[Volume], plan: Plan
) -> tuple[InferenceInput, list[np.ndarray | tiling.TileSource], tuple[int, ...]]:
    """The case on the plan's grid, the images its tiles run over (the whole ``(C, I, J, K)``
    image in 3D, one ``(C, I, J)`` slice per K in 2D) and the plan grid's shape (I, J, K)."""
    # 3D without resampling: tiles are normalised from the stored (e.g. int16) scan, no
    # float32 copy of the whole case
    prepared = prepare_for_inference(list(images), plan)
    image = prepared.image if isinstance(prepared.image, LazyImage) else prepared.image.array
    spatial = tuple(image.shape[1:])
    slices: list[np.ndarray | tiling.TileSource]
    if plan.spatial_dims == 3:
        slices = [image]
    else:
        arr = image.materialise() if isinstance(image, LazyImage) else image
        slices = [arr[..., k] for k in range(spatial[2])]
    return prepared, slices, spatial


def _choose_outputs(
    loaded: LoadedModel, prepared: InferenceInput, spatial: tuple[int, ...], save: bool
) -> _Outputs:
    """Which probabilities the case keeps (see :class:`_Outputs`)."""
    from medseg.postprocess import needs_probabilities

    plan = loaded.plan
    # probability postprocessing steps (threshold, watershed) need them on the scan's grid, and
    # resampled cases of few classes take their labels from them (see restore_resamples)
    resampled = plan.num_classes <= PROBABILITY_RESTORE_MAX_CLASSES and restore_resamples(
        prepared.record
    )
    full = save or needs_probabilities(loaded.postprocessing)
    # for the labels alone the probabilities are kept only near class boundaries
    boundary = (
        _BoundaryProbabilities(spatial)  # type: ignore[arg-type]
        if resampled and not full and _boundary_suffices(plan, prepared.record)
        else None
    )
    return _Outputs(resampled, full, boundary)


def _run_slices(
    model: nn.Module,
    slices: Sequence[np.ndarray | tiling.TileSource],
    layout: TileLayout,
    classes: np.ndarray,
    probs: np.ndarray | None,
    boundary: _BoundaryProbabilities | None,
    **run_kw: Any,
) -> None:
    """Run the tiles of every slice (the one image in 3D) into the class map ``classes``
    (I, J, K), the probabilities ``probs`` (C, I, J, K) when held, and the ``boundary`` store
    when kept. ``run_kw``: :func:`medseg.inference.tiled.run_tiles` options."""
    three_d = classes.ndim == slices[0].ndim - 1
    total = len(layout.tiles) * len(slices)
    done = 0
    for k, img in enumerate(slices):
        cls_view = classes if three_d else classes[..., k]
        prob_view = probs if probs is None or three_d else probs[..., k]

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

        done = run_tiles(model, img, layout, sink, done=done, total=total, prepare=False, **run_kw)


def _restore(
    plan: Plan,
    original: Grid,
    prepared: InferenceInput,
    outputs: _Outputs,
    classes: np.ndarray,
    probs: np.ndarray | None,
) -> tuple[np.ndarray, Volume | None]:
    """Class indices on the scan's own grid ``original``, and the probabilities there when
    ``outputs.full``."""
    prob_vol = None
    if probs is not None and outputs.full:
        p = np.asarray(restore_probabilities(np.asarray(probs), prepared.record), np.float32)
        prob_vol = Volume(p, original, meta={"kind": "probabilities"})
    if not outputs.resampled:
        return np.asarray(restore_labels(np.asarray(classes), prepared.record)), prob_vol
    if prob_vol is not None:
        return prob_vol.array.argmax(axis=0).astype(classes.dtype), prob_vol
    held = outputs.boundary.finish() if outputs.boundary is not None else probs
    assert held is not None
    # classes no plan voxel's argmax holds are not restored (nearest neighbour never gave
    # them either): a many-class model pays for what the scan shows
    shown = [c for c in range(1, plan.num_classes) if (classes == c).any()]
    return restore_classes(held, prepared.record, classes.dtype, shown, classes), prob_vol


def _labels_volume(
    images: Sequence[Volume], loaded: LoadedModel, restored: np.ndarray, prob_vol: Volume | None
) -> Volume:
    """Postprocessed class indices as a label Volume ``(1, I, J, K)`` on ``images[0]``'s grid,
    in the data set's own label values."""
    from medseg.postprocess import apply_postprocessing

    plan, original = loaded.plan, images[0].grid
    if loaded.postprocessing:
        restored = apply_postprocessing(
            restored,
            original.spacing,
            loaded.postprocessing,
            None if prob_vol is None else prob_vol.array,
        )
    labels = _classes_to_labels(plan, np.asarray(restored)).astype(
        _label_dtype(plan.label_values), copy=False
    )
    meta = {k: v for k, v in images[0].meta.items() if k in ("source", "series_uid")}
    meta["model"] = str(loaded.folder) if loaded.folder else None
    return Volume(labels.reshape((1, *original.shape)), original, is_label=True, meta=meta)


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
    keep_heap: bool | None = None,
    tile_scope: TileScope | None = None,
) -> CasePrediction:
    """Segment one case: ``images`` are its channels in the plan's order (a Volume may hold
    several channels, e.g. RGB). Returns labels on ``images[0]``'s grid in the data set's
    own label values; probabilities (linear resampling) only when asked for. ``precision``:
    see :func:`medseg.runtime.check_precision`; ``keep_heap``: whether the tiles are planned
    for a kept heap (see :func:`medseg.inference.tiled.tile_layout`); ``tile_scope``: the
    context all tiles of the case run in (one for every slice of a 2D case)."""
    plan, model = loaded.plan, loaded.model
    check_channels(images, plan)
    check_precision(precision, model_device(model))
    budget = default_memory_budget() if max_memory is None else int(max_memory)
    prepared, slices, spatial = _prepare(images, plan)
    fast = inference_model(model)
    outputs = _choose_outputs(loaded, prepared, spatial, save_probabilities)
    # the budget covers tiles and outputs: output arrays held in memory come off the tiles'
    # (the boundary store is budgeted as if every probability were kept)
    held = _outputs_nbytes(spatial, plan.num_classes, outputs.resampled or outputs.full, budget)
    layout = tile_layout(
        fast,
        slices[0].shape[1:],
        tile_size=tile_size,
        max_memory=max(0, budget - held),
        keep_heap=keep_heap,
    )
    scope = contextlib.nullcontext() if tile_scope is None else tile_scope(layout)
    with _output_arrays(spatial, plan.num_classes, outputs.probabilities, budget) as (
        classes,
        probs,
    ):
        with scope:
            _run_slices(
                fast,
                slices,
                layout,
                classes,
                probs,
                outputs.boundary,
                tta=tta,
                progress=progress,
                precision=precision,
            )
        restored, prob_vol = _restore(plan, images[0].grid, prepared, outputs, classes, probs)
    labels = _labels_volume(images, loaded, restored, prob_vol)
    total = len(layout.tiles) * len(slices)
    info = {"tile_size": layout.size, "tiles": total, "batch_size": layout.batch_size}
    return CasePrediction(labels, prob_vol if save_probabilities else None, info)


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
