"""RT Structure Sets (RTSTRUCT): write a label map's ROIs as contours, rasterise them back.

Encoding library: none. The RT Structure Set IOD (PS3.3 A.19) is written with pydicom
directly. highdicom has no RTSTRUCT writer; rt-utils (last release 1.2.7, 2023) computes
contours with OpenCV on pixel corners, sorts slices by its own rules and needs the pixels of
every source image, where medseg must place contours by its own geometry (grid, gantry tilt,
any in-plane orientation). The IOD is small: Patient, General Study, RT Series, General
Equipment, Structure Set, ROI Contour, RT ROI Observations and SOP Common modules.

Contours: for every ROI (one per nonzero label value) and every slice ``k`` of the series'
grid, marching squares (scikit-image ``find_contours`` at level 0.5 on the zero-padded
binary slice) gives closed planar contours whose vertices lie half-way between each boundary
voxel centre and its outside neighbour, so that the voxels whose centres fall inside the
polygons are exactly the ROI's voxels. Holes come out as inner contours on the same slice;
readers combine the contours of one slice by the even-odd rule (as treatment-planning
systems do), and so does :func:`read_rtstruct`. Each contour names the image of its slice
(ContourImageSequence). Enhanced multi-frame and mosaic sources are refused: contours
reference single-frame images only, so such series go to DICOM-SEG.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import RTStructError
from medseg.io.dicom import read_geometry
from medseg.io.dicom_source import (
    SourceSeries,
    check_on_grid,
    label_values,
    load_source,
    lps_affine,
)
from medseg.volume import Volume

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
#: Contour vertices further than this (voxels) from a slice plane do not belong to it.
_ON_SLICE_VOXELS = 0.05
_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255))


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a 2D ``(I, J)`` mask as ``(n, 2)`` voxel coordinates (i, j).

    Marching squares at level 0.5 on the mask padded by one zero voxel: every contour closes,
    holes included; the repeated closing vertex is dropped.
    """
    from skimage.measure import find_contours

    padded = np.pad(mask.astype(np.float32), 1)
    return [c[:-1] - 1.0 for c in find_contours(padded, 0.5) if len(c) > 3]


def _code_item(scheme: str, value: str, meaning: str) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _contour_items(mask: np.ndarray, source: SourceSeries) -> list[Any]:
    from pydicom.dataset import Dataset

    a = lps_affine(source.grid)
    items = []
    for k in range(mask.shape[2]):
        if not mask[:, :, k].any():
            continue
        ds, _ = source.slice_headers(k)[0]
        image = Dataset()
        image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = (
            ds.SOPClassUID,
            ds.SOPInstanceUID,
        )
        for c in slice_contours(mask[:, :, k]):
            ijk = np.column_stack([c, np.full(len(c), k), np.ones(len(c))])
            lps = (a @ ijk.T)[:3].T
            item = Dataset()
            item.ContourImageSequence = [image]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(lps)
            item[_CONTOUR_DATA] = _ds_element(_CONTOUR_DATA, lps.ravel())
            items.append(item)
    return items


#: (3006,0050) Contour Data
_CONTOUR_DATA = 0x30060050


def _ds_element(tag: int, values: np.ndarray) -> Any:
    """A DS element of ``values`` (mm, 4 decimals) as encoded text: pydicom would otherwise
    parse and check every number as it is set (most of the time a large structure set takes
    to write)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    text = "\\".join(f"{v:.4f}" for v in values)
    if len(text) % 2:
        text += " "  # DS values have even length, padded with a space
    raw = text.encode("ascii")
    return RawDataElement(Tag(tag), "DS", len(raw), raw, 0, False, True)


def _header(source: SourceSeries, algorithm: tuple[str, str]) -> Any:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(RTSTRUCT_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    src = source.first
    for name in ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate"):
        if name in src:
            setattr(ds, name, src.get(name))
    for name in ("PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID"):
        setattr(ds, name, src.get(name))
    ds.AccessionNumber = src.get("AccessionNumber")
    ds.StudyInstanceUID = source.study_uid
    now = datetime.datetime.now()
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = "RTSTRUCT", generate_uid()
    ds.SeriesNumber = int(src.get("SeriesNumber", 0) or 0) + 2000
    ds.SeriesDescription = f"{algorithm[0]} structures"[:64]
    ds.OperatorsName = None
    ds.Manufacturer = "medseg"
    ds.ManufacturerModelName, ds.SoftwareVersions = algorithm[0], algorithm[1]
    ds.InstanceNumber = 1
    ds.StructureSetLabel = str(algorithm[0])[:16]
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.FrameOfReferenceUID = source.frame_of_reference_uid
    return ds


def _referenced_frame(source: SourceSeries) -> Any:
    from pydicom.dataset import Dataset

    images = []
    for k in range(source.grid.shape[2]):
        ds, _ = source.slice_headers(k)[0]
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = (
            ds.SOPClassUID,
            ds.SOPInstanceUID,
        )
        images.append(item)
    series = Dataset()
    series.SeriesInstanceUID = source.first.SeriesInstanceUID
    series.ContourImageSequence = images
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired)
    study.ReferencedSOPInstanceUID = source.study_uid
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = source.frame_of_reference_uid
    frame.RTReferencedStudySequence = [study]
    return frame


def _rois(
    ds: Any,
    label: Volume,
    values: list[int],
    labels: Mapping[int, str] | None,
    codes: Any,
    source: SourceSeries,
) -> None:
    from pydicom.dataset import Dataset

    from medseg.io.dicom_seg import segment_codes

    rois, contours, observations = [], [], []
    for n, value in enumerate(values, start=1):
        name = str((labels or {}).get(value) or f"label {value}")[:64]
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = n, source.frame_of_reference_uid
        roi.ROIName, roi.ROIGenerationAlgorithm = name, "AUTOMATIC"
        rois.append(roi)
        contour = Dataset()
        contour.ReferencedROINumber = n
        contour.ROIDisplayColor = list(_COLOURS[(n - 1) % len(_COLOURS)])
        contour.ContourSequence = _contour_items(label.array[0] == value, source)
        contours.append(contour)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber = n, n
        obs.RTROIInterpretedType, obs.ROIInterpreter = "ORGAN", None
        kind = segment_codes(value, codes)[1]
        obs.RTROIIdentificationCodeSequence = [
            _code_item(kind.scheme_designator, kind.value, kind.meaning)
        ]
        observations.append(obs)
    ds.StructureSetROISequence = rois
    ds.ROIContourSequence = contours
    ds.RTROIObservationsSequence = observations


def write_rtstruct(
    label: Volume,
    reference: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    labels: Mapping[int, str] | None = None,
    *,
    series: str | int | None = None,
    codes: Any = None,
    algorithm: tuple[str, str] | None = None,
) -> Path:
    """Write ``label`` (on the grid of the series ``reference``) as an RT Structure Set.

    One ROI per nonzero label value (named from ``labels``; coded identification from
    ``codes`` as :func:`medseg.io.dicom_seg.segment_codes` reads it). Raises
    ``RTStructError`` for an enhanced multi-frame or mosaic series, a label not on the grid
    or an empty label. Written atomically; the path is returned.
    """
    from medseg import __version__
    from medseg.atomic import write_with

    out, what = Path(out_path), str(label.meta.get("source", "label map"))
    geometry = read_geometry(Path(reference), series=series)
    if geometry.enhanced or geometry.mosaic:
        kind = "an enhanced multi-frame" if geometry.enhanced else "a mosaic"
        raise RTStructError(
            f"{reference}: {kind} series; RTSTRUCT contours need single-frame images, write "
            "a DICOM-SEG instead (--format dicom-seg)"
        )
    source = load_source(Path(reference), series=series)
    check_on_grid(label, source, what, RTStructError)
    values = label_values(label, dict(labels) if labels is not None else None, what, RTStructError)
    algorithm = algorithm or ("medseg", __version__)
    ds = _header(source, algorithm)
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame(source)]
    _rois(ds, label, values, labels, codes, source)
    write_with(out, lambda tmp: ds.save_as(str(tmp), enforce_file_format=True))
    return out


def is_rtstruct(ds: Any) -> bool:
    """True for an RT Structure Set dataset (by SOP class, else Modality RTSTRUCT)."""
    sop = str(ds.get("SOPClassUID", "") or "")
    meta = getattr(ds, "file_meta", None)
    if not sop and meta is not None:
        sop = str(meta.get("MediaStorageSOPClassUID", "") or "")
    return sop == RTSTRUCT_SOP_CLASS or str(ds.get("Modality", "")).upper() == "RTSTRUCT"


def read_rtstruct(
    path: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    *,
    series: str | int | None = None,
) -> Volume:
    """Rasterise an RT Structure Set onto the grid medseg reads ``reference`` on.

    Voxel value ``n`` marks ROI ``n`` in StructureSetROISequence order (later ROIs win where
    they overlap); contours of one ROI on one slice combine by the even-odd rule (holes).
    A voxel belongs to a polygon when its centre lies inside it.
    """
    from medseg.io.dicom import _quiet_read

    p = Path(path)
    try:
        ds = _quiet_read(p)
    except Exception as exc:
        raise RTStructError(f"{p}: not a readable DICOM file ({type(exc).__name__})") from exc
    if not is_rtstruct(ds):
        raise RTStructError(f"{p}: not an RT Structure Set (modality {ds.get('Modality', '?')})")
    grid = read_geometry(Path(reference), series=series).grid
    inv = np.linalg.inv(lps_affine(grid))
    number = {int(r.ROINumber): i for i, r in enumerate(ds.StructureSetROISequence, start=1)}
    out = np.zeros(grid.shape, dtype=np.uint16)
    for roi in ds.get("ROIContourSequence", []):
        value = number.get(int(roi.ReferencedROINumber))
        if value is not None:
            mask = _rasterise(roi.get("ContourSequence", []), inv, grid.shape, p)
            out[mask] = value
    names = {
        i: str(r.ROIName) for r in ds.StructureSetROISequence for i in [number[int(r.ROINumber)]]
    }
    meta = {"source": str(p), "format": "rtstruct", "rois": names}
    return Volume(out[None], grid, True, meta)


def _rasterise(contours: Any, inv: np.ndarray, shape: tuple[int, int, int], p: Path) -> np.ndarray:
    from skimage.draw import polygon

    mask = np.zeros(shape, dtype=bool)
    for c in contours:
        pts = np.asarray([float(v) for v in c.ContourData]).reshape(-1, 3)
        idx = (inv @ np.column_stack([pts, np.ones(len(pts))]).T)[:3]
        k = int(np.rint(idx[2].mean()))
        if np.max(np.abs(idx[2] - k)) > _ON_SLICE_VOXELS or not 0 <= k < shape[2]:
            raise RTStructError(
                f"{p}: a contour does not lie on a slice of the reference series; give the "
                "series the structure set was drawn on"
            )
        rr, cc = polygon(idx[0], idx[1], shape=shape[:2])
        mask[rr, cc, k] ^= True
    return mask
