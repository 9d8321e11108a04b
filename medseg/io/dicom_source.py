"""The source series of a derived DICOM object (SEG, RTSTRUCT): headers, placement, identity.

A derived object copies the patient and study of its source images and shares their Frame of
Reference. Anonymised files often lack Type 2 attributes (which must be present, possibly
empty) and sometimes the Type 1 FrameOfReferenceUID or StudyInstanceUID. :func:`load_source`
fills the Type 2 ones empty, as the standard allows (PS3.5 7.4.5), and mints a missing Type 1
UID deterministically from the SeriesInstanceUID, so that every object written for one series
shares it; a minted Frame of Reference is said in one warning line.

Placement comes from medseg's own reader (:func:`medseg.io.dicom.read_geometry`): the grid a
label map of this series lives on, and the stored image (file, frame) at each slice.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.io.dicom import SeriesGeometry, read_geometry
from medseg.volume import GRID_ATOL_MM, LPS_TO_RAS, Grid, Volume

#: Type 2 attributes of the Patient and General Study modules copied into derived objects.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


class MedsegDicomWarning(UserWarning):
    """A source series needed a fix the standard allows (e.g. a minted Frame of Reference)."""


@dataclass(frozen=True)
class SourceSeries:
    """A source series ready to be referenced: its geometry and its filled headers."""

    geometry: SeriesGeometry
    headers: dict[Path, Any]  # pydicom datasets without pixel data, Type 2 filled
    frame_of_reference_uid: str
    study_uid: str
    minted: tuple[str, ...]  # names of the Type 1 UIDs that were minted

    @property
    def grid(self) -> Grid:
        return self.geometry.grid

    @property
    def first(self) -> Any:
        return self.headers[self.geometry.slices[0][0].path]

    def slice_headers(self, k: int) -> list[tuple[Any, int | None]]:
        """``(dataset, 1-based frame number or None)`` of every stored image at slice ``k``."""
        out: list[tuple[Any, int | None]] = []
        for src in self.geometry.slices[k]:
            ds = self.headers[src.path]
            multi = int(ds.get("NumberOfFrames", 1) or 1) > 1
            out.append((ds, src.frame + 1 if multi else None))
        return out

    def lps_affine(self) -> np.ndarray:
        """The grid's affine in DICOM LPS: ``(i, j, k, 1) -> (x, y, z, 1)`` mm."""
        return lps_affine(self.grid)


def lps_affine(grid: Grid) -> np.ndarray:
    """A RAS+ grid's affine in DICOM LPS: ``(i, j, k, 1) -> (x, y, z, 1)`` mm."""
    return np.asarray(LPS_TO_RAS @ grid.affine)


def ras_affine(affine_lps: np.ndarray) -> np.ndarray:
    """An LPS affine as RAS+ (the flip is its own inverse)."""
    return np.asarray(LPS_TO_RAS @ affine_lps)


def _minted_uid(kind: str, series_uid: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[kind, series_uid]))


def load_source(path: Path, *, series: str | int | None = None) -> SourceSeries:
    """Geometry and filled headers of the series under ``path`` (folder or file)."""
    from medseg.io.dicom import _quiet_read

    geo = read_geometry(path, series=series)
    files = sorted({src.path for slot in geo.slices for src in slot})
    headers = {f: _quiet_read(f, stop_before_pixels=True) for f in files}
    minted: list[str] = []
    found = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in headers.values()} - {""}
    studies = {str(ds.get("StudyInstanceUID", "") or "") for ds in headers.values()} - {""}
    for_uid = sorted(found)[0] if found else _minted_uid("FrameOfReferenceUID", geo.series_uid)
    study_uid = sorted(studies)[0] if studies else _minted_uid("StudyInstanceUID", geo.series_uid)
    if not found:
        minted.append("FrameOfReferenceUID")
        warnings.warn(
            f"{path}: the series has no FrameOfReferenceUID; minted {for_uid} for the "
            "objects written from it",
            MedsegDicomWarning,
            stacklevel=2,
        )
    if not studies:
        minted.append("StudyInstanceUID")
    series_uid = geo.series_uid
    if series_uid.startswith("("):  # the reader's placeholder for a missing UID
        series_uid = _minted_uid("SeriesInstanceUID", str(files[0]))
        minted.append("SeriesInstanceUID")
    for ds in headers.values():
        _fill(ds, for_uid, study_uid, series_uid)
    return SourceSeries(geo, headers, for_uid, study_uid, tuple(minted))


def _fill(ds: Any, for_uid: str, study_uid: str, series_uid: str) -> None:
    for name in _TYPE2:
        if name not in ds:
            setattr(ds, name, None)
    if not ds.get("FrameOfReferenceUID"):
        ds.FrameOfReferenceUID = for_uid
    if not ds.get("StudyInstanceUID"):
        ds.StudyInstanceUID = study_uid
    if not ds.get("SeriesInstanceUID"):
        ds.SeriesInstanceUID = series_uid
    if "PositionReferenceIndicator" not in ds:
        ds.PositionReferenceIndicator = None
    meta = getattr(ds, "file_meta", None)
    if not ds.get("SOPClassUID") and meta is not None:
        ds.SOPClassUID = meta.get("MediaStorageSOPClassUID", "")
    if not ds.get("SOPInstanceUID") and meta is not None:
        ds.SOPInstanceUID = meta.get("MediaStorageSOPInstanceUID", "")


def check_on_grid(label: Volume, source: SourceSeries, what: str, error: type[Exception]) -> None:
    """Refuse a label map whose grid is not the series' grid (shape, then corner distance)."""
    grid = source.grid
    if label.grid.shape != grid.shape:
        # different shapes: Grid.max_corner_distance is infinite, so say how far the
        # corresponding corners of the two boxes lie apart
        d = float(np.max(np.linalg.norm(label.grid.corners() - grid.corners(), axis=1)))
        raise error(
            f"{what}: label map is not on the grid of {source.geometry.path} ({label.grid.shape} "
            f"vs {grid.shape} voxels, corners up to {d:.3g} mm apart); resample it first"
        )
    d = label.grid.max_corner_distance(grid)
    if d > GRID_ATOL_MM:
        raise error(
            f"{what}: label map is not on the grid of {source.geometry.path} (corners up to "
            f"{d:.3g} mm apart, tolerance {GRID_ATOL_MM:g} mm); resample it onto the series first"
        )


def label_values(label: Volume, labels: dict[int, str] | None, what: str, error: type) -> list[int]:
    """Nonzero label values to encode: those of ``labels`` (or present in the map), ascending.

    A map without any nonzero voxel is refused unless ``labels`` names what it should hold (a
    model's empty prediction is still a result: its segments are written, empty)."""
    present = {int(v) for v in np.unique(label.array)} - {0}
    if not present and not (set(labels or {}) - {0}):
        raise error(f"{what}: label map is empty (no nonzero voxel); nothing to encode")
    values = sorted(present if labels is None else {int(v) for v in labels} - {0})
    missing = present - set(values)
    if missing:
        raise error(
            f"{what}: label values {sorted(missing)} are not among the named labels "
            f"{values}; name them in labels or remove them"
        )
    return values


def copy_header(ds: Any) -> Any:
    """A deep copy of a header dataset (so filling and edits never touch the cache)."""
    return copy.deepcopy(ds)


@contextlib.contextmanager
def reported_dicom_warnings(report: Callable[[str], None]) -> Iterator[None]:
    """Run the block, then hand ``report`` each distinct DICOM fix warning
    (:class:`medseg.io.dicom_source.MedsegDicomWarning`, e.g. a minted Frame of Reference)
    as one line; other warnings are shown as usual."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MedsegDicomWarning)
        try:
            yield
        finally:
            seen: set[str] = set()
            for w in caught:
                if not issubclass(w.category, MedsegDicomWarning):
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
                elif str(w.message) not in seen:
                    seen.add(str(w.message))
                    report(str(w.message))
