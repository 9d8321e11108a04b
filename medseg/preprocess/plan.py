"""``plan.json``: the contract between preprocessing, training and inference.

Derived from the data set fingerprint, overridable by the pipeline TOML, copied into every run
folder so that a model folder is self-contained.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medseg import atomic
from medseg.errors import PlanError

PLAN_VERSION = 1
MODALITIES = ("CT", "MR", "EM", "RGB", "other")
NORMALISATIONS = ("ct", "zscore_nonzero", "zscore", "none")


@dataclass(frozen=True)
class ChannelPlan:
    """How one input channel is normalised."""

    name: str
    modality: str = "other"
    normalisation: str = "zscore"
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise PlanError(
                f"channel {self.name!r}: modality {self.modality!r} not in {MODALITIES}"
            )
        if self.normalisation not in NORMALISATIONS:
            raise PlanError(
                f"channel {self.name!r}: normalisation {self.normalisation!r} "
                f"not in {NORMALISATIONS}"
            )
        if self.normalisation == "ct" and (self.mean is None or not self.std):
            raise PlanError(f"channel {self.name!r}: CT normalisation needs mean and std > 0")
        if self.clip is not None:
            object.__setattr__(self, "clip", (float(self.clip[0]), float(self.clip[1])))


@dataclass
class Plan:
    """Everything preprocessing, training and inference must agree on.

    ``label_values[c]`` is the file value of class ``c``; class 0 is background.
    Sizes (``patch_output_size``, ``tile_output_size``, ``margin``) are in voxels of the
    preprocessed grid, one entry per spatial axis of the network (2 or 3).
    """

    spatial_dims: int
    channels: list[ChannelPlan]
    label_values: list[int]
    class_names: list[str]
    network: dict[str, Any]
    patch_output_size: tuple[int, ...]
    tile_output_size: tuple[int, ...]
    margin: tuple[int, ...]
    regions: dict[str, list[int]] | None = None
    ignore_value: int | None = None
    orientation: tuple[str, str, str] | None = ("R", "A", "S")
    target_spacing: tuple[float, ...] | None = None
    crop_to_nonzero: bool = False
    version: int = PLAN_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise PlanError(f"plan: spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if len(self.label_values) != len(self.class_names) or len(self.label_values) < 2:
            raise PlanError("plan: label_values and class_names must match and hold >= 2 classes")
        if len(set(self.label_values)) != len(self.label_values):
            raise PlanError(f"plan: duplicate label values {self.label_values}")
        for name in ("patch_output_size", "tile_output_size", "margin"):
            v = tuple(int(x) for x in getattr(self, name))
            if len(v) != self.spatial_dims:
                raise PlanError(f"plan: {name} {v} must have {self.spatial_dims} entries")
            setattr(self, name, v)
        if self.orientation is not None:
            self.orientation = (self.orientation[0], self.orientation[1], self.orientation[2])
        if self.target_spacing is not None:
            self.target_spacing = tuple(float(s) for s in self.target_spacing)

    @property
    def num_classes(self) -> int:
        return len(self.label_values)

    @property
    def in_channels(self) -> int:
        return len(self.channels)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = [asdict(c) for c in self.channels]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "plan") -> Plan:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"{source}: unknown plan keys {sorted(unknown)}")
        try:
            kw = dict(d)
            kw["channels"] = [ChannelPlan(**c) for c in d["channels"]]
            for k in ("patch_output_size", "tile_output_size", "margin"):
                kw[k] = tuple(d[k])
            if d.get("orientation") is not None:
                kw["orientation"] = tuple(d["orientation"])
            if d.get("target_spacing") is not None:
                kw["target_spacing"] = tuple(d["target_spacing"])
            return cls(**kw)
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(
                f"{source}: malformed plan ({exc}); regenerate it with medseg preprocess"
            ) from exc

    def save(self, path: str | Path) -> None:
        atomic.write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise PlanError(
                f"{p}: plan.json not found; run medseg preprocess or point to a run folder"
            )
        try:
            d = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"{p}: not a readable JSON plan ({exc})") from exc
        if not isinstance(d, dict):
            raise PlanError(f"{p}: plan must be a JSON object")
        return cls.from_json(d, source=str(p))
