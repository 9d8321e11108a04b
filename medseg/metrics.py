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

Speed: everything is computed in the bounding box of both masks inside a thin ring of
background; a boundary point's distance comes from a local search of the other boundary
(offsets in order of length) or, beyond its radius, a KD-tree query, so the cost follows the
surface, not the scan. ``hausdorff_distance`` needs only two order statistics per direction and
measures only the points that can sit at them (selection with bounds, see
``_order_statistics``); ``all_metrics`` and ``assd`` measure every point (ASSD needs them all).
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
    if mask.ndim == 1:
        nz = np.flatnonzero(mask)
        return None if nz.size == 0 else (slice(int(nz[0]), int(nz[-1]) + 1),)
    # one pass finds the occupied slabs of the first axis, one more over them folds the rest
    # into a plane (both stream through contiguous memory; a scan is read about 1.3 times)
    nz = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if nz.size == 0:
        return None
    first = slice(int(nz[0]), int(nz[-1]) + 1)
    rest = _bbox(np.logical_or.reduce(mask[first], axis=0))
    assert rest is not None
    return (first, *rest)


def _union_bbox(p: np.ndarray, r: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the True voxels of either mask (without forming ``p | r``)."""
    a, b = _bbox(p), _bbox(r)
    if a is None or b is None:
        return a or b
    return tuple(
        slice(min(u.start, v.start), max(u.stop, v.stop)) for u, v in zip(a, b, strict=True)
    )


def _ring(spacing: np.ndarray, reach: float = 1.0) -> tuple[int, ...]:
    """Zero ring (voxels per axis) around a crop: 1 for the boundary plus the search radius."""
    return tuple(1 + int(math.ceil(_search_mm(spacing, reach) / v)) for v in spacing)


#: Reach of the local search (in search radii) when only order statistics are wanted (HD, HD95):
#: a rank just past the points within one radius is found by searching on instead of a KD-tree.
_SELECT_REACH = 2.0
_SAMPLE_STEP = 8
#: Standard deviations between a wanted rank and the sample ranks that bracket it.
_SAMPLE_MARGIN = 4.0
_PROBE_STEP = 16
_PROBE_POINTS = 4096
_LEAFSIZE = 64


def _search_mm(spacing: np.ndarray, reach: float = 1.0) -> float:
    # the local search covers 4 voxels of the finest axis: most boundary points of a decent
    # segmentation find their partner within it; the rest go to the KD-tree (measured in
    # benchmarks/bench_metrics.py: larger radii cost more offsets than they save queries)
    return reach * 4.0 * float(np.min(spacing)) + 1e-9


def _padded_crop(
    p: np.ndarray, r: np.ndarray, ring: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Both masks cropped to the bounding box of their union inside a ring of background.

    The ring (``ring[a]`` voxels on both sides of axis ``a``, at least 1) stands for "outside
    the array is background" (MONAI's erosion with ``border_value=0``, DeepMind's zero
    padding) and keeps local searches inside the array. None when both masks are empty.
    """
    sl = _union_bbox(p, r)
    if sl is None:
        return None
    shape = tuple(s.stop - s.start + 2 * g for s, g in zip(sl, ring, strict=True))
    inner = tuple(slice(g, n - g) for n, g in zip(shape, ring, strict=True))
    pp = np.zeros(shape, dtype=bool)
    rr = np.zeros(shape, dtype=bool)
    pp[inner] = p[sl]
    rr[inner] = r[sl]
    return pp, rr


def _face_boundary(m: np.ndarray) -> np.ndarray:
    """Boundary of a zero-ringed mask: voxels with a background face neighbour (same shape).

    Works on the flat C-order array: inside the ring, the face neighbours of flat index ``i``
    are ``i +- stride`` for every axis, so every step is a contiguous slice. The array is done
    in chunks that stay in the CPU cache (several times faster than whole-array passes).
    """
    f = np.ascontiguousarray(m).ravel()
    n = f.size
    strides = [int(np.prod(m.shape[a + 1 :], dtype=np.int64)) for a in range(m.ndim)]
    g = strides[0]  # the first and last slab lie in the ring: no boundary there
    out = np.zeros(n, dtype=bool)
    chunk = 1 << 17
    buf = np.empty(chunk, dtype=bool)
    for a in range(g, n - g, chunk):
        b = min(a + chunk, n - g)
        inner = buf[: b - a]
        np.logical_and(f[a - g : b - g], f[a + g : b + g], out=inner)
        for st in strides[1:]:
            np.logical_and(inner, f[a - st : b - st], out=inner)
            np.logical_and(inner, f[a + st : b + st], out=inner)
        np.greater(f[a:b], inner, out=out[a:b])  # in the mask and not interior
    return out.reshape(m.shape)


@functools.lru_cache(maxsize=64)
def _search_offsets(
    spacing: tuple[float, ...], reach: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets within ``reach`` local search radii, sorted by their length in mm."""
    sp = np.asarray(spacing)
    radius = _search_mm(sp, reach)
    grids = np.meshgrid(
        *[np.arange(-g, g + 1) for g in (int(math.ceil(radius / v)) for v in sp)], indexing="ij"
    )
    off = np.stack([g.ravel() for g in grids], axis=1)
    dist = _offset_lengths(off, sp)
    keep = dist <= radius
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


def _local_search(
    flat: np.ndarray,
    dst: np.ndarray,
    spacing: np.ndarray,
    enough: int | None = None,
    budget: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact distances (mm) to ``dst`` of the voxels (flat indices ``flat``) that are close by.

    Returns ``(out, todo)``: ``out`` (float64, one entry per point) holds the distance of every
    resolved point, ``todo`` the positions of the points left unresolved, every one of them at
    least as far from ``dst`` as every resolved point. Offsets are tried in order of length and
    a point is resolved by the first one that lands on ``dst`` (0 for shared points). Lengths
    follow scipy's EDT formula, so ties at a tolerance compare exactly as in an EDT.

    ``budget`` caps the gathers (points times offsets): past it the rest are left, as a
    KD-tree answers them cheaper. With ``enough`` (only the smallest ``enough + 1`` distances
    matter) the search may go on to :data:`_SELECT_REACH` radii and stops once that many points
    are resolved; ``dst`` must then carry the ring of ``_ring(spacing, _SELECT_REACH)``,
    otherwise that of ``_ring(spacing)`` (every offset stays inside the array).
    """
    out = np.empty(flat.size, dtype=np.float64)
    strides = np.array([st // dst.itemsize for st in dst.strides], dtype=np.int64)
    sp = tuple(float(v) for v in spacing)
    offsets, lengths = _search_offsets(sp, 1.0 if enough is None else _SELECT_REACH)
    dst_flat = dst.ravel()
    todo = np.arange(flat.size)
    pts = flat
    left = math.inf if budget is None else budget
    extended = False
    for fo, ln in zip((offsets @ strides).tolist(), lengths.tolist(), strict=True):
        hit = dst_flat[pts + fo]
        if hit.any():
            out[todo[hit]] = ln
            miss = ~hit
            todo, pts = todo[miss], pts[miss]
            if todo.size == 0 or (enough is not None and flat.size - todo.size > enough):
                break
        left -= todo.size
        if left < 0:
            if enough is None or extended:
                break
            # the ranks wanted sit at the near end of the points left: searching on until
            # they are resolved usually beats a KD-tree (one query ~ 300 gathers)
            wanted = enough + 1 - (flat.size - todo.size)
            if 4 * wanted > todo.size:
                break
            left, extended = 150 * todo.size, True
    return out, todo


class _Surface:
    """The True voxels of a zero-ringed boundary mask, with exact nearest-voxel queries.

    ``flat`` (flat indices, ascending) is computed at once; the ``(N, ndim)`` int32 voxel
    indices and the KD-tree are built on first use, so one object serves as the source of
    one direction and the target of the other.
    """

    def __init__(self, mask: np.ndarray, spacing: np.ndarray) -> None:
        self.mask, self.spacing = mask, spacing
        self.flat = np.flatnonzero(mask)
        self._coords: np.ndarray | None = None
        self._tree: cKDTree | None = None

    @property
    def coords(self) -> np.ndarray:
        if self._coords is None:
            self._coords = _coords(self.flat, self.mask.shape)
        return self._coords

    def nearest(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distance in mm, nearest voxel of this surface) of voxel indices ``q`` ``(N, ndim)``."""
        if self._tree is None:
            self._tree = cKDTree(
                self.coords * self.spacing,
                leafsize=_LEAFSIZE,
                balanced_tree=False,
                compact_nodes=False,
            )
        _, nn = self._tree.query(q * self.spacing, k=1, workers=-1)
        hit = self.coords[nn]
        return _offset_lengths(hit - q, self.spacing), hit


def _coords(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``(N, ndim)`` voxel indices of flat indices.

    int32 (half the memory traffic) when the squares of index differences fit in it.
    """
    dtype = np.int32 if max(shape) <= 1 << 15 else np.int64
    return np.stack([a.astype(dtype) for a in np.unravel_index(flat, shape)], axis=1)


def _nearest_distances(src: np.ndarray, dst: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm, float64) from every True voxel of ``src`` to the nearest True of ``dst``.

    Order: that of ``np.flatnonzero(src)``. The local search of :func:`_local_search` answers
    the points close to ``dst``; the rest are answered exactly by a KD-tree of ``dst``.
    """
    flat = np.flatnonzero(src)
    # a point resolved late costs one gather per offset tried; stop when the KD-tree is cheaper
    out, todo = _local_search(flat, dst, spacing, budget=24 * flat.size)
    if todo.size:
        out[todo] = _Surface(dst, spacing).nearest(_coords(flat[todo], dst.shape))[0]
    return out


def _order_statistics(src: _Surface, dst: _Surface, ranks: Sequence[int]) -> list[float]:
    """The ``ranks``-th smallest (0-based) distances (mm) from ``src`` to ``dst`` voxels.

    Equal to ``np.sort(_nearest_distances(src.mask, dst.mask, spacing))[ranks]``, but points
    that cannot sit at those ranks are only counted, not measured. A probe (the same local
    search on every 16th point) tells whether the ranks lie within the search's reach. If so,
    the local search runs on all points: every point it leaves is at least as far as every
    point it resolved, so ranks below the resolved count are answered by it alone and the
    others by :func:`_far_order_statistics` on the points left. If not,
    :func:`_far_order_statistics` selects among all points directly (the local search would
    only resolve points below the ranks, which that counts anyway).
    """
    flat, spacing = src.flat, src.spacing
    n = flat.size
    top = max(ranks)
    if n >= _PROBE_POINTS:
        # the same search on a sample, its rank set 4 standard deviations higher: a probe that
        # resolves it means the full search almost surely resolves ``top``
        probe = flat[::_PROBE_STEP]
        m = probe.size
        frac = top / (n - 1)
        want = min(m - 1, int(frac * (m - 1) + 4.0 * math.sqrt(m * frac * (1.0 - frac))) + 1)
        _, far = _local_search(probe, dst.mask, spacing, enough=want, budget=24 * m)
        if m - far.size <= want:
            return _far_order_statistics(src.coords, list(ranks), dst)
    out, todo = _local_search(flat, dst.mask, spacing, enough=top, budget=24 * n)
    n_near = n - todo.size
    values: dict[int, float] = {}
    near_ranks = sorted({k for k in ranks if k < n_near})
    if near_ranks:
        resolved = np.ones(n, dtype=bool)
        resolved[todo] = False
        values |= dict(zip(near_ranks, _select(out[resolved], near_ranks), strict=True))
    far_ranks = sorted({k - n_near for k in ranks if k >= n_near})
    if far_ranks:
        far_values = _far_order_statistics(_coords(flat[todo], src.mask.shape), far_ranks, dst)
        values |= {k + n_near: v for k, v in zip(far_ranks, far_values, strict=True)}
    return [values[k] for k in ranks]


def _far_order_statistics(q: np.ndarray, ranks: list[int], dst: _Surface) -> list[float]:
    """The ``ranks``-th smallest (ascending, 0-based) distances to ``dst`` of voxels ``q``.

    Selection with bounds. The points are ordered by coarse cell (about 6 mm) so that
    neighbours in the order are neighbours in space, and every ``step``-th is measured
    exactly. Each point ``x`` gets bounds from the sampled points ``y`` before and after it:
    an upper one, its distance to the surface voxel nearest to ``y`` (nearly tight, the nearest
    voxel of a neighbour is almost one's own), and a lower one, ``d(y) - |x - y|`` (a distance
    map is 1-Lipschitz). Thresholds ``t`` just below the lowest rank and ``u`` just above the
    highest are read off the exact sample. Points whose upper bound is ``<= t`` (set B) and
    points whose lower bound is ``> u`` (set A) are only counted; the others (set C) are
    measured. If the ``(k - |B|)``-th smallest ``c`` of C lies in ``[t, u]``, it is the
    ``k``-th smallest of all: at most ``k`` values lie below it (B and the smaller part of C,
    none of A) and at least ``k + 1`` at or below it. This holds whenever ``t`` and ``u``
    bracket the true values; if the sample misled, every point is measured.
    """
    n = len(q)
    step = _SAMPLE_STEP
    m = (n + step - 1) // step

    def sample_rank(k: int, sign: float) -> int:
        # the sample's rank for overall rank k, 4 standard deviations toward ``sign``
        f = k / max(n - 1, 1)
        return int(f * (m - 1) + sign * (_SAMPLE_MARGIN * math.sqrt(m * f * (1.0 - f)) + 2.0))

    lo, hi = min(sample_rank(ranks[0], -1.0), m - 1), sample_rank(ranks[-1], 1.0)
    if m < 64 or lo < 0:
        return _select(dst.nearest(q)[0], ranks)
    cell = np.maximum(1, np.round(6.4 / dst.spacing)).astype(np.int32)
    c = q // cell
    key = np.ravel_multi_index(tuple(c.T), tuple(int(v) + 1 for v in c.max(axis=0)))
    if key.size and int(key.max()) < 1 << 31:
        key = key.astype(np.int32)  # sorts twice as fast as int64
    q = q[np.argsort(key, kind="stable")]
    d_s, hit = dst.nearest(q[::step])
    sq = dst.spacing * dst.spacing
    part = np.partition(d_s, [lo, hi] if hi < m else [lo])
    t, u = float(part[lo]), float(part[hi]) if hi < m else math.inf
    # squared upper bounds (mm^2) and lower bounds (mm), in blocks that stay in the cache
    upper = np.full(n, np.inf)
    lower = np.zeros(n)
    block = 256 * step
    for a in range(0, n, block):
        qb = q[a : a + block]
        before = np.arange(a, a + len(qb)) // step
        for j in (before, np.minimum(before + 1, m - 1)):
            off = hit[j] - qb
            off *= off
            np.minimum(upper[a : a + block], off @ sq, out=upper[a : a + block])
            if u < math.inf:
                off = q[j * step] - qb
                off *= off
                low = d_s[j] - np.sqrt(off @ sq)
                np.maximum(lower[a : a + block], low, out=lower[a : a + block])
    below = upper <= t * t * (1.0 - 1e-9)
    keep = ~below
    if u < math.inf:
        keep &= lower <= u * (1.0 + 1e-9) + 1e-9
    cand = np.flatnonzero(keep)
    n_below = int(np.count_nonzero(below))
    rel = [k - n_below for k in ranks]
    if rel[0] >= 0 and rel[-1] < cand.size:
        d = np.empty(cand.size)
        sampled = cand % step == 0
        d[sampled] = d_s[cand[sampled] // step]
        d[~sampled] = dst.nearest(q[cand[~sampled]])[0]
        found = _select(d, rel)
        if found[0] >= t and found[-1] <= u:
            return found
    return _select(dst.nearest(q)[0], ranks)


def _select(d: np.ndarray, ranks: list[int]) -> list[float]:
    """The ``ranks``-th smallest values of ``d``."""
    part = np.partition(d, ranks)
    return [float(part[k]) for k in ranks]


def _quantile_ranks(n: int, q: float) -> tuple[int, int, np.float32]:
    """torch.quantile's (lower rank, upper rank, weight) for ``n`` values, in float32."""
    rank = np.float32(np.float32(q) * np.float32(n - 1))
    lo = int(rank)
    hi = min(int(math.ceil(float(rank))), n - 1)
    return lo, hi, np.float32(rank - np.float32(lo))


def _lerp_f32(a: float, b: float, w: np.float32) -> float:
    """torch's vectorised lerp of two float32 values (as torch.quantile and MONAI use it)."""
    a32, b32 = np.float32(a), np.float32(b)
    # one fused multiply-add of (w or w - 1) * (b - a) onto a or b; the float64 product of two
    # float32 values is exact, so one rounding emulates the fma
    small = bool(w < np.float32(0.5))
    coeff = w if small else np.float32(w - np.float32(1.0))
    base = a32 if small else b32
    return float(np.float32(float(base) + float(coeff) * float(np.float32(b32 - a32))))


def _torch_quantile_f32(d32: np.ndarray, q: float) -> float:
    """Linear-interpolation quantile with torch.quantile's float32 arithmetic (as MONAI uses)."""
    lo, hi, w = _quantile_ranks(d32.size, q)
    part = np.partition(d32, [lo, hi]) if d32.size > 2 else np.sort(d32)
    return _lerp_f32(part[lo], part[hi], w)


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

    Both empty -> 0.0; exactly one empty -> ``inf``. Equal to
    ``boundary_distances(...).hausdorff(percentile)``, but only the distances that can sit at
    the percentile's ranks are measured exactly (see :func:`_order_statistics`).
    """
    if percentile is not None and not 0 < percentile <= 100:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    p, r = _masks(pred, ref)
    s = _spacing(spacing, p.ndim)
    crop = _padded_crop(p, r, _ring(s, _SELECT_REACH))
    if crop is None:
        return 0.0
    sp_, sr_ = _Surface(_face_boundary(crop[0]), s), _Surface(_face_boundary(crop[1]), s)
    if sp_.flat.size == 0 or sr_.flat.size == 0:
        return math.inf

    def directed(src: _Surface, dst: _Surface) -> float:
        n = src.flat.size
        if percentile is None:
            return float(np.float32(_order_statistics(src, dst, [n - 1])[0]))
        lo, hi, w = _quantile_ranks(n, percentile / 100.0)
        a, b = _order_statistics(src, dst, [lo, hi])
        return _lerp_f32(a, b, w)

    return max(directed(sp_, sr_), directed(sr_, sp_))


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
    BraTS ``{"whole": [1, 2, 3]}``; value 0 is a class like any other when named, e.g. ISBI
    2012's membrane). ``mask`` (bool, same shape) restricts the evaluation to a field of view:
    voxels outside it belong to no class in either map.
    """
    pl, rl = np.asarray(pred), np.asarray(ref)
    if pl.shape != rl.shape:
        raise ValueError(f"pred shape {pl.shape} differs from ref shape {rl.shape}")
    m = None if mask is None else np.asarray(mask).astype(bool, copy=False)
    # a class without value 0 lies inside the non-zero box of both maps (within the FOV):
    # cropping to it makes the work follow the objects, not the scan. A class with value 0
    # covers the background, so it is measured on the whole array.
    nonzero = (pl != 0) | (rl != 0)
    sl = _bbox(nonzero if m is None else nonzero & m)
    if sl is None:
        sl = tuple(slice(0, 0) for _ in pl.shape)
    whole = tuple(slice(None) for _ in pl.shape)
    out: dict[str, dict[str, float]] = {}
    for name, values in classes.items():
        vals = np.asarray(list(values))
        box = whole if np.any(vals == 0) else sl
        p, r = np.isin(pl[box], vals), np.isin(rl[box], vals)
        if m is not None:
            p &= m[box]
            r &= m[box]
        out[name] = all_metrics(p, r, spacing, tolerance_mm)
    return out
