"""DICOM Segmentation objects (SEG): write a label map of a DICOM series, read one back.

Encoding is highdicom's (Herrmann et al., "Highdicom: a Python library for standardized
encoding of image annotations and machine learning model outputs in pathology and
radiology", J Digit Imaging 35:1719-1737, 2022); placement is medseg's: the label map must be
on the grid :func:`medseg.io.dicom.read` gives the series, and every SEG frame carries the
position and orientation of its slice of that grid (LPS), computed here from the grid, never
taken from a source file's own geometry. highdicom derives frame geometry from its source
images and refuses many real ones (enhanced files with per-frame orientation, mosaics,
missing SliceThickness or SOPClassUID), so it is given one single-frame stand-in with the
source's identity (patient, study, series, Frame of Reference, first SOP instance) and
explicit plane positions; medseg then writes the references itself: every source image in
the ReferencedSeriesSequence, and per frame a DerivationImageSequence naming the stored
image(s) (file and frame number) of that slice.

Segments: one per nonzero label value, numbered 1..S in ascending value order, each with a
label name, a coded category and type (default SCT 91723000 "Anatomical Structure" / SCT
85756007 "Tissue"; settable per value, see :func:`segment_codes`) and the algorithm "medseg"
with its version. BINARY by default; FRACTIONAL (probability, 8 bits) when
``fractional`` holds one probability map per segment. Every frame of the series is written,
empty ones included, so the object alone gives back the series' slice geometry.

Reading (:func:`read_dicom_seg`) places every frame's pixels through the frame's own
ImagePositionPatient, ImageOrientationPatient and PixelSpacing onto the reference series'
grid (or, without one, onto the grid the frames span); voxel values are segment numbers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DicomSegError
from medseg.io.dicom import read_geometry
from medseg.io.dicom_source import (
    SourceSeries,
    check_on_grid,
    copy_header,
    label_values,
    load_source,
    lps_affine,
    ras_affine,
)
from medseg.volume import Grid, Volume

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: Default coded category and type of a segment: (scheme, value, meaning).
DEFAULT_CATEGORY = ("SCT", "91723000", "Anatomical Structure")
DEFAULT_TYPE = ("SCT", "85756007", "Tissue")
#: Frames whose pixel centres land further than this (voxels) from the grid are off-grid.
_ON_GRID_VOXELS = 0.05

_CLASSIC = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "OT": "1.2.840.10008.5.1.4.1.1.7",
}

Codes = Mapping[int | str, Mapping[str, Sequence[str]]]


def segment_codes(value: int, codes: Codes | None) -> tuple[Any, Any]:
    """Coded (category, type) of label ``value`` as highdicom ``CodedConcept`` objects.

    ``codes`` maps a label value (int or its string, as TOML keys are) to
    ``{"category": [scheme, value, meaning], "type": [scheme, value, meaning]}``; either key
    may be left out for the default. In a pipeline TOML::

        [infer.dicom_codes.1]
        category = ["SCT", "123037004", "Anatomical Structure"]
        type = ["SCT", "10200004", "Liver"]
    """
    from highdicom.sr.coding import CodedConcept

    entry = dict((codes or {}).get(value, (codes or {}).get(str(value), {})) or {})
    out = []
    for key, default in (("category", DEFAULT_CATEGORY), ("type", DEFAULT_TYPE)):
        triple = list(entry.get(key, default))
        if len(triple) != 3 or not all(isinstance(t, str) and t for t in triple):
            raise DicomSegError(
                f"dicom_codes[{value}].{key} = {triple!r}: give [scheme, code, meaning], e.g. "
                '["SCT", "10200004", "Liver"]'
            )
        out.append(CodedConcept(value=triple[1], scheme_designator=triple[0], meaning=triple[2]))
    return out[0], out[1]


def _descriptions(
    values: list[int], labels: Mapping[int, str] | None, codes: Codes | None, algorithm: Any
) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcm_codes

    ident = hd.AlgorithmIdentificationSequence(
        name=str(algorithm[0]),
        family=dcm_codes.cid7162.ArtificialIntelligence,
        version=str(algorithm[1]),
    )
    out = []
    for number, value in enumerate(values, start=1):
        category, kind = segment_codes(value, codes)
        name = (labels or {}).get(value) or f"label {value}"
        out.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=str(name)[:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type="AUTOMATIC",
                algorithm_identification=ident,
            )
        )
    return out


def _stand_in(source: SourceSeries) -> Any:
    """One single-frame header with the source's identity and the grid's first slice."""
    ds = copy_header(source.first)
    for name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if name in ds:
            delattr(ds, name)
    if "NumberOfFrames" in ds:
        del ds.NumberOfFrames
    # highdicom treats enhanced SOP classes as multi-frame: the stand-in is a classic image
    # (it only lends identity; every reference to the real sources is written afterwards)
    ds.SOPClassUID = _CLASSIC.get(str(ds.get("Modality", "")).upper(), _CLASSIC["OT"])
    charset = ds.get("SpecificCharacterSet")
    if isinstance(charset, str) and charset.startswith("ISO 2022 IR "):
        # a lone code-extension charset (allowed by PS3.3 C.12.1.1.2 only with others)
        ds.SpecificCharacterSet = "ISO_IR " + charset.removeprefix("ISO 2022 IR ")
    grid, a = source.grid, source.lps_affine()
    sp = grid.spacing
    ds.Rows, ds.Columns = int(grid.shape[1]), int(grid.shape[0])
    ds.ImageOrientationPatient = [*(a[:3, 0] / sp[0]), *(a[:3, 1] / sp[1])]
    ds.ImagePositionPatient = list(a[:3, 3])
    ds.PixelSpacing = [sp[1], sp[0]]
    ds.SliceThickness = sp[2]
    return ds


def _planes(source: SourceSeries) -> tuple[Any, Any, list[Any]]:
    import highdicom as hd

    grid, a = source.grid, source.lps_affine()
    sp = grid.spacing
    measures = hd.PixelMeasuresSequence(pixel_spacing=(sp[1], sp[0]), slice_thickness=sp[2])
    orientation = hd.PlaneOrientationSequence(
        coordinate_system="PATIENT",
        image_orientation=[*(a[:3, 0] / sp[0]), *(a[:3, 1] / sp[1])],
    )
    positions = [
        hd.PlanePositionSequence("PATIENT", list((a @ [0.0, 0.0, k, 1.0])[:3]))
        for k in range(grid.shape[2])
    ]
    return measures, orientation, positions


def _pixels(
    label: Volume, values: list[int], fractional: np.ndarray | None, what: str
) -> np.ndarray:
    """``(K, rows, cols, S)``: frame ``k`` is slice ``k`` with rows along J, columns along I."""
    stacked: np.ndarray
    if fractional is None:
        stacked = np.stack([label.array[0] == v for v in values], axis=-1).astype(np.uint8)
    else:
        f = np.asarray(fractional, dtype=np.float32)
        if f.shape != (len(values), *label.grid.shape):
            raise DicomSegError(
                f"{what}: fractional maps are {f.shape}, expected one per segment "
                f"{(len(values), *label.grid.shape)} (S, I, J, K)"
            )
        if not np.all(np.isfinite(f)) or f.min() < 0.0 or f.max() > 1.0:
            raise DicomSegError(f"{what}: fractional maps must lie in [0, 1]")
        stacked = np.moveaxis(f, 0, -1)
    return np.ascontiguousarray(np.transpose(stacked, (2, 1, 0, 3)))


def _source_item(ds: Any, frame: int | None) -> Any:
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes as dcm_codes

    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    purpose = Dataset()
    code = dcm_codes.DCM.SourceImageForImageProcessingOperation
    purpose.CodeValue, purpose.CodingSchemeDesignator = code.value, code.scheme_designator
    purpose.CodeMeaning = code.meaning
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.SpatialLocationsPreserved = "YES"
    return item


def _reference_sources(seg: Any, source: SourceSeries) -> None:
    """Per-frame DerivationImageSequence and the full ReferencedSeriesSequence."""
    from pydicom.dataset import Dataset

    inv = np.linalg.inv(source.lps_affine())
    for item in seg.PerFrameFunctionalGroupsSequence:
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        k = int(round(float((inv @ [*ipp, 1.0])[2])))
        derivation = Dataset()
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = "113076", "DCM"
        code.CodeMeaning = "Segmentation"
        derivation.DerivationCodeSequence = [code]
        derivation.SourceImageSequence = [_source_item(d, f) for d, f in source.slice_headers(k)]
        item.DerivationImageSequence = [derivation]
    instances = []
    for ds in source.headers.values():
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        instances.append(ref)
    series = Dataset()
    series.SeriesInstanceUID = source.first.SeriesInstanceUID
    series.ReferencedInstanceSequence = instances
    seg.ReferencedSeriesSequence = [series]
    seg.FrameOfReferenceUID = source.frame_of_reference_uid


def write_dicom_seg(
    label: Volume,
    reference: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    labels: Mapping[int, str] | None = None,
    *,
    series: str | int | None = None,
    codes: Codes | None = None,
    fractional: np.ndarray | None = None,
    algorithm: tuple[str, str] | None = None,
) -> Path:
    """Write ``label`` (a label map on the grid of the series ``reference``) as a DICOM SEG.

    ``labels`` names the label values (value -> name; default: the values present). ``codes``
    sets coded concepts per value (:func:`segment_codes`). ``fractional``, ``(S, I, J, K)``
    probabilities in [0, 1] in the segments' order, makes a FRACTIONAL (PROBABILITY) object.
    ``algorithm`` is ``(name, version)``, default medseg and its version. The file is written
    atomically; the path is returned. Raises ``DicomSegError`` for a label not on the grid,
    an empty label, or a series whose slices are not stored images.
    """
    from medseg import __version__
    from medseg.atomic import write_with

    out, what = Path(out_path), str(label.meta.get("source", "label map"))
    source = load_source(Path(reference), series=series)
    check_on_grid(label, source, what, DicomSegError)
    values = label_values(label, dict(labels) if labels is not None else None, what, DicomSegError)
    algorithm = algorithm or ("medseg", __version__)
    with warnings.catch_warnings():
        # anonymised names such as "anonymous" are kept as they are
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person")
        seg = _encode(source, label, values, labels, codes, fractional, algorithm, what)
    _reference_sources(seg, source)
    write_with(out, lambda tmp: seg.save_as(str(tmp), enforce_file_format=True))
    return out


def _encode(
    source: SourceSeries,
    label: Volume,
    values: list[int],
    labels: Mapping[int, str] | None,
    codes: Codes | None,
    fractional: np.ndarray | None,
    algorithm: tuple[str, str],
    what: str,
) -> Any:
    import highdicom as hd

    measures, orientation, positions = _planes(source)
    return hd.seg.Segmentation(
        source_images=[_stand_in(source)],
        pixel_array=_pixels(label, values, fractional, what),
        segmentation_type="BINARY" if fractional is None else "FRACTIONAL",
        segment_descriptions=_descriptions(values, labels, codes, algorithm),
        series_instance_uid=hd.UID(),
        series_number=int(source.first.get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medseg",
        manufacturer_model_name=str(algorithm[0]),
        software_versions=str(algorithm[1]),
        device_serial_number="0",
        series_description=f"{algorithm[0]} segmentation"[:64],
        pixel_measures=measures,
        plane_orientation=orientation,
        plane_positions=positions,
        omit_empty_frames=False,
    )


# -- reading ----------------------------------------------------------------------------------
def is_dicom_seg(ds: Any) -> bool:
    """True for a Segmentation Storage dataset (by SOP class, else Modality SEG)."""
    sop = str(ds.get("SOPClassUID", "") or "")
    meta = getattr(ds, "file_meta", None)
    if not sop and meta is not None:
        sop = str(meta.get("MediaStorageSOPClassUID", "") or "")
    return sop == SEG_SOP_CLASS or str(ds.get("Modality", "")).upper() == "SEG"


def _frame_geometry(ds: Any, f: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float], int]:
    """(IPP, IOP, (row, column) spacing, segment number) of frame ``f`` (0-based), LPS mm."""
    per = ds.PerFrameFunctionalGroupsSequence[f]
    shared = (
        ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    )

    def item(name: str) -> Any:
        for src in (per, shared):
            if src is not None and name in src and len(src.get(name)) > 0:
                return src.get(name)[0]
        raise DicomSegError(f"frame {f + 1} has no {name}; medseg cannot place it")

    ipp = np.array([float(v) for v in item("PlanePositionSequence").ImagePositionPatient])
    iop = np.array([float(v) for v in item("PlaneOrientationSequence").ImageOrientationPatient])
    ps = [float(v) for v in item("PixelMeasuresSequence").PixelSpacing]
    number = int(item("SegmentIdentificationSequence").ReferencedSegmentNumber)
    return ipp, iop, (ps[0], ps[1]), number


def _grid_from_frames(geoms: list[Any], rows: int, cols: int, spacing_tag: float | None) -> Grid:
    """The grid the frames span when no reference series is given (RAS+)."""
    _, iop, ps, _ = geoms[0]
    normal = np.cross(iop[:3], iop[3:])
    ordered = sorted((g[0] for g in geoms), key=lambda x: float(x @ normal))
    along = np.array([float(x @ normal) for x in ordered])
    gaps = np.diff(along)
    gaps = gaps[gaps > 1e-3]
    step = spacing_tag or (float(gaps.min()) if len(gaps) else 1.0)
    k = int(round((along[-1] - along[0]) / step)) + 1
    a = np.eye(4)
    a[:3, 0], a[:3, 1] = iop[:3] * ps[1], iop[3:] * ps[0]
    # the step between positions, not the normal: gantry-tilted frames shear along it
    a[:3, 2] = (ordered[-1] - ordered[0]) / (k - 1) if k > 1 else normal * step
    a[:3, 3] = ordered[0]
    return Grid((cols, rows, k), ras_affine(a))


def read_dicom_seg(
    path: str | os.PathLike[str],
    *,
    reference: str | os.PathLike[str] | None = None,
    series: str | int | None = None,
) -> Volume:
    """A DICOM SEG as a label ``Volume`` (values = segment numbers, 0 = none).

    With ``reference`` (the series' folder) the map is on the grid medseg reads that series
    on; without, on the grid its frames span. Where segments overlap the higher number wins;
    FRACTIONAL segments count where their value is at least half the maximum.
    """
    from medseg.io.dicom import _quiet_read

    p = Path(path)
    try:
        ds = _quiet_read(p)
    except Exception as exc:
        raise DicomSegError(f"{p}: not a readable DICOM file ({type(exc).__name__})") from exc
    if not is_dicom_seg(ds):
        raise DicomSegError(
            f"{p}: not a DICOM Segmentation (SOP class {ds.get('SOPClassUID', '?')}, modality "
            f"{ds.get('Modality', '?')}); give a SEG file"
        )
    n = int(ds.get("NumberOfFrames", 1) or 1)
    geoms = [_frame_geometry(ds, f) for f in range(n)]
    frames = np.asarray(ds.pixel_array).reshape(n, int(ds.Rows), int(ds.Columns))
    if str(ds.get("SegmentationType", "")).upper() == "FRACTIONAL":
        frames = frames >= 0.5 * float(ds.get("MaximumFractionalValue", 255) or 255)
    spacing = None
    if reference is not None:
        grid = read_geometry(Path(reference), series=series).grid
    else:
        shared = ds.get("SharedFunctionalGroupsSequence")
        pm = shared[0].get("PixelMeasuresSequence") if shared else None
        between = pm[0].get("SpacingBetweenSlices") if pm else None
        spacing = float(between) if between else None
        grid = _grid_from_frames(geoms, int(ds.Rows), int(ds.Columns), spacing)
    inv = np.linalg.inv(lps_affine(grid))
    out = np.zeros(grid.shape, dtype=np.uint16)
    for f in np.argsort([g[3] for g in geoms], kind="stable"):
        _place(out, frames[f], geoms[f], inv, p, int(f))
    meta = {
        "source": str(p),
        "format": "dicom-seg",
        "segments": {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence},
        "referenced_series": [
            str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", [])
        ],
    }
    return Volume(out[None], grid, True, meta)


def _place(out: np.ndarray, frame: np.ndarray, geom: Any, inv: np.ndarray, p: Path, f: int) -> None:
    """Write segment ``geom[3]`` where ``frame`` is set, through the frame's own geometry."""
    ipp, iop, ps, number = geom
    rows, cols = np.nonzero(frame)
    if rows.size == 0:
        return
    lps = ipp[:, None] + np.outer(iop[:3], cols * ps[1]) + np.outer(iop[3:], rows * ps[0])
    idx = (inv @ np.vstack([lps, np.ones(rows.size)]))[:3]
    near = np.rint(idx)
    if np.max(np.abs(idx - near)) > _ON_GRID_VOXELS:
        raise DicomSegError(
            f"{p}: frame {f + 1} does not lie on the reference grid (pixel centres up to "
            f"{np.max(np.abs(idx - near)):.2f} voxels off); give the series it was made from"
        )
    ijk = near.astype(np.int64)
    inside = np.all((ijk >= 0) & (ijk < np.array(out.shape)[:, None]), axis=0)
    if not inside.all():
        raise DicomSegError(
            f"{p}: frame {f + 1} reaches outside the reference series; give the series it "
            "was made from"
        )
    out[ijk[0], ijk[1], ijk[2]] = number
