"""Data set fingerprint (``fingerprint.json``): what the plan is derived from.

Per case: grid (shape, spacing, orientation), channel count, the box of non-zero voxels, label
values with voxel counts, and warnings (label values outside the declared set, image/label grid
mismatch, extreme spacing). Per channel: intensity statistics over foreground voxels (label not
background), from at most ``samples_per_case`` random voxels per case so that the cost stays
bounded on large data sets (the idea of nnU-Net's dataset fingerprint, Isensee et al. 2021).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg import atomic
from medseg.errors import GeometryError, PlanError
from medseg.volume import GRID_ATOL_MM, Box, Grid, Volume

#: Default number of foreground intensities sampled per case and channel.
SAMPLES_PER_CASE = 10_000
#: Spacings (mm) outside this range are reported as suspicious.
SPACING_RANGE_MM = (0.01, 10.0)


@dataclass(frozen=True)
class CaseFingerprint:
    """One case: grid in the file's own axis order, non-zero box, label counts, warnings."""

    case_id: str
    grid: Grid
    channels: int
    nonzero_box: Box
    label_counts: dict[int, int]
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "shape": list(self.grid.shape),
            "spacing": list(self.grid.spacing),
            "orientation": "".join(self.grid.orientation),
            "affine": self.grid.affine.tolist(),
            "channels": self.channels,
            "nonzero_box": [list(self.nonzero_box.start), list(self.nonzero_box.stop)],
            "label_counts": {str(k): v for k, v in self.label_counts.items()},
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CaseFingerprint:
        return cls(
            case_id=d["case_id"],
            grid=Grid(tuple(d["shape"]), np.array(d["affine"])),  # type: ignore[arg-type]
            channels=int(d["channels"]),
            nonzero_box=Box(tuple(d["nonzero_box"][0]), tuple(d["nonzero_box"][1])),
            label_counts={int(k): int(v) for k, v in d["label_counts"].items()},
            warnings=list(d.get("warnings", [])),
        )


@dataclass(frozen=True)
class ChannelStats:
    """Foreground intensity statistics of one channel over the sampled voxels of all cases."""

    name: str
    mean: float
    std: float
    p00_5: float
    p99_5: float
    min: float
    max: float
    samples: int


@dataclass(frozen=True)
class Fingerprint:
    """Everything the plan needs to know about a data set."""

    name: str
    channels: list[str]
    modalities: list[str] | None
    labels: dict[int, str] | None
    regions: dict[str, list[int]] | None
    cases: list[CaseFingerprint]
    channel_stats: list[ChannelStats]

    @property
    def warnings(self) -> list[str]:
        return [f"{c.case_id}: {w}" for c in self.cases for w in c.warnings]

    @property
    def label_counts(self) -> dict[int, int]:
        total: dict[int, int] = {}
        for c in self.cases:
            for k, v in c.label_counts.items():
                total[k] = total.get(k, 0) + v
        return dict(sorted(total.items()))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "channels": self.channels,
            "modalities": self.modalities,
            "labels": None if self.labels is None else {str(k): v for k, v in self.labels.items()},
            "regions": self.regions,
            "label_counts": {str(k): v for k, v in self.label_counts.items()},
            "channel_stats": [vars(s) for s in self.channel_stats],
            "warnings": self.warnings,
            "cases": [c.to_json() for c in self.cases],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Fingerprint:
        labels = d.get("labels")
        return cls(
            name=d["name"],
            channels=list(d["channels"]),
            modalities=d.get("modalities"),
            labels=None if labels is None else {int(k): v for k, v in labels.items()},
            regions=d.get("regions"),
            cases=[CaseFingerprint.from_json(c) for c in d["cases"]],
            channel_stats=[ChannelStats(**s) for s in d["channel_stats"]],
        )

    def save(self, path: str | Path) -> None:
        atomic.write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Fingerprint:
        p = Path(path)
        try:
            return cls.from_json(json.loads(p.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PlanError(f"{p}: not a readable fingerprint ({exc}); rerun preprocess") from exc


def background_values(array: np.ndarray) -> list[float]:
    """Per channel of ``(C, I, J, K)``: the value all 8 corner voxels share, else 0.

    Skull-stripped MR is 0 outside the head, but scans normalised before distribution (the
    BRATS copies here are -3.62 outside the brain) or padded outside the field of view (CT
    -1024 or -2048) use another constant; the corners tell which.
    """
    out = []
    for c in array:
        corners = c[np.ix_(*[[0, n - 1] for n in c.shape])].ravel()
        out.append(float(corners[0]) if np.all(corners == corners[0]) else 0.0)
    return out


def foreground_mask(array: np.ndarray) -> np.ndarray:
    """``(I, J, K)``: voxels where some channel differs from its background value."""
    bg = background_values(array)
    mask = np.zeros(array.shape[1:], dtype=bool)
    for c, b in zip(array, bg, strict=True):
        mask |= c != b
    return mask


def nonzero_box(array: np.ndarray) -> Box:
    """Bounding box of ``foreground_mask`` of ``(C, I, J, K)``; the whole array if empty."""
    return box_of(foreground_mask(array))


def box_of(mask: np.ndarray) -> Box:
    """Bounding box of the true voxels of an ``(I, J, K)`` mask; the whole array if none."""
    if not mask.any():
        return Box.from_shape(mask.shape)
    start, stop = [], []
    for ax in range(3):
        nz = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != ax)))
        start.append(int(nz[0]))
        stop.append(int(nz[-1]) + 1)
    return Box(tuple(start), tuple(stop))


def stack_channels(images: list[Volume], source: str = "case") -> tuple[np.ndarray, Grid]:
    """Concatenate the channels of ``images`` (one grid, checked) into float32 ``(C,I,J,K)``."""
    if not images:
        raise GeometryError(f"{source}: no image files")
    grid = images[0].grid
    for v in images[1:]:
        grid.check_same(v.grid, GRID_ATOL_MM, f"{_name(v, source)} vs {_name(images[0], source)}")
    arr = np.concatenate([np.asarray(v.array, dtype=np.float32) for v in images], axis=0)
    return arr, grid


def _name(v: Volume, default: str) -> str:
    return str(v.meta.get("source") or v.meta.get("path") or default)


def fingerprint_case(
    case_id: str,
    images: list[Volume],
    label: Volume | None,
    *,
    declared: list[int] | None = None,
    samples: int = SAMPLES_PER_CASE,
) -> tuple[CaseFingerprint, list[np.ndarray]]:
    """Fingerprint one case; also returns the sampled foreground intensities per channel."""
    arr, grid = stack_channels(images, case_id)
    warnings: list[str] = []
    lo, hi = SPACING_RANGE_MM
    if any(s < lo or s > hi for s in grid.spacing if s > 0) and grid.shape[2] > 1:
        sp = ", ".join(f"{s:.3g}" for s in grid.spacing)
        warnings.append(f"extreme spacing ({sp}) mm; check the file header")
    counts: dict[int, int] = {}
    fg: np.ndarray | None = None
    if label is not None:
        try:
            grid.check_same(label.grid, GRID_ATOL_MM, f"{case_id}: label vs image")
        except GeometryError as exc:
            warnings.append(str(exc))
        else:
            lab = np.asarray(label.array[0])
            values, n = np.unique(lab, return_counts=True)
            counts = {int(v): int(c) for v, c in zip(values, n, strict=True)}
            if declared is not None:
                extra = sorted(set(counts) - set(declared))
                if extra:
                    warnings.append(f"label values {extra} not in the declared set {declared}")
            background = min(declared) if declared else 0
            fg = lab != background
    if fg is None or not fg.any():
        fg = foreground_mask(arr)
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    idx = np.flatnonzero(fg)
    if idx.size > samples:
        idx = np.sort(rng.choice(idx, size=samples, replace=False))
    picked = [c.reshape(-1)[idx] for c in arr]
    picked = [p[np.isfinite(p)] for p in picked]
    fp = CaseFingerprint(case_id, grid, arr.shape[0], nonzero_box(arr), counts, warnings)
    return fp, picked


def channel_stats(names: list[str], samples: list[list[np.ndarray]]) -> list[ChannelStats]:
    """Aggregate per-case samples ``samples[case][channel]`` into per-channel statistics."""
    out = []
    for c, name in enumerate(names):
        vals = [s[c] for s in samples if c < len(s) and s[c].size]
        v = np.concatenate(vals).astype(np.float64) if vals else np.zeros(1)
        p_lo, p_hi = np.percentile(v, [0.5, 99.5])
        out.append(
            ChannelStats(
                name=name,
                mean=float(v.mean()),
                std=float(v.std()),
                p00_5=float(p_lo),
                p99_5=float(p_hi),
                min=float(v.min()),
                max=float(v.max()),
                samples=int(v.size),
            )
        )
    return out
