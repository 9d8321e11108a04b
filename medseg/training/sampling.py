"""Training patches: output boxes, their input boxes grown by the network margin, and
foreground oversampling (numpy only).

Geometry (see ARCHITECTURE.md, "Valid convolutions and overlap-tile"): a patch is an *output*
box of the plan's ``patch_output_size`` voxels; the network reads the *input* box, the output box
grown by ``plan.margin`` voxels per side. Where the input box leaves the scan it is filled by
mirror reflection (``np.pad`` mode ``"reflect"``) by the reader overlap-tile inference uses, so
the loss never sees a voxel without its full context. Only the voxels a patch needs are read from
the memory-mapped cache.

Randomness is counter based: the generator of batch ``step`` on ``rank`` is
``numpy.random.default_rng([seed, rank, step])``. A sampler's whole state is therefore
``(seed, rank, step)``, which a checkpoint stores, and a batch does not depend on which DataLoader
worker made it (nnU-Net-style oversampling of Isensee et al. 2021, with the counter-based streams
of numpy's ``SeedSequence``).

Arrays are ``(C, I, J, K)``; 2D plans use ``K == 1`` scans (or single ``k`` slices of a 3D
scan) and boxes span one voxel along K.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.errors import PlanError
from medseg.tiling import extract
from medseg.volume import Box


def read_region(array: np.ndarray, box: Box) -> np.ndarray:
    """Read ``box`` (over ``I, J, K``) of a ``(C, I, J, K)`` array, mirror-reflected outside.

    The overlap-tile reader (``medseg.tiling.extract``), so training patches and inference
    tiles see identical padding; it slices only the needed slab of a memmap. Returns a new
    in-memory ndarray.
    """
    return extract(array, box)


@dataclass(frozen=True)
class SamplingConfig:
    """How patches are drawn.

    ``patch_output_size`` and ``margin`` are in voxels, one entry per network axis (2 or 3).
    ``foreground_fraction`` of the patches of a batch (rounded, nnU-Net draws the last third of a
    batch this way) are centred on a voxel of a class picked uniformly among the foreground
    classes present in the case, so rare classes are seen as often as common ones.
    """

    patch_output_size: tuple[int, ...]
    margin: tuple[int, ...]
    foreground_fraction: float = 1.0 / 3.0

    def __post_init__(self) -> None:
        if len(self.patch_output_size) != len(self.margin) or len(self.margin) not in (2, 3):
            raise PlanError(
                f"sampling: patch size {self.patch_output_size} and margin {self.margin} "
                "must both have 2 or 3 entries"
            )
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise PlanError(
                f"[train] foreground_fraction {self.foreground_fraction} must lie in [0, 1]"
            )

    @property
    def spatial_dims(self) -> int:
        return len(self.patch_output_size)

    def box3(self, size: Sequence[int]) -> tuple[int, int, int]:
        """A per-network-axis size as a 3-axis size over ``(I, J, K)`` (2D: K size 1)."""
        s = tuple(int(x) for x in size)
        return (s[0], s[1], 1) if len(s) == 2 else (s[0], s[1], s[2])

    @property
    def margin3(self) -> tuple[int, int, int]:
        m = tuple(self.margin)
        return (m[0], m[1], 0) if len(m) == 2 else (m[0], m[1], m[2])

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(p + 2 * m for p, m in zip(self.patch_output_size, self.margin, strict=True))


def batch_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The generator of batch ``step`` on ``rank``: independent streams, no shared state."""
    return np.random.default_rng([int(seed), int(rank), int(step)])


def _class_of(key: int | str) -> int:
    """Class index of a ``locations`` key (``3`` as loaded by the cache, or ``"c3"`` on disk)."""
    return int(key[1:]) if isinstance(key, str) else int(key)


def present_foreground(locations: Mapping[Any, np.ndarray]) -> dict[int, np.ndarray]:
    """Stored voxel coordinates ``(N, 3)`` of each foreground class (> 0) present in a case."""
    out = {}
    for key, loc in locations.items():
        c = _class_of(key)
        if c > 0 and len(loc) > 0:
            out[c] = loc
    return dict(sorted(out.items()))


def output_box(
    shape: tuple[int, int, int],
    cfg: SamplingConfig,
    rng: np.random.Generator,
    locations: Mapping[Any, np.ndarray] | None = None,
    force_foreground: bool = False,
) -> Box:
    """Draw one output box (over ``I, J, K``) of a scan of ``shape`` ``(I, J, K)``.

    Random boxes have their start uniform over positions that keep the box inside the scan
    (where the scan is smaller than the patch, the box is centred on it and overhangs, the input
    is then reflected). With ``force_foreground`` and some foreground class present in
    ``locations``, the box is centred on a random stored voxel of a random present class, then
    shifted just enough to lie inside the scan (the voxel stays in the box).
    """
    size = cfg.box3(cfg.patch_output_size)
    if cfg.spatial_dims == 2:
        size = (size[0], size[1], 1)
    present = present_foreground(locations) if (force_foreground and locations) else {}
    if present:
        classes = list(present)
        loc = present[classes[int(rng.integers(len(classes)))]]
        centre = np.asarray(loc[int(rng.integers(len(loc)))], dtype=np.int64)
        # centred on the voxel, then shifted (keeping the voxel inside) to stay within the scan
        start = tuple(
            int(ce) - s // 2 if n < s else int(np.clip(int(ce) - s // 2, 0, n - s))
            for ce, s, n in zip(centre, size, shape, strict=True)
        )
        return Box(start, tuple(a + s for a, s in zip(start, size, strict=True)))
    start_l = []
    for n, s in zip(shape, size, strict=True):
        if n >= s:
            start_l.append(int(rng.integers(0, n - s + 1)))
        else:
            start_l.append(-((s - n) // 2))
    return Box(tuple(start_l), tuple(a + s for a, s in zip(start_l, size, strict=True)))


def input_box(out_box: Box, cfg: SamplingConfig) -> Box:
    """The input box of an output box: grown by the margin (K untouched for 2D)."""
    return out_box.grow(cfg.margin3)


def foreground_slots(batch_size: int, fraction: float, rng: np.random.Generator) -> list[bool]:
    """Which patches of a batch are forced-foreground patches.

    As in nnU-Net, the last ``round(fraction * batch_size)`` patches are forced; when that
    rounds to zero (a batch of 1), the last patch is forced with probability
    ``fraction * batch_size``, so the expected share stays ``fraction``. Always draws one number.
    """
    u = rng.random()
    n_fg = int(round(fraction * batch_size))
    if n_fg == 0 and u < fraction * batch_size:
        n_fg = 1
    return [i >= batch_size - n_fg for i in range(batch_size)]


def crop_label(label: np.ndarray, out_box: Box) -> np.ndarray:
    """Label (or weight map) ``(1, I, J, K)`` cropped to the output box; ignore (-1) outside.

    Output boxes of forced-foreground patches may overhang the scan; voxels outside it get no
    loss (class -1, weight 0), so they never teach the network about mirrored content.
    """
    sub = out_box.clip_to(label.shape[1:])
    fill = -1 if np.issubdtype(label.dtype, np.integer) else 0
    out = np.full((label.shape[0], *out_box.shape), fill, dtype=label.dtype)
    if not sub.is_empty():
        dst = tuple(
            slice(a - o, b - o) for a, b, o in zip(sub.start, sub.stop, out_box.start, strict=True)
        )
        out[(slice(None), *dst)] = label[(slice(None), *sub.slices())]
    return out
