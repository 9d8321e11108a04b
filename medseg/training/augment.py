"""Spatial and intensity augmentation of training patches with input larger than output.

One coordinate map is built for the whole *input* patch (output box grown by the network
margin): rotation, isotropic scaling and an elastic deformation as in the U-Net paper
(Ronneberger et al. 2015, after Simard et al. 2003: random displacements on a coarse grid of
3x3(x3) control points, standard deviation ~10 voxels, cubic-spline upsampled to a smooth
per-voxel field). The image is sampled through the map (linear or cubic), the label through
its centre (``margin`` voxels in from every side, nearest neighbour) and the weight map likewise
(linear), so label and image stay aligned voxel for voxel and the loss still sees only voxels
with full context. Only the bounding slab of the source coordinates is read from the cache
(mirror-reflected where it leaves the scan, like inference). Mirroring is an exact array flip
about the common centre of input and output.

Intensity transforms follow nnU-Net's defaults (Isensee et al. 2021): multiplicative
brightness, contrast about the mean, gamma on the min-max range, Gaussian noise.

Arrays are ``(C, I, J, K)`` in the cache; returned patches are ``(C, *network axes)`` (2D
patches drop the K axis). Sizes and displacements are in voxels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.errors import PlanError
from medseg.training.sampling import SamplingConfig, crop_label, read_region
from medseg.volume import Box


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of each augmentation (``[train.augment]`` in a pipeline).

    Angles in degrees (2D: one angle; 3D: one per axis), displacements in voxels. Mirroring
    flips each axis in ``mirror_axes`` (network axes 0..D-1) with probability 1/2.
    """

    p_elastic: float = 0.0
    elastic_sigma: float = 10.0
    elastic_points: int = 3
    p_rotate: float = 0.2
    rotation_degrees: float = 30.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.85, 1.25)
    mirror_axes: tuple[int, ...] | None = None
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.1
    noise_std: float = 0.1
    image_order: int = 1

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any] | None, source: str = "[train.augment]"
    ) -> AugmentConfig:
        """Build from a pipeline table; unknown keys raise ``PlanError`` naming them."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"{source}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        for k, v in list(d.items()):
            if isinstance(v, list):
                d[k] = tuple(v)
        try:
            return cls(**d)
        except TypeError as exc:
            raise PlanError(f"{source}: {exc}") from exc

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation at all (validation, tests)."""
        return cls(
            p_elastic=0.0, p_rotate=0.0, p_scale=0.0, mirror_axes=(), p_brightness=0.0,
            p_contrast=0.0, p_gamma=0.0, p_noise=0.0,
        )  # fmt: skip

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.startswith("p_"):
                p = getattr(self, f.name)
                if not 0.0 <= float(p) <= 1.0:
                    raise PlanError(f"[train.augment] {f.name} = {p} must lie in [0, 1]")
        if self.image_order not in (0, 1, 3):
            raise PlanError(f"[train.augment] image_order {self.image_order} must be 0, 1 or 3")
        if self.elastic_points < 2:
            raise PlanError("[train.augment] elastic_points must be >= 2")


@dataclass(frozen=True)
class SpatialParams:
    """One draw of the spatial transform.

    ``matrix`` (D x D) maps a patch voxel's offset from the patch centre to the source offset;
    ``displacement`` ``(D, P, ..., P)`` are the control-point displacements in voxels (or None);
    ``flips`` mirrors network axes after warping.
    """

    matrix: np.ndarray
    displacement: np.ndarray | None
    flips: tuple[bool, ...]

    @property
    def warps(self) -> bool:
        """Whether the source coordinates differ from the identity."""
        return self.displacement is not None or not np.array_equal(
            self.matrix, np.eye(self.matrix.shape[0])
        )


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """2D rotation by ``angles[0]`` or 3D ``Rz @ Ry @ Rx`` from three angles (radians)."""
    if len(angles) == 1:
        c, s = np.cos(angles[0]), np.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def draw_spatial(cfg: AugmentConfig, rng: np.random.Generator, dims: int) -> SpatialParams:
    """Draw rotation, scale, elastic field and flips (a fixed number of draws per call)."""
    u = rng.random(3)
    angles = rng.uniform(-1.0, 1.0, size=1 if dims == 2 else 3) * np.deg2rad(cfg.rotation_degrees)
    scale = rng.uniform(cfg.scale_range[0], cfg.scale_range[1])
    shape = (dims, *(cfg.elastic_points,) * dims)
    disp = rng.normal(0.0, cfg.elastic_sigma, size=shape)
    flip_draw = rng.random(dims)
    matrix = np.eye(dims)
    if u[0] < cfg.p_rotate:
        matrix = rotation_matrix(angles)
    if u[1] < cfg.p_scale:
        matrix = matrix / scale  # zooming in by ``scale`` reads a smaller source region
    axes = tuple(range(dims)) if cfg.mirror_axes is None else tuple(cfg.mirror_axes)
    flips = tuple(bool(a in axes and f < 0.5) for a, f in enumerate(flip_draw))
    return SpatialParams(matrix, disp if u[2] < cfg.p_elastic else None, flips)


def elastic_field(displacement: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Smooth per-voxel displacement ``(D, *size)`` from control points ``(D, P, ..., P)``.

    Cubic B-spline interpolation with the control grid's corner points on the patch corners.
    """
    dims = len(size)
    out = np.empty((dims, *size), dtype=np.float64)
    for d in range(dims):
        src = displacement[d]
        # output shape round(P * n / P) == n; grid_mode=False puts corners on corners, so
        # control point t sits at voxel t * (n - 1) / (P - 1)
        factors = [n / p for n, p in zip(size, src.shape, strict=True)]
        out[d] = ndimage.zoom(src, factors, order=3, mode="nearest", grid_mode=False)
    return out


def coordinate_map(params: SpatialParams, size: tuple[int, ...]) -> np.ndarray:
    """Source coordinates ``(D, *size)`` (patch voxel units) of every voxel of a patch.

    Identity parameters give ``coords[:, p] == p`` exactly.
    """
    dims = len(size)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij"))
    if not params.warps:
        return grid
    centre = (np.asarray(size, dtype=np.float64) - 1.0) / 2.0
    rel = grid - centre.reshape((dims,) + (1,) * dims)
    coords = np.tensordot(params.matrix, rel, axes=1) + centre.reshape((dims,) + (1,) * dims)
    if params.displacement is not None:
        coords += elastic_field(params.displacement, size)
    return coords


def _sample(
    array: np.ndarray, in_box3: Box, coords: np.ndarray, order: int, dims: int
) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate ``array`` (``(C, I, J, K)``) at patch coordinates offset by ``in_box3.start``.

    Returns the sampled ``(C, *coords.shape[1:])`` array and a mask of coordinates that fall
    outside the scan (more than half a voxel beyond its edge).
    """
    start = np.asarray(in_box3.start[:dims], dtype=np.float64)
    abs_coords = coords + start.reshape((dims,) + (1,) * dims)
    pad = 3 if order == 3 else 1
    lo = [int(np.floor(abs_coords[d].min())) - pad for d in range(dims)]
    hi = [int(np.floor(abs_coords[d].max())) + 2 + pad for d in range(dims)]
    if dims == 2:
        box = Box((lo[0], lo[1], in_box3.start[2]), (hi[0], hi[1], in_box3.start[2] + 1))
    else:
        box = Box(tuple(lo), tuple(hi))
    region = read_region(array, box)
    if dims == 2:
        region = region[..., 0]
    local = abs_coords - np.asarray(lo, dtype=np.float64).reshape((dims,) + (1,) * dims)
    out = np.stack(
        [
            ndimage.map_coordinates(
                region[c], local, order=order, mode="nearest", prefilter=order > 1
            )
            for c in range(region.shape[0])
        ]
    )
    shape = array.shape[1 : 1 + dims]
    outside = np.zeros(coords.shape[1:], dtype=bool)
    for d in range(dims):
        outside |= (abs_coords[d] < -0.5) | (abs_coords[d] > shape[d] - 0.5)
    return out, outside


def extract_patch(
    image: np.ndarray,
    label: np.ndarray | None,
    weights: np.ndarray | None,
    out_box: Box,
    sampling: SamplingConfig,
    params: SpatialParams | None = None,
    image_order: int = 1,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Cut (and warp) one training patch from a cached case.

    ``image`` ``(C, I, J, K)`` float, ``label`` ``(1, I, J, K)`` int16 (-1 ignore), ``weights``
    ``(1, I, J, K)`` float or None; ``out_box`` over ``(I, J, K)`` (K size 1 for 2D). Returns
    ``image`` ``(C, *input size)`` float32, ``label`` ``(1, *output size)`` int16 and ``weights``
    ``(1, *output size)`` float32 (or None), network axes only. Label voxels whose source lies
    outside the scan are -1 (no loss), their weights 0.
    """
    dims = sampling.spatial_dims
    in_box = out_box.grow(sampling.margin3)
    m = sampling.margin
    if params is None or not params.warps:
        img = read_region(image, in_box).astype(np.float32, copy=False)
        lab = crop_label(label, out_box) if label is not None else None
        wts = crop_label(weights, out_box) if weights is not None else None
        if dims == 2:
            img = img[..., 0]
            lab = lab[..., 0] if lab is not None else None
            wts = wts[..., 0] if wts is not None else None
    else:
        size = sampling.input_size
        coords = coordinate_map(params, size)
        img = _sample(image, in_box, coords, image_order, dims)[0].astype(np.float32)
        inner = (
            slice(None),
            *(slice(mi, mi + p) for mi, p in zip(m, sampling.patch_output_size, strict=True)),
        )
        c_out = coords[inner]
        lab = wts = None
        if label is not None:
            lab_f, outside = _sample(label, in_box, c_out, 0, dims)
            lab = lab_f.astype(np.int16)
            lab[:, outside] = -1
        if weights is not None:
            w, outside = _sample(weights, in_box, c_out, 1, dims)
            wts = w.astype(np.float32)
            wts[:, outside] = 0.0
    if params is not None:
        for ax, f in enumerate(params.flips):
            if f:
                img = np.flip(img, axis=ax + 1)
                lab = np.flip(lab, axis=ax + 1) if lab is not None else None
                wts = np.flip(wts, axis=ax + 1) if wts is not None else None
    return (
        np.ascontiguousarray(img, dtype=np.float32),
        np.ascontiguousarray(lab) if lab is not None else None,
        np.ascontiguousarray(wts, dtype=np.float32) if wts is not None else None,
    )


def augment_intensity(
    image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> np.ndarray:
    """Brightness, contrast, gamma and noise on a ``(C, ...)`` patch, each channel drawn anew.

    A fixed number of random draws per channel keeps the stream reproducible whatever applies.
    """
    out = image.astype(np.float32, copy=True)
    for c in range(out.shape[0]):
        u = rng.random(4)
        b = rng.uniform(*cfg.brightness_range)
        k = rng.uniform(*cfg.contrast_range)
        g = rng.uniform(*cfg.gamma_range)
        sigma = rng.uniform(0.0, cfg.noise_std)
        noise_seed = int(rng.integers(2**31))
        x = out[c]
        if u[0] < cfg.p_brightness:
            x *= b
        if u[1] < cfg.p_contrast:
            lo, hi, mean = x.min(), x.max(), x.mean()
            x[...] = np.clip((x - mean) * k + mean, lo, hi)
        if u[2] < cfg.p_gamma:
            lo, hi = float(x.min()), float(x.max())
            span = hi - lo
            if span > 1e-8:
                x[...] = np.power((x - lo) / span, g) * span + lo
        if u[3] < cfg.p_noise and sigma > 0:
            x += np.random.default_rng(noise_seed).normal(0.0, sigma, x.shape).astype(np.float32)
    return out
