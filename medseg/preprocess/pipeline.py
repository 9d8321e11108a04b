"""The one preprocessing function shared by ``preprocess``, training and ``infer``.

``preprocess_case`` takes a case's channel volumes (and label) on the scan's own grid and
returns them on the plan's grid: reoriented (exact axis permutation and flips), cropped to the
non-zero box, normalised per channel, resampled to the target spacing. ``CaseRecord`` keeps the
grids, crop box and normalisation, so ``restore_labels`` / ``restore_probabilities`` put a
prediction back on the scan's own grid with one resample through world coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.errors import GeometryError, ReadError
from medseg.preprocess.fingerprint import (
    background_values,
    box_of,
    foreground_mask,
    stack_channels,
)
from medseg.preprocess.normalise import apply_normalisation, normalise
from medseg.preprocess.plan import ChannelPlan, Plan
from medseg.resample import is_identity, resample_array
from medseg.volume import GRID_ATOL_MM, Box, Grid, Volume, reorient_array

#: Image interpolation order in-plane, and along an axis this many times coarser than the
#: finest (through-plane of anisotropic scans, where cubic overshoots between distant slices).
IMAGE_ORDER = 3
THROUGH_PLANE_ORDER = 1
ANISOTROPY_RATIO = 3.0
#: Labels: nearest neighbour (see ``medseg.resample`` for why not one-hot linear).
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


def _reorient(
    arr: np.ndarray, grid: Grid, codes: tuple[str, str, str] | None, *, contiguous: bool = True
) -> tuple[np.ndarray, Grid]:
    """``arr`` ``(C, I, J, K)`` and ``grid`` reoriented to ``codes`` (None keeps them); a
    contiguous copy, or with ``contiguous=False`` a view."""
    if codes is None:
        return arr, grid
    new, perm, flips = grid.reoriented(codes)
    out = reorient_array(arr, perm, flips)
    return (np.ascontiguousarray(out) if contiguous else out), new


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
    """Bring one case onto the plan's grid (see module docstring): the float32 image and, with
    ``label``, its int16 classes, as training and the cache store them.

    ``images``: one volume per file, channels concatenated in order must match the plan's.
    Raises ``ReadError`` for NaN voxels, ``GeometryError`` for grids that differ, ``PlanError``
    for undeclared label values; each message names the file.
    """
    image, lab, record = _prepare(images, plan, label, lazy=False, threads=threads)
    assert isinstance(image, Volume)
    return PreparedCase(image, lab, record)


def _label_classes(
    label: Volume | None, grid: Grid, plan: Plan, sources: list[str]
) -> tuple[np.ndarray | None, str]:
    """The label's class indices ``(1, I, J, K)`` on the image grid (checked), and its name."""
    if label is None:
        return None, ""
    lsrc = _source(label, "label")
    grid.check_same(label.grid, GRID_ATOL_MM, f"{lsrc} vs {sources[0]}")
    if label.array.shape[0] != 1:
        raise GeometryError(f"{lsrc}: label has {label.array.shape[0]} channels, expected 1")
    return plan.labels_to_classes(label.array, source=lsrc), lsrc


def _prepare(
    images: list[Volume],
    plan: Plan,
    label: Volume | None,
    *,
    lazy: bool,
    threads: int | None,
) -> tuple[LazyImage | Volume, Volume | None, CaseRecord]:
    """The one prepare path: check, reorient, crop to the non-zero box, normalise, resample.

    ``lazy``: when the plan resamples nothing, the image is a :class:`LazyImage` over the
    stored scan (normalised tile by tile later); otherwise, and always without ``lazy``, the
    float32 image on the plan's grid. Returns the image, the label's classes (int16, with
    ``label``) and the record that restores a prediction.
    """
    sources = [_source(v, f"image {i}") for i, v in enumerate(images)]
    arr, grid = _checked_channels(images, plan, sources, keep_dtype=lazy)
    classes, lsrc = _label_classes(label, grid, plan, sources)
    rgrid = grid if plan.orientation is None else grid.reoriented(plan.orientation)[0]
    lazy = lazy and is_identity(rgrid, target_grid(rgrid, plan))
    if not lazy:  # resampling and whole-volume normalisation work on float32
        arr = arr.astype(np.float32, copy=False)
    # lazy: a view, tiles gather across the strides; otherwise one contiguous copy
    arr, _ = _reorient(arr, grid, plan.orientation, contiguous=not lazy)
    if classes is not None:
        classes, _ = _reorient(classes, grid, plan.orientation)
    # The mask comes from the whole scan: its corners tell the background value.
    mask = foreground_mask(arr)
    box = box_of(mask) if plan.crop_to_nonzero else Box.from_shape(rgrid.shape)
    cgrid = rgrid.crop(box)
    target = target_grid(cgrid, plan)
    raw = arr[(slice(None), *box.slices())]
    nonzero = mask[box.slices()]
    image: LazyImage | Volume
    if lazy:
        image, records = _lazy_image(arr, raw, box, nonzero, plan)
    else:
        normed, records = _normalised(raw, nonzero, plan)
        out = resample_array(
            normed, cgrid, target, order=image_orders(cgrid.spacing), threads=threads
        )
        image = Volume(out.astype(np.float32, copy=False), target, False, {"sources": sources})
    lab_vol = None
    if classes is not None:
        classes = classes[(slice(None), *box.slices())]
        classes = resample_array(
            classes, cgrid, target, order=LABEL_ORDER, label=True, threads=threads
        )
        lab_vol = Volume(classes.astype(np.int16), target, True, {"source": lsrc})
    record = CaseRecord(grid, plan.orientation, box, cgrid, target, records, sources)
    return image, lab_vol, record


def _normalised(
    raw: np.ndarray, nonzero: np.ndarray, plan: Plan
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Every channel of the cropped float32 ``raw`` normalised, and what was applied."""
    normed, records = [], []
    for c, ch in enumerate(plan.channels):
        a, rec = normalise(raw[c], ch, nonzero=nonzero)
        normed.append(a)
        records.append(rec)
    return np.stack(normed), records


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
    image, _, record = _prepare(images, plan, None, lazy=True, threads=None)
    return InferenceInput(image, record)


def _lazy_image(
    arr: np.ndarray, raw: np.ndarray, box: Box, nonzero: np.ndarray, plan: Plan
) -> tuple[LazyImage, list[dict[str, Any]]]:
    """The :class:`LazyImage` over ``raw`` (the cropped view of the reoriented scan ``arr``)
    and the normalisation records, with the statistics ``preprocess_case`` would compute."""
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
    lazy = LazyImage(raw, tuple(plan.channels), tuple(apply), background)
    return lazy, records


def prepare_instances(instances: Volume, record: CaseRecord) -> np.ndarray:
    """An instance-id map on the scan's grid -> ``(I, J, K)`` on the preprocessed grid.

    Same reorientation and crop as ``preprocess_case``; nearest neighbour so ids stay ids.
    """
    arr, _ = _reorient(instances.array, record.original_grid, record.orientation)
    arr = arr[(slice(None), *record.crop_box.slices())]
    return resample_array(arr, record.cropped_grid, record.grid, order=0, label=True)[0]
