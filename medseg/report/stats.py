"""Structure statistics of a label map: per label value, its size, place and intensities.

Coordinates follow the project's convention (:mod:`medseg.volume`): world positions are RAS+
millimetres (+x = Right, +y = Anterior, +z = Superior, as nibabel), the same for every input
format; DICOM's LPS is converted once, in its reader, so a DICOM patient position is
``(-x, -y, z)`` of the values here. Positions are those of voxel centres.

Per label value: ``voxels`` (count), ``volume_ml`` (count times the voxel volume
``|det(affine[:3, :3])|`` mm^3, / 1000), ``bbox_voxels`` (half-open index box ``start``/
``stop`` along I, J, K), ``bbox_min_mm``/``bbox_max_mm`` (per world axis the smallest and
largest RAS+ coordinate of its voxel centres: the axis-aligned box around the centres),
``centroid_mm`` (mean RAS+ position of its voxel centres) and per input channel the ``mean``
and ``sd`` (population standard deviation, ``ddof = 0``) of the voxel values inside it.
A label with no voxel has zero count and volume and ``None`` elsewhere.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.volume import Volume

#: Columns of the cohort CSV, in order (channel statistics follow as mean_<ch>, sd_<ch>).
CSV_COLUMNS = (
    "case_id",
    "label",
    "name",
    "voxels",
    "volume_ml",
    "bbox_min_x_mm",
    "bbox_min_y_mm",
    "bbox_min_z_mm",
    "bbox_max_x_mm",
    "bbox_max_y_mm",
    "bbox_max_z_mm",
    "centroid_x_mm",
    "centroid_y_mm",
    "centroid_z_mm",
)


@dataclass(frozen=True)
class StructureStats:
    """Statistics of one label value (see the module docstring for units and axes)."""

    label: int
    name: str
    voxels: int
    volume_ml: float
    bbox_voxels: dict[str, list[int]] | None
    bbox_min_mm: list[float] | None
    bbox_max_mm: list[float] | None
    centroid_mm: list[float] | None
    channels: dict[str, dict[str, float | None]]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of the fields."""
        return asdict(self)


def _channels(
    images: Sequence[Volume], labels: Volume, names: Sequence[str] | None
) -> list[tuple[str, np.ndarray]]:
    """``(name, (I, J, K) array)`` of every channel of ``images``, checked to share the grid."""
    out: list[tuple[str, np.ndarray]] = []
    for vol in images:
        if vol.grid.shape != labels.grid.shape or not vol.grid.allclose(labels.grid):
            src = vol.meta.get("source", "image")
            raise MedsegError(
                f"{src}: image grid differs from the label map's (corners up to "
                f"{vol.grid.max_corner_distance(labels.grid):.3g} mm apart); give images on "
                "the label map's grid"
            )
        out.extend((f"ch{len(out)}", c) for c in vol.array)
    if names is not None and len(names) == len(out):
        out = [(str(n), a) for n, (_, a) in zip(names, out, strict=True)]
    return out


def _entry(
    labels: Volume,
    value: int,
    name: str,
    box: tuple[slice, ...],
    chans: Sequence[tuple[str, np.ndarray]],
    voxel_ml: float,
) -> StructureStats:
    """Statistics of ``value`` whose voxels all lie inside the index box ``box``."""
    mask = np.asarray(labels.array[0][box]) == value
    local = np.nonzero(mask)
    count = int(local[0].size)
    if count == 0:
        empty: dict[str, dict[str, float | None]] = {
            c: {"mean": None, "sd": None} for c, _ in chans
        }
        return StructureStats(value, name, 0, 0.0, None, None, None, None, empty)
    ijk = np.stack([q + s.start for q, s in zip(local, box, strict=True)], axis=1)
    start, stop = ijk.min(axis=0), ijk.max(axis=0) + 1
    # the extremes of the centres along each world axis (for an oblique grid these need not
    # be corners of the index box): project the voxels themselves, one axis at a time
    a = labels.grid.affine
    world_min = [float((ijk @ a[r, :3]).min() + a[r, 3]) for r in range(3)]
    world_max = [float((ijk @ a[r, :3]).max() + a[r, 3]) for r in range(3)]
    centroid = labels.grid.world(ijk.mean(axis=0)[None])[0]
    stats: dict[str, dict[str, float | None]] = {}
    for cname, arr in chans:
        v = np.asarray(arr[box], dtype=np.float64)[mask]
        stats[cname] = {"mean": float(v.mean()), "sd": float(v.std())}
    return StructureStats(
        value,
        name,
        count,
        count * voxel_ml,
        {"start": [int(x) for x in start], "stop": [int(x) for x in stop]},
        world_min,
        world_max,
        [float(x) for x in centroid],
        stats,
    )


def structure_stats(
    labels: Volume,
    images: Sequence[Volume] = (),
    *,
    names: Mapping[int, str] | None = None,
    values: Sequence[int] | None = None,
    channel_names: Sequence[str] | None = None,
) -> list[StructureStats]:
    """Statistics of every nonzero label value of ``labels`` ``(1, I, J, K)``, ascending.

    ``values`` lists the label values to report (default: the nonzero values present;
    values absent from the map get zero counts); ``names`` maps values to names (default
    ``"label <v>"``); ``images`` are the input channels on the label map's grid, named by
    ``channel_names`` (default ``ch0``, ``ch1``, ...). Each value's voxels are found inside
    its bounding box (``scipy.ndimage.find_objects``, one pass), so many small structures
    cost little more than one.
    """
    from scipy import ndimage

    lab = np.asarray(labels.array[0])
    chans = _channels(images, labels, channel_names)
    present = {int(v) for v in np.unique(lab)} - {0}
    wanted = sorted(present) if values is None else sorted({int(v) for v in values} - {0})
    positive = [v for v in wanted if v > 0 and v in present]
    # find_objects reads values <= 0 as background; only signed maps need the copy
    positives = lab if lab.dtype.kind == "u" else np.where(lab > 0, lab, 0)
    boxes = ndimage.find_objects(positives, max(positive, default=0)) if positive else []
    voxel_ml = abs(float(np.linalg.det(labels.grid.affine[:3, :3]))) / 1000.0
    whole = tuple(slice(0, n) for n in lab.shape)
    out = []
    for value in wanted:
        name = str((names or {}).get(value) or f"label {value}")
        box = boxes[value - 1] if value in positive else None
        if box is None and value in present:
            box = whole  # a negative value: no box from find_objects
        if box is None:
            box = tuple(slice(0, 0) for _ in lab.shape)
        out.append(_entry(labels, value, name, box, chans, voxel_ml))
    return out


def stats_json(stats: Sequence[StructureStats], **context: Any) -> dict[str, Any]:
    """The JSON document written beside a prediction: ``context`` (e.g. the prediction's
    file), the coordinate convention, and one entry per label."""
    return {
        **context,
        "coordinates": "RAS+ mm of voxel centres (DICOM LPS = (-x, -y, z))",
        "sd": "population standard deviation (ddof = 0)",
        "labels": [s.to_json() for s in stats],
    }


def stats_rows(case_id: str, stats: Sequence[StructureStats]) -> list[dict[str, Any]]:
    """One flat CSV row per label of one case (bounding box and centroid per axis)."""
    rows = []
    for s in stats:
        row: dict[str, Any] = {
            "case_id": case_id,
            "label": s.label,
            "name": s.name,
            "voxels": s.voxels,
            "volume_ml": s.volume_ml,
        }
        for key, vec in (("bbox_min", s.bbox_min_mm), ("bbox_max", s.bbox_max_mm)):
            for axis, v in zip("xyz", vec or (None,) * 3, strict=True):
                row[f"{key}_{axis}_mm"] = v
        for axis, v in zip("xyz", s.centroid_mm or (None,) * 3, strict=True):
            row[f"centroid_{axis}_mm"] = v
        for cname, ms in s.channels.items():
            row[f"mean_{cname}"], row[f"sd_{cname}"] = ms["mean"], ms["sd"]
        rows.append(row)
    return rows


def rows_from_json(case_id: str, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """CSV rows of one case from its stats JSON document (:func:`stats_json`)."""
    stats = [StructureStats(**item) for item in doc.get("labels", [])]
    return stats_rows(case_id, stats)


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV: :data:`CSV_COLUMNS` first, then channel columns in first-seen order;
    empty cells where a value is missing."""
    columns = list(CSV_COLUMNS)
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def stats_path(prediction: Path) -> Path:
    """Where the stats of ``prediction`` go: ``<stem>_stats.json`` beside it."""
    from medseg.io import split_suffix

    stem, _ = split_suffix(prediction)
    return prediction.with_name(f"{stem}_stats.json")
