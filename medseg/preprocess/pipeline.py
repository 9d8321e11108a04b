"""The one preprocessing function shared by ``preprocess``, training and ``infer``.

``preprocess_case`` takes a case's channel volumes (and label) on the scan's own grid and
returns them on the plan's grid: reoriented (exact axis permutation and flips), cropped to the
non-zero box, normalised per channel, resampled to the target spacing. ``CaseRecord`` keeps the
grids, crop box and normalisation, so ``restore_labels`` / ``restore_probabilities`` put a
prediction back on the scan's own grid with one resample through world coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.errors import GeometryError, ReadError
from medseg.preprocess.fingerprint import (
    GRID_ATOL_MM,
    background_values,
    box_of,
    foreground_mask,
    stack_channels,
)
from medseg.preprocess.normalise import apply_normalisation, normalise
from medseg.preprocess.plan import ChannelPlan, Plan
from medseg.preprocess.resample import (
    SparseProbabilities,
    axis_map,
    is_identity,
    resample_argmax,
    resample_array,
)
from medseg.volume import Box, Grid, Volume, reorient_array

#: Image interpolation order in-plane, and along an axis this many times coarser than the
#: finest (through-plane of anisotropic scans, where cubic overshoots between distant slices).
IMAGE_ORDER = 3
THROUGH_PLANE_ORDER = 1
ANISOTROPY_RATIO = 3.0
#: Labels: nearest neighbour (see ``medseg.preprocess.resample`` for why not one-hot linear).
LABEL_ORDER = 0


@dataclass(frozen=True)
class CaseRecord:
    """How a case went from its own grid to the plan's grid (JSON-able).

    ``original_grid``: the scan's grid; ``orientation``: codes applied (None = kept);
    ``crop_box``: voxel box in the reoriented grid; ``cropped_grid``: the reoriented, cropped
    grid; ``grid``: the preprocessed grid; ``normalisation``: one dict per channel with the
    method and the mean/std/clip applied; ``sources``: input files.
    """

    original_grid: Grid
    orientation: tuple[str, str, str] | None
    crop_box: Box
    cropped_grid: Grid
    grid: Grid
    normalisation: list[dict[str, Any]]
    sources: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "original_grid": self.original_grid.to_json(),
            "orientation": None if self.orientation is None else list(self.orientation),
            "crop_box": [list(self.crop_box.start), list(self.crop_box.stop)],
            "cropped_grid": self.cropped_grid.to_json(),
            "grid": self.grid.to_json(),
            "normalisation": self.normalisation,
            "sources": self.sources,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CaseRecord:
        o = d.get("orientation")
        return cls(
            original_grid=Grid.from_json(d["original_grid"]),
            orientation=None if o is None else (o[0], o[1], o[2]),
            crop_box=Box(tuple(d["crop_box"][0]), tuple(d["crop_box"][1])),
            cropped_grid=Grid.from_json(d["cropped_grid"]),
            grid=Grid.from_json(d["grid"]),
            normalisation=list(d["normalisation"]),
            sources=list(d.get("sources", [])),
        )


@dataclass
class PreparedCase:
    """A case on the plan's grid: float32 image ``(C,I,J,K)``, int16 classes (-1 = ignore)."""

    image: Volume
    label: Volume | None
    record: CaseRecord


def _source(v: Volume, default: str) -> str:
    return str(v.meta.get("source") or v.meta.get("path") or default)


def image_orders(spacing: tuple[float, ...]) -> tuple[int, int, int]:
    """Cubic on every axis, linear along an axis ``ANISOTROPY_RATIO`` times coarser."""
    finest = min(s for s in spacing)
    return tuple(  # type: ignore[return-value]
        THROUGH_PLANE_ORDER if s > ANISOTROPY_RATIO * finest else IMAGE_ORDER for s in spacing
    )


def _reorient(arr: np.ndarray, grid: Grid, codes: tuple[str, str, str] | None):
    if codes is None:
        return arr, grid
    new, perm, flips = grid.reoriented(codes)
    return np.ascontiguousarray(reorient_array(arr, perm, flips)), new


#: Stored dtypes whose every value float32 holds exactly: a lazy image may keep them, since
#: converting a tile gives the same float32 values as converting the whole scan.
_EXACT_IN_FLOAT32 = tuple(
    np.dtype(t) for t in (np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.float32)
)


def _checked_channels(
    images: list[Volume], plan: Plan, sources: list[str], *, keep_dtype: bool
) -> tuple[np.ndarray, Grid]:
    """The case's channels ``(C, I, J, K)`` (one grid, checked), the plan's channel count and
    finite values checked. float32, or with ``keep_dtype`` the stored dtype when float32 holds
    it exactly (a single volume is not copied)."""
    if keep_dtype and images:
        common = np.result_type(*[v.array.dtype for v in images])
        if common in _EXACT_IN_FLOAT32:
            grid = images[0].grid
            for v, src in zip(images[1:], sources[1:], strict=True):
                grid.check_same(v.grid, GRID_ATOL_MM, f"{src} vs {sources[0]}")
            arr = (
                images[0].array
                if len(images) == 1
                else np.concatenate([v.array.astype(common, copy=False) for v in images])
            )
        else:
            arr, grid = stack_channels(images, sources[0])
    else:
        arr, grid = stack_channels(images, sources[0] if sources else "case")
    if arr.shape[0] != plan.in_channels:
        raise GeometryError(
            f"{', '.join(sources)}: {arr.shape[0]} channels, but the plan expects "
            f"{plan.in_channels} ({', '.join(c.name for c in plan.channels)}); give one file "
            "per channel in this order"
        )
    if np.issubdtype(arr.dtype, np.inexact):
        ch_source = [s for v, s in zip(images, sources, strict=True) for _ in range(v.channels)]
        for c in range(arr.shape[0]):
            bad = int(np.count_nonzero(~np.isfinite(arr[c])))
            if bad:
                raise ReadError(
                    f"{ch_source[c]}: channel {plan.channels[c].name} has {bad} NaN or infinite "
                    "voxels; fix or mask the scan before preprocessing"
                )
    return arr, grid


#: Spacings closer than this (mm) count as equal: NIfTI stores spacing in float32 (0.7 reads
#: back as 0.699999988) and plans round to 1e-6 mm, so a scan already at the plan's spacing
#: would otherwise be resampled (a whole cubic interpolation) to move its last voxel by ~1e-5.
SPACING_ATOL_MM = 1e-5


def target_grid(grid: Grid, plan: Plan) -> Grid:
    """The plan's grid for a (reoriented, cropped) ``grid``: its extent at the target spacing;
    ``grid`` itself when the plan keeps the spacing or the spacings agree within
    ``SPACING_ATOL_MM``."""
    if plan.target_spacing is None:
        return grid
    if np.allclose(grid.spacing, plan.target_spacing, rtol=0.0, atol=SPACING_ATOL_MM):
        return grid
    return grid.with_spacing(plan.target_spacing)


def preprocess_case(
    images: list[Volume],
    plan: Plan,
    label: Volume | None = None,
    *,
    threads: int | None = None,
) -> PreparedCase:
    """Bring one case onto the plan's grid (see module docstring).

    ``images``: one volume per file, channels concatenated in order must match the plan's.
    Raises ``ReadError`` for NaN voxels, ``GeometryError`` for grids that differ, ``PlanError``
    for undeclared label values; each message names the file.
    """
    sources = [_source(v, f"image {i}") for i, v in enumerate(images)]
    arr, grid = _checked_channels(images, plan, sources, keep_dtype=False)
    classes = None
    if label is not None:
        lsrc = _source(label, "label")
        grid.check_same(label.grid, GRID_ATOL_MM, f"{lsrc} vs {sources[0]}")
        if label.array.shape[0] != 1:
            raise GeometryError(f"{lsrc}: label has {label.array.shape[0]} channels, expected 1")
        classes = plan.labels_to_classes(label.array, source=lsrc)

    arr, rgrid = _reorient(arr, grid, plan.orientation)
    if classes is not None:
        classes, _ = _reorient(classes, grid, plan.orientation)
    # The mask comes from the whole scan: its corners tell the background value.
    mask = foreground_mask(arr)
    box = box_of(mask) if plan.crop_to_nonzero else Box.from_shape(rgrid.shape)
    cgrid = rgrid.crop(box)
    arr = arr[(slice(None), *box.slices())]
    nonzero = mask[box.slices()]
    normed, records = [], []
    for c, ch in enumerate(plan.channels):
        a, rec = normalise(arr[c], ch, nonzero=nonzero)
        normed.append(a)
        records.append(rec)
    arr = np.stack(normed)
    target = target_grid(cgrid, plan)
    arr = resample_array(arr, cgrid, target, order=image_orders(cgrid.spacing), threads=threads)
    lab_vol = None
    if classes is not None:
        classes = classes[(slice(None), *box.slices())]
        classes = resample_array(
            classes, cgrid, target, order=LABEL_ORDER, label=True, threads=threads
        )
        lab_vol = Volume(classes.astype(np.int16), target, True, {"source": lsrc})
    record = CaseRecord(grid, plan.orientation, box, cgrid, target, records, sources)
    image = Volume(arr.astype(np.float32, copy=False), target, False, {"sources": sources})
    return PreparedCase(image, lab_vol, record)


#: Voxels normalised at a time by ``LazyImage.convert`` (bounds its float temporaries).
LAZY_SLAB_VOXELS = 1 << 20


@dataclass(frozen=True)
class LazyImage:
    """A case's preprocessed image, normalised box by box from the stored scan.

    ``raw`` ``(C, I, J, K)`` is the reoriented, cropped *view* of the input in its stored
    dtype (e.g. int16 CT: 2 bytes per voxel instead of float32's 4, and no whole-volume
    normalisation temporaries). :func:`medseg.tiling.extract` gathers a box of ``raw``
    (mirrored where it leaves the image) and :meth:`convert` normalises it; normalisation is
    voxel-wise and mirroring only moves voxels, so the result equals the same box of
    ``preprocess_case(...).image`` bit for bit. Only for cases that need no resampling.
    """

    raw: np.ndarray
    channels: tuple[ChannelPlan, ...]
    #: per channel the record to apply (``normalise``'s; method "none" for a z-score whose
    #: mask was empty, where ``normalise`` returns the values unchanged)
    apply: tuple[dict[str, Any], ...]
    #: per-channel background values of the whole scan, when a ``zscore_nonzero`` channel
    #: needs the foreground mask (``fingerprint.foreground_mask``) of each box
    background: tuple[float, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape)

    @property
    def ndim(self) -> int:
        return int(self.raw.ndim)

    def convert(self, block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Float32 network input for a gathered ``block`` ``(C, ...)`` of ``raw``."""
        if out is None:
            out = np.empty(block.shape, np.float32)
        # slabs along the first axis keep the float temporaries of the arithmetic small
        plane = max(1, int(np.prod(block.shape[2:])))
        step = max(1, LAZY_SLAB_VOXELS // plane)
        for i in range(0, block.shape[1], step):
            part = block[:, i : i + step]
            mask = None
            if self.background is not None:
                mask = np.zeros(part.shape[1:], dtype=bool)
                for c, b in zip(part, self.background, strict=True):
                    mask |= c != b
            for c, (ch, rec) in enumerate(zip(self.channels, self.apply, strict=True)):
                out[c, i : i + step] = apply_normalisation(part[c], ch, rec, nonzero=mask)
        return out

    def materialise(self) -> np.ndarray:
        """The whole float32 image (what ``preprocess_case`` returns)."""
        return self.convert(self.raw)


@dataclass(frozen=True)
class InferenceInput:
    """What inference needs of a case: the network input (lazy or a float32 ``Volume``) and
    the record that puts its prediction back on the scan's grid."""

    image: LazyImage | Volume
    record: CaseRecord


def prepare_for_inference(images: list[Volume], plan: Plan) -> InferenceInput:
    """The network input of one case and the record to restore its prediction with.

    When the plan resamples nothing (target spacing equal to the scan's, up to
    ``resample.is_identity``), a :class:`LazyImage` over the stored scan; otherwise the
    float32 image of :func:`preprocess_case` (resampling needs the whole volume).
    Per-case statistics (``zscore``, ``zscore_nonzero``) are computed here, once, by
    :func:`normalise` itself on each channel in turn; ``ct`` and ``none`` need no pass.
    """
    sources = [_source(v, f"image {i}") for i, v in enumerate(images)]
    arr, grid = _checked_channels(images, plan, sources, keep_dtype=True)
    rgrid = grid
    if plan.orientation is not None:
        rgrid, perm, flips = grid.reoriented(plan.orientation)
        arr = reorient_array(arr, perm, flips)  # a view: tiles gather across the strides

    if not is_identity(rgrid, target_grid(rgrid, plan)):
        prepared = preprocess_case(images, plan)
        return InferenceInput(prepared.image, prepared.record)
    mask = foreground_mask(arr)
    box = box_of(mask) if plan.crop_to_nonzero else Box.from_shape(rgrid.shape)
    cgrid = rgrid.crop(box)
    target = target_grid(cgrid, plan)
    if not is_identity(cgrid, target):  # pragma: no cover - spacing is crop-invariant
        prepared = preprocess_case(images, plan)
        return InferenceInput(prepared.image, prepared.record)
    raw = arr[(slice(None), *box.slices())]
    nonzero = mask[box.slices()]
    records, apply = [], []
    background = None
    for c, ch in enumerate(plan.channels):
        # statistics need the whole channel; voxel-wise methods record the plan's values only
        if ch.normalisation in ("zscore", "zscore_nonzero"):
            # the float32 channel laid out as preprocess_case's (contiguous, then cropped), so
            # the mean/std reductions run in the same order and round the same way
            whole = np.ascontiguousarray(arr[c], dtype=np.float32)
            _, rec = normalise(whole[box.slices()], ch, nonzero=nonzero)
            del whole
        else:
            _, rec = normalise(raw[c, :1, :1, :1], ch, nonzero=nonzero[:1, :1, :1])
        records.append(rec)
        if ch.normalisation == "zscore_nonzero" and not nonzero.any():
            apply.append({"channel": ch.name, "method": "none"})
        else:
            apply.append(rec)
        if ch.normalisation == "zscore_nonzero":
            background = tuple(background_values(arr))
    del mask, nonzero
    record = CaseRecord(grid, plan.orientation, box, cgrid, target, records, sources)
    return InferenceInput(LazyImage(raw, tuple(plan.channels), tuple(apply), background), record)


def prepare_instances(instances: Volume, record: CaseRecord) -> np.ndarray:
    """An instance-id map on the scan's grid -> ``(I, J, K)`` on the preprocessed grid.

    Same reorientation and crop as ``preprocess_case``; nearest neighbour so ids stay ids.
    """
    arr, _ = _reorient(instances.array, record.original_grid, record.orientation)
    arr = arr[(slice(None), *record.crop_box.slices())]
    return resample_array(arr, record.cropped_grid, record.grid, order=0, label=True)[0]


def _inside_crop(record: CaseRecord) -> np.ndarray:
    """Boolean ``(I, J, K)`` on the original grid: voxels inside the cropped region."""
    target = record.original_grid
    amap = axis_map(record.cropped_grid, target)
    if amap is None:  # pragma: no cover - crops are axis-aligned by construction
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in target.shape], indexing="ij"), -1)
        c = record.cropped_grid.index(target.world(ijk))
        n = np.asarray(record.cropped_grid.shape)
        return np.all((c > -0.5 - 1e-4) & (c < n - 0.5 + 1e-4), axis=-1)
    masks = []
    for t in range(3):
        size = record.cropped_grid.shape[amap.perm[t]]
        x = amap.coords(t, target.shape[t])
        masks.append((x > -0.5 - 1e-4) & (x < size - 0.5 + 1e-4))
    return masks[0][:, None, None] & masks[1][None, :, None] & masks[2][None, None, :]


def _as3d(a: np.ndarray, grid: Grid, what: str) -> np.ndarray:
    if a.shape[-3:] == grid.shape:
        return a
    if a.shape[-2:] == grid.shape[:2] and grid.shape[2] == 1:
        return a[..., None]
    raise GeometryError(f"{what} shape {a.shape} does not match the preprocessed grid {grid.shape}")


def restore_labels(classes: np.ndarray, record: CaseRecord) -> np.ndarray:
    """Class indices on the preprocessed grid -> ``(I, J, K)`` on the scan's own grid.

    One nearest-neighbour resample through world coordinates; outside the crop is class 0.
    A 2D ``(I, J)`` input gives ``(I, J, 1)``.
    """
    c = _as3d(np.asarray(classes), record.grid, "classes")
    out = resample_array(c[None], record.grid, record.original_grid, order=0, label=True)[0]
    return _background_outside_crop(out, record)


def _background_outside_crop(out: np.ndarray, record: CaseRecord) -> np.ndarray:
    """Class 0 wherever the scan's grid ``out`` (``(I, J, K)``) lies outside the crop."""
    amap = axis_map(record.cropped_grid, record.original_grid)
    if amap is None:  # pragma: no cover - crops are axis-aligned by construction
        out[~_inside_crop(record)] = 0
        return out
    # the crop is a box on the original grid: zero the slabs outside it, axis by axis, without
    # whole-volume boolean masks (2 bytes per voxel at the peak of inference)
    for t in range(3):
        size = record.cropped_grid.shape[amap.perm[t]]
        x = amap.coords(t, out.shape[t])
        outside = ~((x > -0.5 - 1e-4) & (x < size - 0.5 + 1e-4))
        out[(slice(None),) * t + (outside,)] = 0
    return out


def restore_classes(
    probs: np.ndarray | SparseProbabilities,
    record: CaseRecord,
    dtype: Any = np.int8,
    classes: Sequence[int] | None = None,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """``(C, I, J, K)`` probabilities on the preprocessed grid -> class indices ``(I, J, K)``
    on the scan's own grid: the argmax of :func:`restore_probabilities`, interpolated only
    where the preprocessed grid's argmax changes (``resample.resample_argmax``; no float
    volume of the scan is made).

    ``classes``: restore only these (background always); e.g. the classes the preprocessed
    grid's argmax contains, so that a many-class model pays for the structures a scan shows.
    ``labels``: that argmax on the preprocessed grid, if already known (required with
    :class:`~medseg.preprocess.resample.SparseProbabilities`, the boundary voxels' only).
    """
    p = (
        probs
        if isinstance(probs, SparseProbabilities)
        else _as3d(probs, record.grid, "probabilities")
    )
    lab = None if labels is None else _as3d(np.asarray(labels), record.grid, "classes")
    out = resample_argmax(
        p, record.grid, record.original_grid, labels=lab, classes=classes, dtype=dtype
    )
    return _background_outside_crop(out, record)


def restore_resamples(record: CaseRecord) -> bool:
    """True when going back to the scan's grid resamples (a spacing differs, or the grids are
    not aligned axis by axis), not only crops, flips or permutes.

    Such cases take their labels from the linearly restored probabilities
    (:func:`restore_classes`), as nnU-Net exports its resampled predictions (Isensee et al.
    2021), rather than by nearest neighbour from the plan grid's argmax:
    - restoring onto a coarser grid, nearest neighbour keeps one of several plan voxels per
      scan voxel; at a 2:1 ratio always the same one of two, so with a 2x finer plan DRIVE's
      vessels moved a quarter pixel towards higher indices on both axes, in every image;
    - restoring onto a finer grid, it copies blocks: BraTS reference labels taken to 2 mm and
      back keep a whole-tumour Dice of 0.948-0.975 by nearest neighbour and 0.965-0.991 from
      the linearly restored fractions (five cases).
    """
    amap = axis_map(record.grid, record.original_grid)
    if amap is None:
        return True
    scaled = any(abs(abs(s) - 1.0) > 1e-6 for s in amap.scale)
    return scaled or any(abs(o - round(o)) > 1e-6 for o in amap.offset)


def restore_probabilities(probs: np.ndarray, record: CaseRecord) -> np.ndarray:
    """``(C, I, J, K)`` probabilities on the preprocessed grid -> the scan's own grid (linear).

    Outside the crop the background (channel 0) has probability 1.
    """
    p = _as3d(np.asarray(probs, dtype=np.float32), record.grid, "probabilities")
    out = resample_array(p, record.grid, record.original_grid, order=1)
    outside = ~_inside_crop(record)
    out[:, outside] = 0.0
    out[0, outside] = 1.0
    return out
