"""Spacing-aware segmentation metrics on boolean masks of any dimension (numpy/scipy only).

Masks are boolean arrays indexed like the volume (``(I, J, K)`` for 3D, ``(I, J)`` for 2D);
``spacing`` gives one voxel size in mm per array axis. Distances are in mm, volumes in mL.

Definitions (one per metric):

- **Dice** ``2|P∩R| / (|P|+|R|)``; **IoU** (Jaccard) ``|P∩R| / |P∪R|``;
  **precision** ``|P∩R| / |P|``; **recall** (sensitivity) ``|P∩R| / |R|``.
- **Volume** ``voxels * prod(spacing) / 1000`` mL; ``volume_diff_ml = pred - ref``.
- **Boundary** (HD, HD95, ASSD): the voxels of a mask with at least one background face
  neighbour (``mask XOR binary_erosion(mask)`` with face connectivity, outside the array counts
  as background), as in MONAI ``get_mask_edges``. Each boundary voxel's distance is the
  Euclidean distance in mm (``spacing``-scaled index offsets) to the nearest boundary voxel of
  the other mask.
- **HD** = max of both directed maxima; **HD95** = max of the two directed 95th percentiles,
  each the linearly interpolated percentile of that direction's distances. This is MONAI's
  ``compute_hausdorff_distance(..., percentile=95, spacing=...)`` including its float32
  arithmetic (distances rounded to float32, percentile rank ``float32(0.95) * (n - 1)``), so
  the two agree to the last float32 bit.
- **ASSD** = mean of all boundary distances of both directions pooled, as MONAI's
  ``compute_average_surface_distance(symmetric=True)``.
- **NSD** (normalised surface Dice at ``tolerance_mm``) as DeepMind's ``surface-distance``
  (Nikolov et al. 2021, arXiv:1809.04430): the surfaces are the marching-cubes (3D) or
  marching-squares (2D) elements on the lattice of voxel corners, each weighted by its area
  (length in 2D); NSD = area of both surfaces within ``tolerance_mm`` of the other surface /
  total area of both.
- **Adapted Rand error** (ISBI 2012 EM challenge, Arganda-Carreras et al. 2015) via
  ``skimage.metrics.adapted_rand_error`` on label images.

Empty masks: both empty -> Dice/IoU/precision/recall 1, HD/HD95/ASSD 0, NSD 1; exactly one
empty -> Dice/IoU 0, the distances ``inf`` and NSD 0 (precision of an empty prediction is 0,
recall of an empty reference is 0 when the prediction is not empty). No metric returns NaN.

Speed: everything is computed in the bounding box of both masks grown by one voxel; distances
are nearest-neighbour queries of boundary points in a KD-tree of the other boundary (boundary
points shared by both masks have distance 0 and skip the query), so the cost follows the
surface, not the scan.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

METRIC_NAMES = (
    "dice",
    "iou",
    "precision",
    "recall",
    "hd",
    "hd95",
    "assd",
    "nsd",
    "vol_ref_ml",
    "vol_pred_ml",
    "vol_diff_ml",
)
#: Metrics where larger is better (the others: smaller is better, or no direction for volumes).
HIGHER_IS_BETTER = {"dice": True, "iou": True, "precision": True, "recall": True, "nsd": True}
HIGHER_IS_BETTER |= {"hd": False, "hd95": False, "assd": False}


# -- input checks ------------------------------------------------------------------------------
def _masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred).astype(bool, copy=False)
    r = np.asarray(ref).astype(bool, copy=False)
    if p.shape != r.shape:
        raise ValueError(f"pred shape {p.shape} differs from ref shape {r.shape}")
    if p.ndim == 0:
        raise ValueError("masks must have at least one axis")
    return p, r


def _spacing(spacing: float | Sequence[float], ndim: int) -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if s.size == 1:
        s = np.repeat(s, ndim)
    if s.size != ndim or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing {spacing} must give {ndim} positive sizes in mm")
    return s


# -- overlap metrics -----------------------------------------------------------------------------
def _counts(p: np.ndarray, r: np.ndarray) -> tuple[int, int, int]:
    """(|P∩R|, |P|, |R|)."""
    return int(np.count_nonzero(p & r)), int(np.count_nonzero(p)), int(np.count_nonzero(r))


def _ratio(num: int, den: int, both_empty: float) -> float:
    return both_empty if den == 0 else num / den


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient ``2|P∩R| / (|P|+|R|)``; 1.0 when both masks are empty."""
    tp, n_p, n_r = _counts(*_masks(pred, ref))
    return _ratio(2 * tp, n_p + n_r, 1.0)


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Intersection over union (Jaccard) ``|P∩R| / |P∪R|``; 1.0 when both are empty."""
    tp, n_p, n_r = _counts(*_masks(pred, ref))
    return _ratio(tp, n_p + n_r - tp, 1.0)


def precision(pred: np.ndarray, ref: np.ndarray) -> float:
    """``|P∩R| / |P|``; 1.0 when both are empty, 0.0 for an empty prediction of a non-empty ref."""
    tp, n_p, n_r = _counts(*_masks(pred, ref))
    return (1.0 if n_r == 0 else 0.0) if n_p == 0 else tp / n_p


def recall(pred: np.ndarray, ref: np.ndarray) -> float:
    """``|P∩R| / |R|`` (sensitivity); 1.0 when both are empty, 0.0 when only ref is empty."""
    tp, n_p, n_r = _counts(*_masks(pred, ref))
    return (1.0 if n_p == 0 else 0.0) if n_r == 0 else tp / n_r


def volume_ml(mask: np.ndarray, spacing: float | Sequence[float]) -> float:
    """Volume of a mask in mL (``voxels * prod(spacing_mm) / 1000``)."""
    m = np.asarray(mask).astype(bool, copy=False)
    return int(np.count_nonzero(m)) * float(np.prod(_spacing(spacing, m.ndim))) / 1000.0


def adapted_rand_error(pred: np.ndarray, ref: np.ndarray) -> float:
    """Adapted Rand error of the ISBI 2012 EM challenge (0 = perfect), via scikit-image.

    ``pred`` and ``ref`` are label images (one id per segment; 0 in ``ref`` is ignored as
    unlabelled). Boolean masks are first turned into segments by labelling the connected
    foreground components (face connectivity), as the challenge does with membrane maps.
    """
    from scipy import ndimage
    from skimage.metrics import adapted_rand_error as _are

    p, r = np.asarray(pred), np.asarray(ref)
    if p.shape != r.shape:
        raise ValueError(f"pred shape {p.shape} differs from ref shape {r.shape}")
    if p.dtype == bool:
        p = ndimage.label(p)[0]
    if r.dtype == bool:
        r = ndimage.label(r)[0]
    if not np.any(r):
        return 0.0 if not np.any(p) else 1.0
    err = float(_are(r.astype(np.int64), p.astype(np.int64))[0])
    return err


# -- geometry shared by the surface metrics --------------------------------------------------
def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tight bounding box of the True voxels, or None for an empty mask."""
    box: list[slice] = []
    m = mask
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        nz = np.flatnonzero(np.any(m, axis=other) if other else m)
        if nz.size == 0:
            return None
        box.append(slice(int(nz[0]), int(nz[-1]) + 1))
        # later projections only need the slab found so far (cheaper on big scans)
        m = m[(slice(None),) * ax + (box[-1],)]
    return tuple(box)


def _ring(spacing: np.ndarray) -> tuple[int, ...]:
    """Zero ring (voxels per axis) around a crop: 1 for the boundary plus the search radius."""
    return tuple(1 + int(math.ceil(_search_mm(spacing) / v)) for v in spacing)


def _search_mm(spacing: np.ndarray) -> float:
    # the local search covers 4 voxels of the finest axis: most boundary points of a decent
    # segmentation find their partner within it; the rest go to the KD-tree (measured in
    # benchmarks/bench_metrics.py: larger radii cost more offsets than they save queries)
    return 4.0 * float(np.min(spacing)) + 1e-9


def _padded_crop(
    p: np.ndarray, r: np.ndarray, ring: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Both masks cropped to the bounding box of their union inside a ring of background.

    The ring (``ring[a]`` voxels on both sides of axis ``a``, at least 1) stands for "outside
    the array is background" (MONAI's erosion with ``border_value=0``, DeepMind's zero
    padding) and keeps local searches inside the array. None when both masks are empty.
    """
    sl = _bbox(p | r)
    if sl is None:
        return None
    shape = tuple(s.stop - s.start + 2 * g for s, g in zip(sl, ring, strict=True))
    inner = tuple(slice(g, n - g) for n, g in zip(shape, ring, strict=True))
    pp = np.zeros(shape, dtype=bool)
    rr = np.zeros(shape, dtype=bool)
    pp[inner] = p[sl]
    rr[inner] = r[sl]
    return pp, rr


def _shift(ndim: int, ax: int, lo: int, hi: int | None) -> tuple[slice, ...]:
    out = [slice(1, -1)] * ndim
    out[ax] = slice(lo, hi)
    return tuple(out)


def _face_boundary(m: np.ndarray) -> np.ndarray:
    """Boundary of a zero-ringed mask: voxels with a background face neighbour (same shape)."""
    nd = m.ndim
    core = m[(slice(1, -1),) * nd]
    interior = core.copy()
    for ax in range(nd):
        interior &= m[_shift(nd, ax, 0, -2)]
        interior &= m[_shift(nd, ax, 2, None)]
    out = np.zeros_like(m)
    out[(slice(1, -1),) * nd] = core & ~interior
    return out


@functools.lru_cache(maxsize=64)
def _search_offsets(spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets within the local search radius, sorted by their length in mm."""
    sp = np.asarray(spacing)
    reach = [int(math.ceil(_search_mm(sp) / v)) for v in sp]
    grids = np.meshgrid(*[np.arange(-g, g + 1) for g in reach], indexing="ij")
    off = np.stack([g.ravel() for g in grids], axis=1)
    dist = _offset_lengths(off, sp)
    keep = dist <= _search_mm(sp)
    order = np.argsort(dist[keep], kind="stable")
    return off[keep][order], dist[keep][order]


def _offset_lengths(off: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """``sqrt(sum((offset * spacing) ** 2))`` summed axis by axis, as scipy's EDT does."""
    sq = off.astype(np.float64) * spacing
    np.multiply(sq, sq, out=sq)
    acc = sq[:, 0].copy()
    for ax in range(1, sq.shape[1]):
        acc += sq[:, ax]
    return np.sqrt(acc)


def _nearest_distances(src: np.ndarray, dst: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm, float64) from every True voxel of ``src`` to the nearest True of ``dst``.

    Order: that of ``np.flatnonzero(src)``. Both arrays carry the ring of :func:`_ring`, so
    every offset of the local search stays inside them. First a local search: offsets in order
    of length, each point resolved by the first offset that lands on ``dst`` (distance 0 for
    shared points); the points it leaves (farther than the radius) are answered exactly by a
    KD-tree of ``dst``. Lengths follow scipy's EDT formula, so ties at a tolerance compare
    exactly as in an EDT-based implementation.
    """
    flat = np.flatnonzero(src)
    out = np.empty(flat.size, dtype=np.float64)
    if flat.size == 0:
        return out
    strides = np.array([st // src.itemsize for st in src.strides], dtype=np.int64)
    offsets, lengths = _search_offsets(tuple(float(v) for v in spacing))
    flat_off = offsets @ strides
    dst_flat = dst.ravel()
    todo = np.arange(flat.size)
    pts = flat
    # a point resolved late costs one gather per offset tried; stop when the KD-tree is cheaper
    budget = 24 * flat.size
    for fo, ln in zip(flat_off.tolist(), lengths.tolist(), strict=True):
        hit = dst_flat[pts + fo]
        if hit.any():
            out[todo[hit]] = ln
            miss = ~hit
            todo, pts = todo[miss], pts[miss]
            if todo.size == 0:
                return out
        budget -= todo.size
        if budget < 0:
            break
    dst_pts = np.stack(np.unravel_index(np.flatnonzero(dst_flat), dst.shape), axis=1)
    q = np.stack(np.unravel_index(pts, src.shape), axis=1)
    tree = cKDTree(dst_pts * spacing, leafsize=32, balanced_tree=False, compact_nodes=False)
    _, nn = tree.query(q * spacing, k=1, workers=-1)
    out[todo] = _offset_lengths(dst_pts[nn] - q, spacing)
    return out


def _torch_quantile_f32(d32: np.ndarray, q: float) -> float:
    """Linear-interpolation quantile with torch.quantile's float32 arithmetic (as MONAI uses)."""
    n = d32.size
    rank = np.float32(np.float32(q) * np.float32(n - 1))
    lo = int(rank)
    hi = min(int(math.ceil(float(rank))), n - 1)
    w = np.float32(rank - np.float32(lo))
    part = np.partition(d32, [lo, hi]) if n > 2 else np.sort(d32)
    a, b = np.float32(part[lo]), np.float32(part[hi])
    # torch's vectorised lerp: one fused multiply-add of (w or w - 1) * (b - a) onto a or b;
    # the float64 product of two float32 values is exact, so one rounding emulates the fma
    small = bool(w < np.float32(0.5))
    coeff = w if small else np.float32(w - np.float32(1.0))
    base = a if small else b
    return float(np.float32(float(base) + float(coeff) * float(np.float32(b - a))))


@dataclass(frozen=True)
class BoundaryDistances:
    """Directed boundary distances (mm, float32 as MONAI reports them) between two masks."""

    pred_to_ref: np.ndarray
    ref_to_pred: np.ndarray

    def hausdorff(self, percentile: float | None = None) -> float:
        """HD (``percentile=None``) or the max of the two directed percentiles (HD95)."""
        if self.pred_to_ref.size == 0 and self.ref_to_pred.size == 0:
            return 0.0
        if self.pred_to_ref.size == 0 or self.ref_to_pred.size == 0:
            return math.inf
        if percentile is None:
            return float(max(self.pred_to_ref.max(), self.ref_to_pred.max()))
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
        q = percentile / 100.0
        return max(
            _torch_quantile_f32(self.pred_to_ref, q), _torch_quantile_f32(self.ref_to_pred, q)
        )

    def assd(self) -> float:
        """Mean of both directions' distances pooled (MONAI symmetric ASD)."""
        n = self.pred_to_ref.size + self.ref_to_pred.size
        if n == 0:
            return 0.0
        if self.pred_to_ref.size == 0 or self.ref_to_pred.size == 0:
            return math.inf
        total = float(np.sum(self.pred_to_ref, dtype=np.float64))
        total += float(np.sum(self.ref_to_pred, dtype=np.float64))
        return total / n


def _boundary_distances_cropped(
    pp: np.ndarray, rr: np.ndarray, spacing: np.ndarray
) -> BoundaryDistances:
    bp, br = _face_boundary(pp), _face_boundary(rr)
    if not bp.any() or not br.any():
        empty = np.zeros(0, dtype=np.float32)
        # one side empty: every boundary point of the other has no partner, distance inf
        n_p, n_r = int(bp.sum()), int(br.sum())
        return BoundaryDistances(
            np.full(n_p, np.inf, np.float32) if n_r == 0 and n_p else empty,
            np.full(n_r, np.inf, np.float32) if n_p == 0 and n_r else empty,
        )
    d_pr = _nearest_distances(bp, br, spacing)
    d_rp = _nearest_distances(br, bp, spacing)
    return BoundaryDistances(d_pr.astype(np.float32), d_rp.astype(np.float32))


def boundary_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: float | Sequence[float]
) -> BoundaryDistances:
    """Directed distances (mm) between the face-connected boundaries of ``pred`` and ``ref``."""
    p, r = _masks(pred, ref)
    s = _spacing(spacing, p.ndim)
    crop = _padded_crop(p, r, _ring(s))
    if crop is None:
        z = np.zeros(0, dtype=np.float32)
        return BoundaryDistances(z, z)
    return _boundary_distances_cropped(*crop, s)


def hausdorff_distance(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: float | Sequence[float],
    percentile: float | None = None,
) -> float:
    """Symmetric Hausdorff distance in mm (``percentile=95``: HD95 as MONAI computes it).

    Both empty -> 0.0; exactly one empty -> ``inf``.
    """
    return boundary_distances(pred, ref, spacing).hausdorff(percentile)


def assd(pred: np.ndarray, ref: np.ndarray, spacing: float | Sequence[float]) -> float:
    """Average symmetric surface distance in mm (MONAI symmetric ASD); 0 / ``inf`` if empty."""
    return boundary_distances(pred, ref, spacing).assd()


# -- DeepMind-style surfels on the lattice of voxel corners --------------------------------------
def _corner_codes(m: np.ndarray) -> np.ndarray:
    """Neighbourhood code of every voxel corner: bit ``b`` set when corner cube voxel ``b`` is in.

    ``m`` is zero-ringed with shape ``n + 2``; the result has shape ``n + 1`` per axis and entry
    ``q`` describes the 2^d voxels ``m[q + delta]``, ``delta`` in {0, 1}^d, bit index
    ``sum(delta[a] << (d - 1 - a))``.
    """
    nd = m.ndim
    shape = tuple(n - 1 for n in m.shape)
    code = np.zeros(shape, dtype=np.uint8)
    for bit, delta in enumerate(np.ndindex(*(2,) * nd)):
        sl = tuple(slice(d, d + n) for d, n in zip(delta, shape, strict=True))
        code |= m[sl].astype(np.uint8) << np.uint8(bit)
    return code


@functools.lru_cache(maxsize=1)
def _unit_cube_triangles() -> tuple[np.ndarray, ...]:
    """Per 3D corner code: ``(T, 3)`` area vectors of its marching-cubes triangles (unit cube).

    Triangles come from scikit-image's classic Lorensen & Cline (1987) table. A configuration
    with more than four voxels inside uses the triangles of its complement, so every code and its
    complement carry the same surface; this is the convention of DeepMind's surfel table.
    """
    from skimage.measure import marching_cubes

    out: list[np.ndarray] = [np.zeros((0, 3))] * 256
    deltas = list(np.ndindex(2, 2, 2))
    for code in range(1, 255):
        inside = [bool(code >> b & 1) for b in range(8)]
        if sum(inside) > 4:
            inside = [not v for v in inside]
        cube = np.zeros((2, 2, 2))
        for b, d in enumerate(deltas):
            cube[d] = float(inside[b])
        verts, faces, _, _ = marching_cubes(cube, 0.5, method="lorensen")
        tri = verts[faces]
        out[code] = 0.5 * np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _surfel_area_table(spacing: tuple[float, ...]) -> np.ndarray:
    """Area (mm^2, 3D) or contour length (mm, 2D) of the surface element of each corner code."""
    if len(spacing) == 3:
        s0, s1, s2 = spacing
        # an area vector transforms with the cofactor of diag(spacing)
        cof = np.array([s1 * s2, s0 * s2, s0 * s1])
        return np.array(
            [float(np.sum(np.linalg.norm(t * cof, axis=1))) for t in _unit_cube_triangles()]
        )
    if len(spacing) == 2:
        # marching squares with vertices at edge midpoints: one corner in (or out) cuts the
        # corner diagonally, two on one side cut straight across, the saddle cuts twice
        s0, s1 = spacing
        diag = 0.5 * math.hypot(s0, s1)
        table = np.zeros(16)
        for code in range(1, 15):
            bits = [code >> b & 1 for b in range(4)]  # (0,0), (0,1), (1,0), (1,1)
            n_in = sum(bits)
            if n_in in (1, 3):
                table[code] = diag
            elif bits[0] == bits[1]:  # same first index: the cut runs along axis 1
                table[code] = s1
            elif bits[0] == bits[2]:
                table[code] = s0
            else:
                table[code] = 2 * diag
        return table
    raise ValueError(f"surface Dice needs 2D or 3D masks, got {len(spacing)}D")


@dataclass(frozen=True)
class SurfelDistances:
    """Corner-lattice surface elements: distances (mm) to the other surface and areas."""

    dist_pred: np.ndarray
    area_pred: np.ndarray
    dist_ref: np.ndarray
    area_ref: np.ndarray

    def surface_dice(self, tolerance_mm: float) -> float:
        total = float(np.sum(self.area_pred) + np.sum(self.area_ref))
        if self.area_pred.size == 0 and self.area_ref.size == 0:
            return 1.0
        if total == 0.0:
            return 1.0
        within = float(np.sum(self.area_pred[self.dist_pred <= tolerance_mm]))
        within += float(np.sum(self.area_ref[self.dist_ref <= tolerance_mm]))
        return within / total


def _surfels_cropped(pp: np.ndarray, rr: np.ndarray, spacing: np.ndarray) -> SurfelDistances:
    table = _surfel_area_table(tuple(float(s) for s in spacing))
    full = (1 << (2**pp.ndim)) - 1
    cp, cr = _corner_codes(pp), _corner_codes(rr)
    bp = (cp != 0) & (cp != full)
    br = (cr != 0) & (cr != full)
    area_p, area_r = table[cp[bp]], table[cr[br]]
    if not bp.any() or not br.any():
        return SurfelDistances(
            np.full(area_p.size, np.inf), area_p, np.full(area_r.size, np.inf), area_r
        )
    d_p = _nearest_distances(bp, br, spacing)
    d_r = _nearest_distances(br, bp, spacing)
    return SurfelDistances(d_p, area_p, d_r, area_r)


def surface_dice(
    pred: np.ndarray, ref: np.ndarray, spacing: float | Sequence[float], tolerance_mm: float
) -> float:
    """Normalised surface Dice at ``tolerance_mm`` (DeepMind surface-distance definition).

    2D or 3D masks. Both empty -> 1.0; exactly one empty -> 0.0.
    """
    p, r = _masks(pred, ref)
    s = _spacing(spacing, p.ndim)
    _surfel_area_table(tuple(float(v) for v in s))  # rejects other dimensions early
    crop = _padded_crop(p, r, _ring(s))
    if crop is None:
        return 1.0
    return _surfels_cropped(*crop, s).surface_dice(tolerance_mm)


# -- everything for one case and class -------------------------------------------------------
def all_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: float | Sequence[float],
    tolerance_mm: float = 2.0,
) -> dict[str, float]:
    """Every metric of :data:`METRIC_NAMES` for one mask pair, sharing crop and boundaries.

    NSD is left out (NaN is never produced; the key is simply absent) only for masks that are
    neither 2D nor 3D.
    """
    p, r = _masks(pred, ref)
    s = _spacing(spacing, p.ndim)
    tp, n_p, n_r = _counts(p, r)
    vox_ml = float(np.prod(s)) / 1000.0
    out: dict[str, float] = {
        "dice": _ratio(2 * tp, n_p + n_r, 1.0),
        "iou": _ratio(tp, n_p + n_r - tp, 1.0),
        "precision": (1.0 if n_r == 0 else 0.0) if n_p == 0 else tp / n_p,
        "recall": (1.0 if n_p == 0 else 0.0) if n_r == 0 else tp / n_r,
    }
    crop = _padded_crop(p, r, _ring(s)) if n_p + n_r else None
    if crop is None:
        out |= {"hd": 0.0, "hd95": 0.0, "assd": 0.0}
        if p.ndim in (2, 3):
            out["nsd"] = 1.0
    else:
        bd = _boundary_distances_cropped(*crop, s)
        out |= {"hd": bd.hausdorff(None), "hd95": bd.hausdorff(95), "assd": bd.assd()}
        if p.ndim in (2, 3):
            out["nsd"] = _surfels_cropped(*crop, s).surface_dice(tolerance_mm)
    out |= {
        "vol_ref_ml": n_r * vox_ml,
        "vol_pred_ml": n_p * vox_ml,
        "vol_diff_ml": (n_p - n_r) * vox_ml,
    }
    return out


def label_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: float | Sequence[float],
    classes: Mapping[str, Sequence[int]],
    tolerance_mm: float = 2.0,
    mask: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """All metrics per class or region of two integer label maps.

    ``classes`` maps a name to the label values whose union forms it (``{"liver": [1]}``,
    BraTS ``{"whole": [1, 2, 3]}``). ``mask`` (bool, same shape) restricts the evaluation to a
    field of view: voxels outside it count as background in both maps.
    """
    pl, rl = np.asarray(pred), np.asarray(ref)
    if pl.shape != rl.shape:
        raise ValueError(f"pred shape {pl.shape} differs from ref shape {rl.shape}")
    if mask is not None:
        m = np.asarray(mask).astype(bool, copy=False)
        pl = np.where(m, pl, 0)
        rl = np.where(m, rl, 0)
    # every class lies inside the foreground box of both maps; cropping to it first makes
    # the per-class work follow the objects, not the scan (background changes no metric)
    sl = _bbox((pl != 0) | (rl != 0))
    if sl is None:
        sl = tuple(slice(0, 0) for _ in pl.shape)
    pc, rc = pl[sl], rl[sl]
    out: dict[str, dict[str, float]] = {}
    for name, values in classes.items():
        vals = np.asarray(list(values))
        out[name] = all_metrics(np.isin(pc, vals), np.isin(rc, vals), spacing, tolerance_mm)
    return out
