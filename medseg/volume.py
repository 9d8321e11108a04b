"""Geometry core: ``Grid`` (where voxels are), ``Box`` (which voxels), ``Volume`` (array + grid).

World coordinates are RAS+ millimetres as nibabel uses them. Arrays are ``(C, I, J, K)``;
2D images are grids with ``K == 1``. ``affine`` maps ``(i, j, k, 1)`` to ``(x, y, z, 1)``.
numpy only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medseg.errors import GeometryError

#: Axis code of the positive direction of each RAS+ world axis, and of the negative one.
_POS = ("R", "A", "S")
_NEG = ("L", "P", "I")
_CODE_TO_AXIS = {c: (i, 1) for i, c in enumerate(_POS)} | {c: (i, -1) for i, c in enumerate(_NEG)}

#: DICOM's and ITK's LPS+ world <-> RAS+ world: x and y change sign, z stays. Its own inverse,
#: so ``LPS_TO_RAS @ affine_lps`` is the RAS+ affine and ``LPS_TO_RAS @ affine`` the LPS+ one.
#: Every reader and writer of an LPS format converts with this matrix, once, at the file.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
LPS_TO_RAS.setflags(write=False)

#: Two grids are "the same grid" when their corner voxel centres lie within this distance
#: (mm): image, label and extras of one case, prediction and reference, channels of a scan.
#: 0.01 mm is 1 % of a 1 mm voxel and 1/20 of the finest clinical voxels (~0.2 mm), so grids
#: that pass sample the same anatomy; it is also well above what files round positions to:
#: DICOM writes positions as decimal strings, often with 3-4 decimals (up to 5e-4 mm per
#: coordinate, more once spacing rounding adds up over hundreds of slices), and a NIfTI
#: header holds its affine in float32 (about 6e-8 relative; a quaternion qform near a
#: 180-degree rotation loses more, ~1e-5 relative, i.e. ~3e-3 mm over a 300 mm field of
#: view). A 1e-3 mm tolerance rejects the same scan stored two ways; the DICOM reader groups
#: slice positions with the same 0.01 mm.
GRID_ATOL_MM = 1e-2


def _as_affine(affine: Any) -> np.ndarray:
    a = np.array(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise GeometryError(f"affine must be 4x4, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise GeometryError("affine contains NaN or infinite values")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise GeometryError("affine is singular (a zero-length or collinear voxel axis)")
    a.setflags(write=False)
    return a


def axis_codes(affine: np.ndarray) -> tuple[str, str, str]:
    """Closest orientation codes (e.g. ``("L","P","S")``) of a 4x4 affine's voxel axes.

    Same rule as nibabel's ``io_orientation``: the column directions are first made
    orthogonal (polar part of their SVD), then the voxel axes, most decisive first, each take
    the world axis they are most aligned with among those still free.
    """
    rs = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    u, _, vt = np.linalg.svd(rs)
    r = u @ vt
    codes = ["", "", ""]
    for v in np.argsort(-np.max(r**2, axis=0), kind="stable"):
        col = r[:, v]
        w = int(np.argmax(np.abs(col)))
        codes[v] = _POS[w] if col[w] >= 0 else _NEG[w]
        r[w, :] = 0.0
    return (codes[0], codes[1], codes[2])


def _check_codes(codes: tuple[str, ...] | str) -> tuple[str, str, str]:
    cs = tuple(c.upper() for c in codes)
    if len(cs) != 3 or any(c not in _CODE_TO_AXIS for c in cs):
        raise GeometryError(f"orientation {codes!r} must be three of R/L, A/P, S/I")
    if len({_CODE_TO_AXIS[c][0] for c in cs}) != 3:
        raise GeometryError(f"orientation {codes!r} names a world axis twice")
    return (cs[0], cs[1], cs[2])


@dataclass(frozen=True)
class Box:
    """Half-open voxel box: ``start`` inclusive, ``stop`` exclusive, one entry per axis."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", tuple(int(s) for s in self.start))
        object.__setattr__(self, "stop", tuple(int(s) for s in self.stop))
        if len(self.start) != len(self.stop):
            raise GeometryError(f"box start {self.start} and stop {self.stop} differ in length")
        if any(b < a for a, b in zip(self.start, self.stop, strict=True)):
            raise GeometryError(f"box stop {self.stop} lies before start {self.start}")

    @classmethod
    def from_shape(cls, shape: tuple[int, ...]) -> Box:
        """The box covering a whole array of ``shape``."""
        return cls(tuple(0 for _ in shape), tuple(shape))

    @property
    def ndim(self) -> int:
        return len(self.start)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def grow(self, margin: int | tuple[int, ...]) -> Box:
        """Grow by ``margin`` voxels on each side (per axis when a tuple); may leave the array."""
        m = (margin,) * self.ndim if isinstance(margin, int) else tuple(margin)
        return Box(
            tuple(a - g for a, g in zip(self.start, m, strict=True)),
            tuple(b + g for b, g in zip(self.stop, m, strict=True)),
        )

    def shift(self, offset: tuple[int, ...]) -> Box:
        """Translate by ``offset`` voxels."""
        return Box(
            tuple(a + o for a, o in zip(self.start, offset, strict=True)),
            tuple(b + o for b, o in zip(self.stop, offset, strict=True)),
        )

    def intersect(self, other: Box) -> Box:
        """Common part of two boxes (empty boxes have ``stop == start`` on some axis)."""
        start = tuple(max(a, b) for a, b in zip(self.start, other.start, strict=True))
        stop = tuple(
            max(s, min(a, b)) for s, a, b in zip(start, self.stop, other.stop, strict=True)
        )
        return Box(start, stop)

    def clip_to(self, shape: tuple[int, ...]) -> Box:
        """Intersect with the array ``[0, shape)``."""
        return self.intersect(Box.from_shape(shape))

    def contains(self, other: Box) -> bool:
        return all(a <= c for a, c in zip(self.start, other.start, strict=True)) and all(
            d <= b for b, d in zip(self.stop, other.stop, strict=True)
        )

    def is_empty(self) -> bool:
        return any(s == 0 for s in self.shape)

    def slices(self) -> tuple[slice, ...]:
        """Slices selecting the box from an array (the box must lie inside the array)."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))


@dataclass(frozen=True, eq=False)
class Grid:
    """Voxel grid in the world: ``shape`` ``(I, J, K)`` and a 4x4 voxel-to-RAS+-mm ``affine``."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or any(s < 1 for s in shape):
            raise GeometryError(f"grid shape must be three positive sizes, got {self.shape}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "affine", _as_affine(self.affine))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Grid)
            and self.shape == other.shape
            and bool(np.array_equal(self.affine, other.affine))
        )

    def __hash__(self) -> int:
        return hash((self.shape, self.affine.tobytes()))

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing)
        return f"Grid(shape={self.shape}, spacing=({sp}), orientation={''.join(self.orientation)})"

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_spacing(
        cls,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
        origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
        direction: np.ndarray | None = None,
    ) -> Grid:
        """Grid from spacing (mm), origin (mm, centre of voxel 0) and 3x3 direction columns."""
        d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
        a = np.eye(4)
        a[:3, :3] = d * np.asarray(spacing, dtype=np.float64)[None, :]
        a[:3, 3] = origin
        return cls(shape, a)

    # -- derived properties ------------------------------------------------------------------
    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along I, J, K (column norms of the affine)."""
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(s[0]), float(s[1]), float(s[2]))

    @property
    def origin(self) -> tuple[float, float, float]:
        """World position (RAS+ mm) of the centre of voxel ``(0, 0, 0)``."""
        o = self.affine[:3, 3]
        return (float(o[0]), float(o[1]), float(o[2]))

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit world directions of the voxel axes."""
        return self.affine[:3, :3] / np.asarray(self.spacing)[None, :]

    @property
    def orientation(self) -> tuple[str, str, str]:
        """Closest axis codes, e.g. ``("R","A","S")``."""
        return axis_codes(self.affine)

    @property
    def is_oblique(self) -> bool:
        """True when some voxel axis is more than 1e-4 off its closest world axis."""
        d = np.abs(self.direction)
        return bool(np.any((d > 1e-4) & (d < 1 - 1e-4)))

    # -- coordinates -------------------------------------------------------------------------
    def world(self, ijk: Any) -> np.ndarray:
        """World RAS+ mm of voxel coordinates ``(..., 3)`` (fractional indices allowed)."""
        p = np.asarray(ijk, dtype=np.float64)
        return p @ self.affine[:3, :3].T + self.affine[:3, 3]

    def index(self, xyz: Any) -> np.ndarray:
        """Fractional voxel coordinates ``(..., 3)`` of world RAS+ mm points."""
        p = np.asarray(xyz, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return p @ inv[:3, :3].T + inv[:3, 3]

    def corners(self) -> np.ndarray:
        """World positions of the 8 corner voxel centres, ``(8, 3)``."""
        idx = np.array(list(itertools.product(*[(0, n - 1) for n in self.shape])), dtype=float)
        return self.world(idx)

    # -- derived grids -----------------------------------------------------------------------
    def crop(self, box: Box) -> Grid:
        """Grid of the sub-array ``box`` (must lie inside this grid)."""
        if box.ndim != 3 or not Box.from_shape(self.shape).contains(box) or box.is_empty():
            raise GeometryError(f"crop box {box} does not lie inside grid shape {self.shape}")
        return self._sub(box)

    def pad(self, box: Box) -> Grid:
        """Grid of an array covering ``box``, which may extend beyond this grid on any side."""
        if box.ndim != 3 or box.is_empty():
            raise GeometryError(f"pad box {box} must be a non-empty 3D box")
        return self._sub(box)

    def _sub(self, box: Box) -> Grid:
        a = self.affine.copy()
        a[:3, 3] = self.world(box.start)
        return Grid((box.shape[0], box.shape[1], box.shape[2]), a)

    def reoriented(
        self, codes: tuple[str, ...] | str
    ) -> tuple[Grid, tuple[int, int, int], tuple[bool, bool, bool]]:
        """This grid with its axes permuted and flipped to the closest match of ``codes``.

        Returns ``(grid, perm, flips)``: new axis ``t`` is old axis ``perm[t]``, reversed where
        ``flips[t]``. Apply to an array with :func:`reorient_array`. World positions of voxel
        centres are unchanged (only their indices move).
        """
        target = _check_codes(codes)
        current = self.orientation
        cur_axis = [_CODE_TO_AXIS[c] for c in current]
        perm_l: list[int] = []
        flips_l: list[bool] = []
        for code in target:
            w, sign = _CODE_TO_AXIS[code]
            i = next(i for i, (cw, _) in enumerate(cur_axis) if cw == w)
            perm_l.append(i)
            flips_l.append(cur_axis[i][1] != sign)
        perm = (perm_l[0], perm_l[1], perm_l[2])
        flips = (flips_l[0], flips_l[1], flips_l[2])
        a = np.eye(4)
        origin = self.affine[:3, 3].copy()
        shape = []
        for t, (i, f) in enumerate(zip(perm, flips, strict=True)):
            col = self.affine[:3, i]
            n = self.shape[i]
            shape.append(n)
            if f:
                origin = origin + col * (n - 1)
                col = -col
            a[:3, t] = col
        a[:3, 3] = origin
        return Grid((shape[0], shape[1], shape[2]), a), perm, flips

    def with_spacing(self, spacing: tuple[float, ...]) -> Grid:
        """Grid with voxel size ``spacing`` (mm) covering the same physical extent.

        Outer voxel edges are kept aligned (as SimpleITK and nnU-Net do): the new shape is
        ``round(shape * old / new)`` and the first voxel centre moves by half the size change.
        Axes of size 1 (2D images) keep their size and spacing.
        """
        if len(spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing):
            raise GeometryError(f"target spacing {spacing} must be three positive sizes in mm")
        old = np.asarray(self.spacing)
        new = np.array(
            [o if n == 1 else float(s) for o, s, n in zip(old, spacing, self.shape, strict=True)]
        )
        shape = tuple(
            1 if n == 1 else max(1, int(round(n * o / s)))
            for n, o, s in zip(self.shape, old, new, strict=True)
        )
        d = self.direction
        a = np.eye(4)
        a[:3, :3] = d * new[None, :]
        a[:3, 3] = self.affine[:3, 3] + d @ ((new - old) / 2.0)
        return Grid((shape[0], shape[1], shape[2]), a)

    # -- comparison --------------------------------------------------------------------------
    def max_corner_distance(self, other: Grid) -> float:
        """Largest world distance (mm) between corresponding corner voxel centres."""
        if self.shape != other.shape:
            return float("inf")
        return float(np.max(np.linalg.norm(self.corners() - other.corners(), axis=1)))

    def allclose(self, other: Grid, atol_mm: float = GRID_ATOL_MM) -> bool:
        """Same shape and every corner voxel centre within ``atol_mm``."""
        return self.shape == other.shape and self.max_corner_distance(other) <= atol_mm

    def check_same(self, other: Grid, atol_mm: float, what: str) -> None:
        """Raise ``GeometryError`` naming ``what`` and the mm difference unless grids agree."""
        if self.shape != other.shape:
            raise GeometryError(f"{what}: grid shapes differ, {self.shape} vs {other.shape}")
        d = self.max_corner_distance(other)
        if d > atol_mm:
            raise GeometryError(
                f"{what}: grids differ by up to {d:.4g} mm (tolerance {atol_mm:g} mm)"
            )

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "affine": self.affine.tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Grid:
        return cls(tuple(d["shape"]), np.array(d["affine"]))  # type: ignore[arg-type]


def reorient_array(
    array: np.ndarray, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]
) -> np.ndarray:
    """Apply a ``Grid.reoriented`` permutation to a ``(C, I, J, K)`` array (a view)."""
    out = np.transpose(array, (0, 1 + perm[0], 1 + perm[1], 1 + perm[2]))
    for t, f in enumerate(flips):
        if f:
            out = np.flip(out, axis=1 + t)
    return out


def drop_singleton_k(array: np.ndarray) -> np.ndarray:
    """``(..., I, J, 1)`` -> ``(..., I, J)`` (a view): a 2D grid's array as the 2D image it
    is, for 2D metrics, overlays and image files. Arrays with ``K > 1`` come back unchanged."""
    return array[..., 0] if array.shape[-1] == 1 else array


def add_singleton_k(array: np.ndarray, shape: tuple[int, int, int], what: str) -> np.ndarray:
    """``(..., I, J)`` -> ``(..., I, J, 1)`` (a view) when ``shape`` ``(I, J, K)`` is a 2D grid
    (``K == 1``); ``(..., I, J, K)`` arrays matching ``shape`` come back unchanged. The inverse
    of :func:`drop_singleton_k`; ``GeometryError`` naming ``what`` for any other shape."""
    if tuple(array.shape[-3:]) == tuple(shape):
        return array
    if tuple(array.shape[-2:]) == tuple(shape[:2]) and shape[2] == 1:
        return array[..., None]
    raise GeometryError(f"{what} shape {array.shape} does not match the grid {tuple(shape)}")


@dataclass
class Volume:
    """A ``(C, I, J, K)`` array with the ``Grid`` that places it in the world."""

    array: np.ndarray
    grid: Grid
    is_label: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 4:
            raise GeometryError(f"volume array must be (C, I, J, K), got shape {self.array.shape}")
        if tuple(self.array.shape[1:]) != self.grid.shape:
            raise GeometryError(
                f"volume array shape {self.array.shape[1:]} does not match grid {self.grid.shape}"
            )
        if self.is_label and not np.issubdtype(self.array.dtype, np.integer):
            raise GeometryError(f"label volume must have an integer dtype, got {self.array.dtype}")

    @property
    def affine(self) -> np.ndarray:
        return self.grid.affine

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    @property
    def channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.grid.spacing

    @property
    def origin(self) -> tuple[float, float, float]:
        return self.grid.origin

    @property
    def direction(self) -> np.ndarray:
        return self.grid.direction

    @property
    def orientation(self) -> tuple[str, str, str]:
        return self.grid.orientation

    def with_array(self, array: np.ndarray, *, is_label: bool | None = None) -> Volume:
        """Same grid and meta, new ``(C, I, J, K)`` array."""
        return Volume(
            array, self.grid, self.is_label if is_label is None else is_label, dict(self.meta)
        )

    def crop(self, box: Box) -> Volume:
        """Sub-volume inside ``box`` (voxel box over I, J, K)."""
        grid = self.grid.crop(box)
        return Volume(
            self.array[(slice(None), *box.slices())], grid, self.is_label, dict(self.meta)
        )

    def reoriented(self, codes: tuple[str, ...] | str) -> Volume:
        """Axes permuted and flipped to ``codes``; world positions of voxels unchanged."""
        grid, perm, flips = self.grid.reoriented(codes)
        arr = np.ascontiguousarray(reorient_array(self.array, perm, flips))
        return Volume(arr, grid, self.is_label, dict(self.meta))


def nonfinite_voxels(array: np.ndarray) -> list[tuple[int, int]]:
    """``(NaN count, infinite count)`` of each channel of a ``(C, I, J, K)`` array; zeros for
    integer arrays, which cannot hold either."""
    if not np.issubdtype(array.dtype, np.inexact):
        return [(0, 0)] * array.shape[0]
    return [(int(np.count_nonzero(np.isnan(a))), int(np.count_nonzero(np.isinf(a)))) for a in array]


def describe_nonfinite(array: np.ndarray) -> str | None:
    """One phrase naming the channels with NaN or infinite voxels (``"channel 0: 3 NaN, 1
    infinite voxels"``), or None when every voxel is finite."""
    parts = [
        f"channel {c}: {nan} NaN, {inf} infinite voxels"
        for c, (nan, inf) in enumerate(nonfinite_voxels(array))
        if nan or inf
    ]
    return "; ".join(parts) if parts else None
