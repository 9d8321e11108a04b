"""``plan.json``: the contract between preprocessing, training and inference.

Derived from the data set fingerprint, overridable by the pipeline TOML, copied into every run
folder so that a model folder is self-contained.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg import atomic
from medseg.errors import PlanError

if TYPE_CHECKING:
    from medseg.preprocess.fingerprint import Fingerprint

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

    def labels_to_classes(self, array: np.ndarray, source: str = "label") -> np.ndarray:
        """File label values -> int16 class indices (``ignore_value`` -> -1).

        Raises ``PlanError`` naming ``source`` when a value is neither declared nor ignored.
        """
        a = np.asarray(array)
        if a.size == 0:
            return a.astype(np.int16)
        if not np.issubdtype(a.dtype, np.integer):
            if not np.array_equal(a, np.round(a)):
                raise PlanError(f"{source}: label map has non-integer values")
            a = a.astype(np.int64)
        lo, hi = int(a.min()), int(a.max())
        keys = [*self.label_values, *([] if self.ignore_value is None else [self.ignore_value])]
        vals = [*range(len(self.label_values)), *([] if self.ignore_value is None else [-1])]
        if hi - lo <= 1 << 20:
            lut = np.full(hi - lo + 1, -2, dtype=np.int16)
            for k, v in zip(keys, vals, strict=True):
                if lo <= k <= hi:
                    lut[k - lo] = v
            out = lut[a - lo]
        else:
            order = np.argsort(keys)
            sk = np.asarray(keys)[order]
            pos = np.clip(np.searchsorted(sk, a), 0, len(sk) - 1)
            out = np.where(sk[pos] == a, np.asarray(vals, dtype=np.int16)[order][pos], -2)
            out = out.astype(np.int16)
        if np.any(out == -2):
            bad = sorted(int(v) for v in np.unique(a[out == -2])[:10])
            raise PlanError(
                f"{source}: label values {bad} are not in the declared set {self.label_values}"
                + ("" if self.ignore_value is None else f" (ignore {self.ignore_value})")
                + "; fix the label file or declare them in the manifest's labels"
            )
        return out

    def classes_to_labels(self, array: np.ndarray) -> np.ndarray:
        """Class indices -> file label values (-1 -> ``ignore_value``, or background)."""
        values = list(self.label_values)
        fill = self.ignore_value if self.ignore_value is not None else values[0]
        lut_vals = [*values, fill]
        dtype = next(
            (
                t
                for t in (np.uint8, np.uint16, np.int16, np.int32)
                if np.iinfo(t).min <= min(lut_vals) and max(lut_vals) <= np.iinfo(t).max
            ),
            np.int64,
        )
        lut = np.asarray(lut_vals, dtype=dtype)
        a = np.asarray(array)
        if not np.issubdtype(a.dtype, np.integer):
            a = a.astype(np.int64)
        if a.size and (int(a.max()) >= len(values) or int(a.min()) < -1):
            raise PlanError(
                f"class indices {int(a.min())}..{int(a.max())} outside 0..{len(values) - 1}"
            )
        # -1 indexes the fill value at the end of the table; slabs bound the intp copy that
        # numpy makes of an index array (a 512x512x300 int8 map would need 600 MiB at once)
        out = np.empty(a.shape, dtype=dtype)
        flat_in, flat_out = a.reshape(-1), out.reshape(-1)
        for s in range(0, flat_in.size, 1 << 20):
            flat_out[s : s + (1 << 20)] = lut[flat_in[s : s + (1 << 20)]]
        return out

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


# -- deriving a plan from a fingerprint ------------------------------------------------------

#: nnU-Net's anisotropy rule: an axis more than this times coarser than the others is kept
#: coarse (Isensee et al., "nnU-Net", Nature Methods 18, 2021).
ANISOTROPY_THRESHOLD = 3.0
#: Default memory for one training step's activations (and for one inference tile), GiB.
MEMORY_BUDGET_GB = 2.0
#: Patches per training step assumed when fitting the patch to the memory budget.
BATCH_SIZE = 2
#: Training stores every activation plus its gradient and the norm/ReLU outputs.
_TRAIN_FACTOR = 3.0
#: Convolution work buffers and allocator slack on top of the inference peak estimate.
_INFER_FACTOR = 2.0
_DEFAULT_BASE = {2: 32, 3: 16}
_MAX_DEPTH = {2: 4, 3: 3}
_MODALITY_ALIASES = {"MRI": "MR", "T1": "MR", "T2": "MR", "FLAIR": "MR", "T1C": "MR"}


def _modality(name: str | None) -> str:
    m = (name or "other").strip()
    m = _MODALITY_ALIASES.get(m.upper(), m)
    for known in MODALITIES:
        if m.upper() == known.upper():
            return known
    return "other"


def _train_bytes(output: tuple[int, ...], network: dict[str, Any]) -> float:
    """Estimated bytes of one training step: every feature map of ``BATCH_SIZE`` patches.

    Each level's maps are counted at the level's largest size, so this is an upper bound.
    """
    from medseg.model import shapes

    d, n = network["depth"], network["convs_per_level"]
    widths = shapes.channel_widths(d, network["base_channels"], network["channel_multiplier"])
    m = shapes.margin(d, n)
    traces = [shapes.trace(o + 2 * m, d, n) for o in output]
    total = float(np.prod([o + 2 * m for o in output])) * network["in_channels"]
    for level in range(d + 1):
        if level < d:
            vox = float(np.prod([t.encoder[level] + 2 * n for t in traces]))
        else:
            vox = float(np.prod([t.bottom + 2 * n for t in traces]))
        total += vox * widths[level] * n  # encoder / bottom convs
        if level < d:
            dec = float(np.prod([t.decoder[d - 1 - level] + 2 * n for t in traces]))
            total += dec * widths[level] * (n + 3)  # up, concat (2x), decoder convs
    return total * 4 * BATCH_SIZE * _TRAIN_FACTOR


def _infer_bytes(output: tuple[int, ...], network: dict[str, Any]) -> float:
    from medseg.model import shapes

    return shapes.peak_activation_elements(output, **network) * 4 * _INFER_FACTOR


def _fit(
    start: tuple[int, ...],
    network: dict[str, Any],
    budget_bytes: float,
    cost: Any,
) -> tuple[int, ...]:
    """Largest valid output size <= ``start`` per axis whose ``cost`` fits the budget.

    Shrinks the axis that is largest relative to ``start`` by one pooling lattice step at a
    time (nnU-Net shrinks its patch the same way), down to the smallest valid size.
    """
    from medseg.model import shapes

    d, n = network["depth"], network["convs_per_level"]
    smallest = shapes.min_output_size(d, n)
    size = [max(smallest, shapes.valid_output_size(max(s, smallest), d, n, "le")) for s in start]
    while cost(tuple(size), network) > budget_bytes:
        ratios = [s / max(t, 1) if s > smallest else -1.0 for s, t in zip(size, start, strict=True)]
        ax = int(np.argmax(ratios))
        if ratios[ax] < 0:
            break
        size[ax] = max(smallest, shapes.valid_output_size(size[ax] - (1 << d), d, n, "le"))
    return tuple(size)


def _target_frame(fp: Fingerprint, orientation: tuple[str, str, str] | None):
    """Per case spacing, shape and non-zero box shape in the plan's axis order."""
    spacings, shapes_, boxes = [], [], []
    for c in fp.cases:
        grid, box = c.grid, c.nonzero_box.shape
        if orientation is not None:
            grid, perm, _ = c.grid.reoriented(orientation)
            box = tuple(box[p] for p in perm)
        spacings.append(grid.spacing)
        shapes_.append(grid.shape)
        boxes.append(box)
    return np.array(spacings), np.array(shapes_), np.array(boxes)


def target_spacing_rule(spacings: np.ndarray, shapes_: np.ndarray) -> tuple[float, float, float]:
    """Median spacing per axis; a strongly anisotropic coarse axis stays coarse.

    nnU-Net's rule: if the coarsest median axis is more than 3x coarser than the others and
    has fewer than a third of their voxels, its target is the 10th percentile of its spacings
    (not the median, which would upsample the many thin-sliced cases less than it should, nor
    the fine in-plane spacing, which would invent slices).
    """
    target = np.median(spacings, axis=0)
    size = np.median(shapes_ * spacings / target, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    if target[worst] > ANISOTROPY_THRESHOLD * max(target[others]) and size[
        worst
    ] * ANISOTROPY_THRESHOLD < min(size[others]):
        t = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(t, float(max(target[others])) + 1e-5)
    return (float(target[0]), float(target[1]), float(target[2]))


def make_plan(
    fp: Fingerprint,
    overrides: dict[str, Any] | None = None,
    *,
    memory_budget_gb: float = MEMORY_BUDGET_GB,
    source: str = "pipeline [plan]",
) -> Plan:
    """Derive the plan from a fingerprint, then apply ``overrides`` (the TOML ``[plan]``).

    ``overrides`` may set any ``Plan`` field; ``network`` and ``channels`` merge into the
    derived values (``channels`` by position). Patch and tile sizes are refitted unless given.
    Unknown keys raise ``PlanError`` naming ``source``.
    """
    ov = dict(overrides or {})
    known = {f.name for f in fields(Plan)} - {"version"}
    unknown = sorted(set(ov) - known)
    if unknown:
        raise PlanError(f"{source}: unknown plan keys {unknown}; allowed: {sorted(known)}")
    if not fp.cases:
        raise PlanError(f"{source}: no readable case to plan from")

    spatial_dims = int(
        ov.get("spatial_dims", 2 if all(c.grid.shape[2] == 1 for c in fp.cases) else 3)
    )
    orientation = ov.get("orientation", ("R", "A", "S") if spatial_dims == 3 else None)
    # TOML cannot write None: "none" keeps each scan's own orientation
    native = orientation in (None, False, "", "none", "native")
    orientation = None if native else tuple(orientation)  # type: ignore[arg-type]
    spacings, shapes_, boxes = _target_frame(fp, orientation)
    target = _plan_spacing(ov, spatial_dims, spacings, shapes_)
    crop = bool(ov.get("crop_to_nonzero", spatial_dims == 3))
    declared, names, regions = _plan_labels(fp, ov)
    channels = _plan_channels(fp, ov, source)

    # Network: depth from the median (cropped) case in target voxels, widths CPU-friendly.
    sizes = (boxes if crop else shapes_) * spacings / np.asarray(target)[None, :]
    median = np.median(sizes, axis=0)[:spatial_dims]
    network = _plan_network(ov, spatial_dims, len(channels), len(declared), median, source)
    patch, tile, margin = _plan_sizes(ov, network, median, memory_budget_gb, source)
    extra = dict(ov.get("extra", {}))
    extra.setdefault("memory_budget_gb", float(memory_budget_gb))
    extra.setdefault("median_shape", [float(s) for s in median])
    try:
        return Plan(
            spatial_dims=spatial_dims,
            channels=channels,
            label_values=declared,
            class_names=list(ov.get("class_names", names)),
            network=network,
            patch_output_size=patch,
            tile_output_size=tile,
            margin=margin,
            regions=ov.get("regions", regions),
            ignore_value=ov.get("ignore_value"),
            orientation=orientation,  # type: ignore[arg-type]
            target_spacing=None if target is None else tuple(round(float(t), 6) for t in target),
            crop_to_nonzero=crop,
            extra=extra,
        )
    except (TypeError, ValueError) as exc:
        raise PlanError(f"{source}: invalid plan override ({exc})") from exc


def _plan_spacing(
    ov: dict[str, Any], spatial_dims: int, spacings: np.ndarray, shapes_: np.ndarray
) -> Any:
    """Target spacing in mm: the override, the median for 2D, else :func:`target_spacing_rule`."""
    if "target_spacing" in ov:
        return ov["target_spacing"]
    if spatial_dims == 2:
        med = np.median(spacings, axis=0)
        return (float(med[0]), float(med[1]), float(med[2]))
    return target_spacing_rule(spacings, shapes_)


def _plan_labels(
    fp: Fingerprint, ov: dict[str, Any]
) -> tuple[list[int], list[str], dict[str, list[int]] | None]:
    """File value of each class, class names and regions (as class indices).

    The manifest's declaration, else the values seen; class 0 is the smallest value."""
    declared = sorted(fp.labels) if fp.labels else sorted(fp.label_counts)
    if len(declared) < 2:
        declared = sorted({*declared, 0, 1})
    declared = [int(v) for v in ov.get("label_values", declared)]
    names = [fp.labels.get(v, str(v)) if fp.labels else str(v) for v in declared]
    regions = None
    if fp.regions:
        index = {v: i for i, v in enumerate(declared)}
        regions = {k: [index[v] for v in vs if v in index] for k, vs in fp.regions.items()}
    return declared, names, regions


def _plan_channels(fp: Fingerprint, ov: dict[str, Any], source: str) -> list[ChannelPlan]:
    """Normalisation per channel from its modality and statistics, then the overrides."""
    channels = []
    for i, name in enumerate(fp.channels):
        mod = _modality(fp.modalities[i] if fp.modalities else None)
        st = fp.channel_stats[i] if i < len(fp.channel_stats) else None
        if mod == "CT" and st is not None:
            channels.append(
                ChannelPlan(name, mod, "ct", (st.p00_5, st.p99_5), st.mean, max(st.std, 1e-6))
            )
        else:
            channels.append(ChannelPlan(name, mod, "zscore_nonzero" if mod == "MR" else "zscore"))
    for i, c_ov in enumerate(ov.get("channels", [])):
        if i >= len(channels) or not isinstance(c_ov, dict):
            raise PlanError(f"{source}: channels override {i} does not match a channel")
        bad = set(c_ov) - {f.name for f in fields(ChannelPlan)}
        if bad:
            raise PlanError(f"{source}: unknown channel keys {sorted(bad)}")
        channels[i] = ChannelPlan(**{**asdict(channels[i]), **c_ov})
    return channels


def _plan_network(
    ov: dict[str, Any],
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    median: np.ndarray,
    source: str,
) -> dict[str, Any]:
    """UNet keyword arguments: depth from the median case size (voxels), then the overrides."""
    depth = int(np.clip(np.floor(np.log2(max(min(median), 1) / 8)), 1, _MAX_DEPTH[spatial_dims]))
    network: dict[str, Any] = {
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "depth": depth,
        "base_channels": _DEFAULT_BASE[spatial_dims],
        "channel_multiplier": 2,
        "convs_per_level": 2,
        "upsampling": "transpose",
        "norm": "batch",
        "dropout": 0.0,
    }
    net_ov = ov.get("network", {})
    bad_net = set(net_ov) - set(network)
    if bad_net:
        raise PlanError(f"{source}: unknown network keys {sorted(bad_net)}")
    network.update(net_ov)
    network["spatial_dims"], network["in_channels"] = spatial_dims, in_channels
    network["out_channels"] = out_channels
    return network


def _plan_sizes(
    ov: dict[str, Any],
    network: dict[str, Any],
    median: np.ndarray,
    memory_budget_gb: float,
    source: str,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Training patch and inference tile (output voxels) fitted to the memory budget, and the
    margin valid convolutions consume per side."""
    from medseg.model import shapes

    d, n = int(network["depth"]), int(network["convs_per_level"])
    margin = (shapes.margin(d, n),) * int(network["spatial_dims"])
    budget = float(memory_budget_gb) * 2**30
    start = tuple(int(round(s)) for s in median)
    for key in ("patch_output_size", "tile_output_size"):
        for s in ov.get(key, ()):
            if not shapes.is_valid_output(int(s), d, n):
                raise PlanError(
                    f"{source}: {key} {list(ov[key])} is not valid for depth {d}; nearest valid "
                    f"for {s}: {shapes.valid_output_size(int(s), d, n, 'ge')}"
                )
    patch = (
        tuple(ov["patch_output_size"])
        if "patch_output_size" in ov
        else _fit(start, network, budget, _train_bytes)
    )
    tile = (
        tuple(ov["tile_output_size"])
        if "tile_output_size" in ov
        else _fit(
            tuple(shapes.valid_output_size(s, d, n, "ge") for s in start),
            network,
            budget,
            _infer_bytes,
        )
    )
    return patch, tile, margin
