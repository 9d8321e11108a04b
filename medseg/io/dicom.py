"""DICOM series -> ``Volume`` (RAS+ mm, array ``(C, I, J, K)``), and series listing.

Conventions (the same as ITK and dcm2niix before their own storage flips):

- DICOM world coordinates are LPS mm; they are converted once, here:
  ``affine_RAS = diag(-1, -1, 1, 1) @ affine_LPS``.
- ``i`` is the column index: it runs along the row direction cosine (the first three values of
  ImageOrientationPatient, IOP) with spacing ``PixelSpacing[1]``. ``j`` is the row index, along
  the column cosine (IOP values 4-6) with spacing ``PixelSpacing[0]``. ``k`` is the slice index,
  sorted by ascending position along the slice normal ``row x col``.
- The slice spacing comes from ImagePositionPatient (IPP) projected on the normal, never from
  SliceThickness. Only a lone slice (SliceThickness, else 1 mm) and a Siemens mosaic (whose
  tiles share one IPP: SpacingBetweenSlices, else SliceThickness) take it from a tag; ``meta``
  says which (``slice_spacing_source``).
- Stored values get RescaleSlope/RescaleIntercept (per file, or per frame in enhanced files);
  the result is int16 when every slope is 1, every intercept an integer and the values fit,
  else float32. CT comes out in HU. MONOCHROME1 is inverted (stored ``v`` ->
  ``lo + hi - v`` over the BitsStored range, before rescaling) so that higher values are always
  brighter; RGB (and palette colour, after its lookup table) gives 3 channels.
- Several images at one position (time points, echoes, b-values, ...) become channels, ordered
  by the first attributes that tell them apart; ``meta["channels"]`` says what each one is.

Grouping: files are read with ``stop_before_pixels`` and grouped by SeriesInstanceUID, then by
orientation (IOP within 1e-3) and image size; pixels are decoded for the chosen group only.
Decoding uses pydicom's handlers (pylibjpeg for JPEG, JPEG-LS, JPEG 2000; pydicom for RLE,
deflate, big endian) and falls back to SimpleITK (GDCM) for a file they cannot decode.

Siemens CSA header (tag (0029,1010), "SV10" layout, little endian), parsed by
:func:`parse_csa_header`::

    0   4s   "SV10"            4   4s  "\\4\\3\\2\\1"
    8   u32  number of tags    12  u32 unused (77)
    then per tag, 84 bytes:  64s name (NUL-terminated), i32 VM, 4s VR, i32 SyngoDT,
                             i32 number of items, i32 marker (77 or 205)
    then per item:           4 x i32 (the 2nd is the value length L), L bytes of text,
                             padded with zeros to a multiple of 4 bytes.

Older CSA1 headers (no "SV10") are read by locating the tag name in the raw bytes and taking
the first item that follows it. Mosaic geometry follows dcm2niix (Li et al., J Neurosci Methods
264:47-56, 2016): IPP of a mosaic is the corner of the whole mosaic image, so the first tile's
corner is IPP moved by half the size difference between mosaic and tile along the row and
column cosines; tile ``t`` lies ``t * spacing`` further along the CSA ``SliceNormalVector``.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DicomError
from medseg.volume import LPS_TO_RAS, Grid, Volume, axis_codes

#: IOP components closer than this belong to one orientation group.
IOP_TOLERANCE = 1e-3
#: Images whose positions along the normal differ by less than this (mm) share a slice.
POSITION_TOLERANCE_MM = 1e-2

_NON_IMAGE_MODALITIES = frozenset(
    {"RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "KO", "PR", "REG", "SEG", "DOC", "FID", "PLAN"}
    | {"RWV", "AU", "ECG", "HD", "RESP", "SMR", "RTRAD"}
)
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.1.3.10",  # DICOMDIR
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF / CDA / STL
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration, fiducials, segmentation
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.4.2",  # MR spectroscopy
    *(f"1.2.840.10008.5.1.4.1.1.481.{n}" for n in range(3, 10)),  # RT structures, plans, records
)
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"

#: Attributes that tell apart several images at one position, in the order they are tried.
_CHANNEL_KEYS = (
    "TemporalPositionIdentifier",
    "TemporalPositionIndex",
    "EchoNumbers",
    "EchoTime",
    "DiffusionBValue",
    "DiffusionGradientOrientation",
    "TriggerTime",
    "InversionTime",
    "ImageType",
    "AcquisitionNumber",
    "StackID",
)


@dataclass(frozen=True)
class SeriesInfo:
    """One readable image group of a DICOM folder or file, as ``medseg inspect`` lists it.

    ``index`` (0-based) and ``uid`` are what ``read(..., series=...)`` accepts. ``frames`` is
    the number of 2D images (mosaic tiles and enhanced frames counted one by one), ``slices``
    the number of distinct positions. ``spacing`` is ``(I, J, K)`` mm, ``None`` where the
    positions do not give one. ``orientation`` is the closest RAS+ axis code, e.g. ``"LPS"``
    for an axial series.
    """

    index: int
    uid: str
    modality: str
    description: str
    frames: int
    slices: int
    rows: int
    columns: int
    spacing: tuple[float, float, float] | None
    orientation: str
    transfer_syntax: str
    files: tuple[Path, ...]


# -- header stage -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Frame:
    """One 2D image: a file, one frame of a multi-frame file, or one tile of a mosaic."""

    path: Path
    frame: int  # frame index in the file (0 for single-frame files)
    tile: int  # mosaic tile index, -1 when not a mosaic
    tiles_per_side: int  # mosaic grid side, 0 when not a mosaic
    rows: int
    cols: int
    samples: int
    iop: tuple[float, float, float, float, float, float]  # LPS direction cosines
    ipp: tuple[float, float, float]  # LPS mm, centre of the first transmitted pixel
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    thickness: float | None
    slope: float
    intercept: float
    keys: tuple[tuple[str, Any], ...]  # channel distinguishers, see _CHANNEL_KEYS
    instance: int | None


@dataclass(frozen=True)
class _File:
    path: Path
    series_uid: str
    series_number: int | None
    modality: str
    description: str
    manufacturer: str
    transfer_syntax: str
    frames: tuple[_Frame, ...]
    notes: tuple[tuple[str, Any], ...]  # per-file facts for meta (assumed geometry, ...)


@dataclass
class _Group:
    uid: str
    frames: list[_Frame]
    files: dict[Path, _File]

    @property
    def first(self) -> _File:
        return next(iter(self.files.values()))

    @property
    def description(self) -> str:
        return self.first.description


def _quiet_read(path: Path, **kwargs: Any) -> Any:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(str(path), **kwargs)


def _looks_like_raw_dicom(path: Path) -> bool:
    """A file without the "DICM" preamble that starts like a dataset (group 0002 or 0008)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    if len(head) < 8:
        return False
    group_le = int.from_bytes(head[:2], "little")
    group_be = int.from_bytes(head[:2], "big")
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)


def _has_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _read_header(path: Path, *, in_folder: bool) -> Any | None:
    """Dataset without pixels, or None when ``path`` is not DICOM (folders skip those)."""
    from pydicom.errors import InvalidDicomError

    try:
        return _ensure_transfer_syntax(_quiet_read(path, stop_before_pixels=True))
    except InvalidDicomError:
        pass
    except Exception as exc:  # a file with the DICOM preamble that does not parse
        if _has_preamble(path) or not in_folder:
            raise DicomError(
                f"{path}: DICOM file is corrupt or truncated ({type(exc).__name__}: {exc}); "
                "remove it or copy it again"
            ) from exc
        return None
    if not _looks_like_raw_dicom(path):
        return None
    try:
        ds = _quiet_read(path, stop_before_pixels=True, force=True)
    except Exception:
        return None
    if "SOPClassUID" not in ds and "Rows" not in ds:
        return None
    return _ensure_transfer_syntax(ds)


def _ensure_transfer_syntax(ds: Any) -> Any:
    """Files without file meta (old ACR-NEMA style) get the syntax pydicom parsed them with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return ds
    if meta is None:
        ds.file_meta = FileMetaDataset()
    implicit = bool(getattr(ds, "is_implicit_VR", True))
    little = bool(getattr(ds, "is_little_endian", True))
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian
        if implicit
        else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    )
    return ds


def _sop_class(ds: Any) -> str:
    uid = str(ds.get("SOPClassUID", "") or "")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return uid


def _non_image_kind(ds: Any) -> str | None:
    """Why a dataset is not an image (e.g. ``"RTSTRUCT"``), or None for images."""
    sop = _sop_class(ds)
    modality = str(ds.get("Modality", "") or "").upper()
    if sop == _DICOMDIR_SOP or "DirectoryRecordSequence" in ds:
        return "DICOMDIR"
    if modality in _NON_IMAGE_MODALITIES:
        return modality
    if any(sop.startswith(p) for p in _NON_IMAGE_SOP_PREFIXES):
        try:
            from pydicom.uid import UID

            return UID(sop).name or sop
        except Exception:
            return sop
    if "Rows" not in ds or "Columns" not in ds:
        return f"{modality or 'object'} without image rows/columns"
    return None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        seq = list(value) if not isinstance(value, str | bytes) else [value]
        out = tuple(float(v) for v in seq)
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        if not isinstance(value, str | bytes | int | float):
            value = list(value)[0]
        v = float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return v if math.isfinite(v) else None


def _int(value: Any) -> int | None:
    v = _float(value)
    return int(v) if v is not None else None


def _jsonable(value: Any) -> Any:
    """Plain Python value (rounded floats, tuples for multi-values, str otherwise)."""
    if value is None:
        return None
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, str | bytes):
        s = value.decode(errors="replace") if isinstance(value, bytes) else value
        return s.strip()
    try:
        items = list(value)
    except TypeError:
        f = _float(value)
        return round(f, 4) if f is not None else str(value)
    if len(items) == 1:
        return _jsonable(items[0])
    return tuple(_jsonable(v) for v in items)


def _number_or_text(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str | bytes):
        return _jsonable(value)
    try:
        items = list(value)
    except TypeError:
        items = [value]
    if len(items) > 1:
        return tuple(_number_or_text(v) for v in items)
    v = _float(items[0]) if items else None
    return round(v, 4) if v is not None else _jsonable(value)


def _private(ds: Any, group: int, creator: str, element: int) -> Any:
    try:
        return ds.private_block(group, creator)[element].value
    except (KeyError, ValueError, AttributeError):
        return None


def _diffusion(ds: Any) -> tuple[Any, Any]:
    """(b-value, gradient direction) from the standard tags or the vendors' private ones."""
    b = _float(ds.get("DiffusionBValue"))
    g = _floats(ds.get("DiffusionGradientOrientation"), 3)
    if b is None:
        b = _float(_private(ds, 0x0019, "SIEMENS MR HEADER", 0x0C))
    if g is None:
        g = _floats(_private(ds, 0x0019, "SIEMENS MR HEADER", 0x0E), 3)
    if b is None:
        b = _float(_private(ds, 0x2001, "Philips Imaging DD 001", 0x03))
    if g is None:
        parts = [
            _float(_private(ds, 0x2005, "Philips MR Imaging DD 001", e)) for e in (0xB0, 0xB1, 0xB2)
        ]
        g = tuple(p for p in parts if p is not None) if all(p is not None for p in parts) else None
    if b is None:
        ge = _private(ds, 0x0043, "GEMS_PARM_01", 0x39)
        b = _float(ge)
        if b is not None and b > 1e6:  # GE adds 1e9 to flag a b-value override
            b = b % 1e9
    if g is None:
        parts = [_float(_private(ds, 0x0019, "GEMS_ACQU_01", e)) for e in (0xBB, 0xBC, 0xBD)]
        g = tuple(p for p in parts if p is not None) if all(p is not None for p in parts) else None
    rb = round(b, 3) if b is not None else None
    rg = tuple(round(v, 4) for v in g) if g else None
    return rb, rg


def _classic_keys(ds: Any) -> dict[str, Any]:
    b, g = _diffusion(ds)
    return {
        "TemporalPositionIdentifier": _int(ds.get("TemporalPositionIdentifier")),
        "EchoNumbers": _int(ds.get("EchoNumbers")),
        "EchoTime": _number_or_text(ds.get("EchoTime")),
        "DiffusionBValue": b,
        "DiffusionGradientOrientation": g,
        "TriggerTime": _number_or_text(ds.get("TriggerTime")),
        "InversionTime": _number_or_text(ds.get("InversionTime")),
        "ImageType": _jsonable(ds.get("ImageType")),
        "AcquisitionNumber": _int(ds.get("AcquisitionNumber")),
    }


def _pixel_spacing(ds: Any) -> tuple[tuple[float, float] | None, str]:
    for name in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        ps = _floats(ds.get(name), 2)
        if ps is not None and ps[0] > 0 and ps[1] > 0:
            return (ps[0], ps[1]), name
    return None, "none"


def _frames_of(ds: Any, path: Path) -> tuple[list[_Frame], dict[str, Any]]:
    """Every 2D image in one dataset, with its geometry (header only, no pixels)."""
    rows, cols = _int(ds.get("Rows")) or 0, _int(ds.get("Columns")) or 0
    samples = _int(ds.get("SamplesPerPixel")) or 1
    nframes = max(1, _int(ds.get("NumberOfFrames")) or 1)
    instance = _int(ds.get("InstanceNumber"))
    notes: dict[str, Any] = {}
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    ps, ps_source = _pixel_spacing(ds)
    thickness = _float(ds.get("SliceThickness"))
    slope = _float(ds.get("RescaleSlope"))
    intercept = _float(ds.get("RescaleIntercept"))
    slope = 1.0 if slope is None or slope == 0 else slope
    intercept = 0.0 if intercept is None else intercept
    keys = _classic_keys(ds)

    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return _enhanced_frames(ds, path, rows, cols, samples, nframes, instance), notes

    image_type = [str(t).upper() for t in (ds.get("ImageType") or [])]
    if "MOSAIC" in image_type and nframes == 1:
        return _mosaic_frames(ds, path, rows, cols, samples, instance, keys, slope, intercept)

    if iop is None or ipp is None:
        notes["geometry"] = "assumed: no ImageOrientationPatient/ImagePositionPatient in the file"
        iop = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        ipp = (0.0, 0.0, 0.0)
    if ps is None:
        notes["pixel_spacing_source"] = "default 1.0 mm (no PixelSpacing in the file)"
        ps = (1.0, 1.0)
    elif ps_source != "PixelSpacing":
        notes["pixel_spacing_source"] = ps_source
    iop6 = (iop[0], iop[1], iop[2], iop[3], iop[4], iop[5])
    normal = _normal(iop6)

    offsets: list[float] = [0.0] * nframes
    if nframes > 1:
        # Classic multi-frame (RT dose, NM tomography, cine): frames along the normal when
        # the file says how far apart they are, else all at one position (channels).
        gfov = ds.get("GridFrameOffsetVector")
        grid = _floats(gfov, nframes) if gfov is not None else None
        between = _float(ds.get("SpacingBetweenSlices"))
        if grid is not None:
            offsets = [g - grid[0] for g in grid]
            notes["frame_positions"] = "GridFrameOffsetVector"
        elif between is not None and between > 0 and "geometry" not in notes:
            offsets = [f * between for f in range(nframes)]
            notes["frame_positions"] = "SpacingBetweenSlices"
        elif "geometry" in notes:
            offsets = [float(f) for f in range(nframes)]
            notes["frame_positions"] = "assumed 1.0 mm apart (no geometry in the file)"
    frames = []
    for f in range(nframes):
        pos = tuple(p + offsets[f] * n for p, n in zip(ipp, normal, strict=True))
        fkeys = dict(keys)
        if nframes > 1:
            fkeys["Frame"] = f
        frames.append(
            _Frame(
                path,
                f,
                -1,
                0,
                rows,
                cols,
                samples,
                iop6,
                (pos[0], pos[1], pos[2]),
                ps,
                thickness,
                slope,
                intercept,
                tuple(fkeys.items()),
                instance,
            )
        )
    return frames, notes


def _normal(iop: Sequence[float]) -> np.ndarray:
    row = np.asarray(iop[:3], dtype=np.float64)
    col = np.asarray(iop[3:6], dtype=np.float64)
    n = np.cross(row / np.linalg.norm(row), col / np.linalg.norm(col))
    norm = float(np.linalg.norm(n))
    if norm < 1e-6:
        return np.array([0.0, 0.0, 1.0])
    return n / norm


def _first_item(item: Any, shared: Any, name: str) -> Any:
    for source in (item, shared):
        if source is not None and name in source:
            seq = source.get(name)
            if seq is not None and len(seq) > 0:
                return seq[0]
    return None


def _enhanced_frames(
    ds: Any, path: Path, rows: int, cols: int, samples: int, nframes: int, instance: int | None
) -> list[_Frame]:
    """Frames of an Enhanced (or legacy-converted enhanced) multi-frame file."""
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    top_iop = _floats(ds.get("ImageOrientationPatient"), 6)
    top_ipp = _floats(ds.get("ImagePositionPatient"), 3)
    top_ps, _ = _pixel_spacing(ds)
    top_slope = _float(ds.get("RescaleSlope"))
    top_inter = _float(ds.get("RescaleIntercept"))
    frames = []
    for f in range(nframes):
        item = per_frame[f] if f < len(per_frame) else None
        pos = _first_item(item, shared, "PlanePositionSequence")
        ori = _first_item(item, shared, "PlaneOrientationSequence")
        meas = _first_item(item, shared, "PixelMeasuresSequence")
        pvt = _first_item(item, shared, "PixelValueTransformationSequence")
        content = _first_item(item, shared, "FrameContentSequence")
        echo = _first_item(item, shared, "MREchoSequence")
        diff = _first_item(item, shared, "MRDiffusionSequence")
        cardiac = _first_item(item, shared, "CardiacSynchronizationSequence")
        ftype = _first_item(item, shared, "MRImageFrameTypeSequence") or _first_item(
            item, shared, "CTImageFrameTypeSequence"
        )
        ipp = _floats(pos.get("ImagePositionPatient"), 3) if pos is not None else None
        iop = _floats(ori.get("ImageOrientationPatient"), 6) if ori is not None else None
        ps = _floats(meas.get("PixelSpacing"), 2) if meas is not None else None
        thick = _float(meas.get("SliceThickness")) if meas is not None else None
        ipp = ipp or top_ipp
        iop = iop or top_iop
        ps = ps or top_ps
        if ipp is None or iop is None or ps is None:
            raise DicomError(
                f"{path}: frame {f + 1} of this enhanced multi-frame file has no "
                "position, orientation or pixel spacing; medseg cannot place it in space"
            )
        slope = _float(pvt.get("RescaleSlope")) if pvt is not None else None
        inter = _float(pvt.get("RescaleIntercept")) if pvt is not None else None
        slope = slope if slope not in (None, 0.0) else (top_slope or 1.0)
        inter = inter if inter is not None else (top_inter or 0.0)
        b, g = None, None
        if diff is not None:
            b = _float(diff.get("DiffusionBValue"))
            b = round(b, 3) if b is not None else None
            gseq = diff.get("DiffusionGradientDirectionSequence")
            if gseq:
                gv = _floats(gseq[0].get("DiffusionGradientOrientation"), 3)
                g = tuple(round(v, 4) for v in gv) if gv else None
        keys = {
            "TemporalPositionIndex": _int(content.get("TemporalPositionIndex"))
            if content is not None
            else None,
            "EchoTime": _number_or_text(echo.get("EffectiveEchoTime"))
            if echo is not None
            else None,
            "DiffusionBValue": b,
            "DiffusionGradientOrientation": g,
            "TriggerTime": _number_or_text(cardiac.get("NominalCardiacTriggerDelayTime"))
            if cardiac is not None
            else None,
            "ImageType": _jsonable(ftype.get("FrameType")) if ftype is not None else None,
            "StackID": _jsonable(content.get("StackID")) if content is not None else None,
            "Frame": f,
        }
        frames.append(
            _Frame(
                path,
                f,
                -1,
                0,
                rows,
                cols,
                samples,
                (iop[0], iop[1], iop[2], iop[3], iop[4], iop[5]),
                (ipp[0], ipp[1], ipp[2]),
                (ps[0], ps[1]),
                thick,
                slope,
                inter,
                tuple(keys.items()),
                instance,
            )
        )
    return frames


# -- Siemens CSA header and mosaics -------------------------------------------------------------
def parse_csa_header(raw: bytes) -> dict[str, list[str]]:
    """Tags of a Siemens CSA2 ("SV10") header: name -> its first VM item strings.

    Layout in the module docstring. Returns ``{}`` for anything that is not a well-formed
    SV10 header (use :func:`csa_value` for CSA1 headers).
    """
    out: dict[str, list[str]] = {}
    if len(raw) < 16 or raw[:4] != b"SV10":
        return out
    try:
        ntags = struct.unpack_from("<I", raw, 8)[0]
        if ntags > 10000:
            return {}
        off = 16
        for _ in range(ntags):
            name_b, vm, _vr, _dt, nitems, _marker = struct.unpack_from("<64si4siii", raw, off)
            off += 84
            if nitems < 0 or nitems > 100000:
                return out
            name = name_b.split(b"\0", 1)[0].decode("latin-1")
            values: list[str] = []
            for _i in range(nitems):
                length = struct.unpack_from("<4i", raw, off)[1]
                off += 16
                if length < 0 or off + length > len(raw):
                    return out
                text = raw[off : off + length].split(b"\0", 1)[0].decode("latin-1").strip()
                values.append(text)
                off += (length + 3) // 4 * 4
            out[name] = values[: max(vm, 0)] if vm > 0 else [v for v in values if v]
    except struct.error:
        return out
    return out


def csa_value(raw: bytes, name: str) -> list[str]:
    """Values of one CSA tag: parsed from SV10 headers, else found by name in the raw bytes."""
    parsed = parse_csa_header(raw)
    if parsed:
        return parsed.get(name, [])
    # CSA1: the same 84-byte tag record follows the name; the value text is in the first
    # non-empty item after it. Scan a bounded window for printable text.
    at = raw.find(name.encode("latin-1") + b"\0")
    if at < 0:
        return []
    try:
        vm = struct.unpack_from("<i", raw, at + 64)[0]
        nitems = struct.unpack_from("<i", raw, at + 76)[0]
    except struct.error:
        return []
    off = at + 84
    values: list[str] = []
    for _ in range(max(0, min(nitems, 64))):
        try:
            x = struct.unpack_from("<4i", raw, off)
        except struct.error:
            break
        off += 16
        length = next((v for v in (x[1], x[0]) if 0 <= v <= 256), 0)
        text = raw[off : off + length].split(b"\0", 1)[0].decode("latin-1").strip()
        if text:
            values.append(text)
        off += (length + 3) // 4 * 4
    return values[: vm if vm > 0 else len(values)]


def _mosaic_frames(
    ds: Any,
    path: Path,
    rows: int,
    cols: int,
    samples: int,
    instance: int | None,
    keys: dict[str, Any],
    slope: float,
    intercept: float,
) -> tuple[list[_Frame], dict[str, Any]]:
    """Split a Siemens mosaic into its tiles, each placed as dcm2niix places it."""
    raw = _private(ds, 0x0029, "SIEMENS CSA HEADER", 0x10)
    raw = bytes(raw) if raw is not None else b""
    count_text = csa_value(raw, "NumberOfImagesInMosaic")
    n = _int(count_text[0]) if count_text else None
    if not n:
        n = _int(_private(ds, 0x0019, "SIEMENS MR HEADER", 0x0A))
    if not n or n < 1:
        raise DicomError(
            f"{path}: Siemens mosaic without NumberOfImagesInMosaic (CSA header (0029,1010) "
            "or (0019,100A)); medseg cannot split it into slices"
        )
    side = math.ceil(math.sqrt(n))
    if rows % side or cols % side:
        raise DicomError(
            f"{path}: mosaic of {rows}x{cols} pixels cannot hold {n} equal tiles in a "
            f"{side}x{side} grid; the file is not a valid Siemens mosaic"
        )
    tr, tc = rows // side, cols // side
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    ps, _ = _pixel_spacing(ds)
    if iop is None or ipp is None or ps is None:
        raise DicomError(f"{path}: Siemens mosaic without position, orientation or pixel spacing")
    iop6 = (iop[0], iop[1], iop[2], iop[3], iop[4], iop[5])
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    corner = np.asarray(ipp) + row * ps[1] * (cols - tc) / 2.0 + col * ps[0] * (rows - tr) / 2.0
    snv_text = csa_value(raw, "SliceNormalVector")
    snv = _floats(snv_text, 3) if len(snv_text) >= 3 else None
    normal = _normal(iop6)
    if snv is not None and np.linalg.norm(snv) > 0.5:
        direction = np.asarray(snv) / np.linalg.norm(snv)
        snv_source = "CSA SliceNormalVector"
    else:
        direction = normal
        snv_source = "ImageOrientationPatient"
    between = _float(ds.get("SpacingBetweenSlices"))
    thickness = _float(ds.get("SliceThickness"))
    if between is not None and between > 0:
        spacing, source = between, "SpacingBetweenSlices (mosaic)"
    elif thickness is not None and thickness > 0:
        spacing, source = thickness, "SliceThickness (mosaic without SpacingBetweenSlices)"
    else:
        spacing, source = 1.0, "default 1.0 mm (mosaic without slice spacing)"
    notes = {
        "mosaic": {"tiles": n, "grid": side, "slice_direction": snv_source},
        "slice_spacing_source": source,
    }
    frames = []
    for t in range(n):
        p = corner + direction * spacing * t
        frames.append(
            _Frame(
                path,
                0,
                t,
                side,
                tr,
                tc,
                samples,
                iop6,
                (float(p[0]), float(p[1]), float(p[2])),
                ps,
                thickness,
                slope,
                intercept,
                tuple(keys.items()),
                instance,
            )
        )
    return frames, notes


# -- scanning and grouping ----------------------------------------------------------------------
def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(s.startswith(".") for s in p.parts[-1:])
    )


def _scan(path: Path) -> list[_File]:
    """Image files under ``path`` (a folder, recursive, or one file), headers only."""
    if not path.exists():
        raise DicomError(f"{path}: no such file or folder")
    single = path.is_file()
    candidates = _files_under(path)
    found: list[_File] = []
    non_images: dict[str, int] = {}
    seen_sop: set[str] = set()
    dicom_count = 0
    for p in candidates:
        ds = _read_header(p, in_folder=not single)
        if ds is None:
            continue
        kind = _non_image_kind(ds)
        if kind == "DICOMDIR":
            continue
        dicom_count += 1
        if kind is not None:
            if single:
                raise DicomError(
                    f"{p}: this DICOM file is a {kind} object, not an image; medseg reads "
                    "image series (CT, MR, PET, ...): point it at the image files"
                )
            non_images[kind] = non_images.get(kind, 0) + 1
            continue
        sop = str(ds.get("SOPInstanceUID", "") or "")
        if sop and sop in seen_sop:
            continue  # the same object twice (a copy): keep the first
        if sop:
            seen_sop.add(sop)
        frames, notes = _frames_of(ds, p)
        ts = str(ds.file_meta.TransferSyntaxUID)
        found.append(
            _File(
                p,
                str(ds.get("SeriesInstanceUID", "") or "") or "(no SeriesInstanceUID)",
                _int(ds.get("SeriesNumber")),
                str(ds.get("Modality", "") or "").strip() or "OT",
                str(ds.get("SeriesDescription", "") or "").strip(),
                str(ds.get("Manufacturer", "") or "").strip(),
                ts,
                tuple(frames),
                tuple(notes.items()),
            )
        )
    if single and not found:
        raise DicomError(f"{path}: not a DICOM file (no DICOM header could be read)")
    if not found:
        if dicom_count:
            what = ", ".join(f"{k} x{v}" for k, v in sorted(non_images.items()))
            raise DicomError(
                f"{path}: holds {dicom_count} DICOM file(s) but no image ({what}); "
                "point medseg at a folder with an image series"
            )
        raise DicomError(
            f"{path}: no DICOM files found (searched {len(candidates)} file(s), recursively); "
            "check the folder"
        )
    return found


def _iop_close(a: Sequence[float], b: Sequence[float]) -> bool:
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= IOP_TOLERANCE


def _groups(files: list[_File]) -> list[_Group]:
    """Series, split by orientation and image size, in a stable order."""
    buckets: list[tuple[str, tuple[int, int, int], tuple[float, ...], _Group]] = []
    for f in files:
        for fr in f.frames:
            size = (fr.rows, fr.cols, fr.samples)
            for uid, bsize, biop, grp in buckets:
                if uid == f.series_uid and bsize == size and _iop_close(biop, fr.iop):
                    grp.frames.append(fr)
                    grp.files.setdefault(f.path, f)
                    break
            else:
                buckets.append(
                    (f.series_uid, size, fr.iop, _Group(f.series_uid, [fr], {f.path: f}))
                )

    def order(b: tuple[str, tuple[int, int, int], tuple[float, ...], _Group]) -> tuple[Any, ...]:
        g = b[3]
        num = g.first.series_number
        inst = min((fr.instance for fr in g.frames if fr.instance is not None), default=0)
        return (num is None, num or 0, g.uid, inst)

    return [b[3] for b in sorted(buckets, key=order)]


def _orientation_code(iop: Sequence[float], spacing_sign: float = 1.0) -> str:
    a = np.eye(4)
    a[:3, 0] = iop[:3]
    a[:3, 1] = iop[3:6]
    a[:3, 2] = _normal(iop) * spacing_sign
    return "".join(axis_codes(LPS_TO_RAS @ a))


def _ts_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid


def _positions(frames: Sequence[_Frame], normal: np.ndarray) -> list[list[int]]:
    """Indices of ``frames`` clustered by position along ``normal``, ascending."""
    d = np.array([float(np.dot(fr.ipp, normal)) for fr in frames])
    order = np.argsort(d, kind="stable")
    clusters: list[list[int]] = []
    last = -np.inf
    for i in order:
        if clusters and d[i] - last <= POSITION_TOLERANCE_MM:
            clusters[-1].append(int(i))
        else:
            clusters.append([int(i)])
        last = d[i]
    return clusters


def _info(index: int, g: _Group) -> SeriesInfo:
    fr0 = g.frames[0]
    normal = _normal(fr0.iop)
    clusters = _positions(g.frames, normal)
    spacing: tuple[float, float, float] | None = None
    if len(clusters) > 1:
        d = [float(np.mean([np.dot(g.frames[i].ipp, normal) for i in c])) for c in clusters]
        gaps = np.diff(d)
        spacing = (fr0.pixel_spacing[1], fr0.pixel_spacing[0], float(np.median(gaps)))
    elif fr0.thickness:
        spacing = (fr0.pixel_spacing[1], fr0.pixel_spacing[0], float(fr0.thickness))
    syntaxes = sorted({_ts_name(f.transfer_syntax) for f in g.files.values()})
    return SeriesInfo(
        index=index,
        uid=g.uid,
        modality=g.first.modality,
        description=g.description,
        frames=len(g.frames),
        slices=len(clusters),
        rows=fr0.rows,
        columns=fr0.cols,
        spacing=spacing,
        orientation=_orientation_code(fr0.iop),
        transfer_syntax=" + ".join(syntaxes),
        files=tuple(g.files),
    )


def list_series(path: Path) -> list[SeriesInfo]:
    """Every image group (series x orientation x image size) under a folder or in one file.

    Reads headers only. Raises ``DicomError`` when there is no DICOM image at all.
    """
    groups = _groups(_scan(Path(path)))
    return [_info(i, g) for i, g in enumerate(groups)]


def _listing(groups: Sequence[_Group]) -> str:
    parts = []
    for i, g in enumerate(groups):
        info = _info(i, g)
        desc = f" '{info.description}'" if info.description else ""
        parts.append(
            f"[{i}] {info.uid}{desc} ({info.modality}, {info.slices} slice(s), "
            f"{info.rows}x{info.columns}, {info.orientation})"
        )
    return "; ".join(parts)


def _select(groups: list[_Group], series: str | int | None, path: Path) -> _Group:
    if series is None:
        if len(groups) == 1:
            return groups[0]
        raise DicomError(
            f"{path}: holds {len(groups)} image series: {_listing(groups)}; pick one with "
            "--series INDEX or --series UID (series= in Python)"
        )
    key = str(series).strip()
    matches = [g for g in groups if g.uid == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        idx = [i for i, g in enumerate(groups) if g.uid == key]
        raise DicomError(
            f"{path}: series {key} has {len(matches)} parts with different orientation or "
            f"image size: {_listing(groups)}; pick one by index ({', '.join(map(str, idx))})"
        )
    if isinstance(series, int) or key.lstrip("-").isdigit():
        i = int(key)
        if 0 <= i < len(groups):
            return groups[i]
    raise DicomError(
        f"{path}: no series {key!r}; available: {_listing(groups)}; pass an index or a "
        "SeriesInstanceUID from this list"
    )


# -- geometry of one group ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Stack:
    slots: list[list[_Frame]]  # K positions, each with its images in channel order
    channel_labels: list[str]
    affine_lps: np.ndarray
    positions: np.ndarray  # (K,) mm along the stacking direction's normal component
    resample_spacing: float | None  # median spacing to resample to (non-uniform series)
    meta: dict[str, Any]


def _sort_key(v: Any) -> tuple[Any, ...]:
    if v is None:
        return (0, "")
    if isinstance(v, int | float):
        return (1, float(v), "")
    return (2, 0.0, str(v))


def _channel_order(
    clusters: list[list[_Frame]], where: str, positions: np.ndarray
) -> tuple[list[list[_Frame]], list[str], list[str]]:
    """Order the images at each position consistently; raise on true duplicates."""
    counts = [len(c) for c in clusters]
    if len(set(counts)) > 1:
        most = int(np.argmax(counts))
        lone = min(counts)
        dup_files = ", ".join(fr.path.name for fr in clusters[most][:4])
        raise DicomError(
            f"{where}: duplicate slice: {counts[most]} images at position "
            f"{positions[most]:.2f} mm along the slice normal ({dup_files}) where other positions "
            f"have {lone}; remove the duplicate files or pick another series"
        )
    m = counts[0]
    if m == 1:
        return clusters, [""], []

    def vals(c: list[_Frame], name: str) -> list[Any]:
        return [dict(fr.keys).get(name) for fr in c]

    varying = [n for n in _CHANNEL_KEYS if any(len(set(vals(c, n))) > 1 for c in clusters)]

    def value_set(c: list[_Frame], n: str) -> list[tuple[Any, ...]]:
        return sorted(_sort_key(v) for v in vals(c, n))

    consistent = [
        n for n in varying if all(value_set(c, n) == value_set(clusters[0], n) for c in clusters)
    ]
    attempts: list[tuple[list[str], bool]] = [(consistent, True), (varying, False)]
    attempts.append((["InstanceNumber"], False))
    attempts.append((["Frame"], False))
    for names, labelled in attempts:
        if not names:
            continue

        def key(fr: _Frame, names: list[str] = names) -> tuple[Any, ...]:
            d = dict(fr.keys)
            if names == ["InstanceNumber"]:
                return (_sort_key(fr.instance),)
            return tuple(_sort_key(d.get(n)) for n in names)

        if all(len({key(fr) for fr in c}) == m for c in clusters):
            ordered = [sorted(c, key=key) for c in clusters]
            labels = []
            for ch, fr in enumerate(ordered[0]):
                d = dict(fr.keys)
                if names == ["InstanceNumber"]:
                    text = f"volume {ch + 1} (by InstanceNumber)"
                else:
                    text = ", ".join(f"{n}={d.get(n)}" for n in names)
                    if not labelled:
                        text = (
                            f"volume {ch + 1} (ordered by {', '.join(names)}; first slice {text})"
                        )
                labels.append(text)
            return ordered, labels, names
    examples = ", ".join(fr.path.name for fr in clusters[0][:4])
    raise DicomError(
        f"{where}: {m} images at every slice position (e.g. {examples}) and nothing tells them "
        "apart (time, echo, b-value, instance number); remove the duplicate files"
    )


#: The commands that read a DICOM series given on their command line take the reader's options.
OPTION_COMMANDS = ("inspect", "convert", "infer")


def _option_hint(option: str, keyword: str) -> str:
    """How to pass a reader option, truthful for every command: those of
    :data:`OPTION_COMMANDS` take it; a series named in a manifest is converted once first."""
    return (
        f"pass {option} to medseg {', '.join(OPTION_COMMANDS)} ({keyword}=True in Python); "
        f"for a manifest, convert the series first (medseg convert DIR scan.nii.gz {option})"
    )


def _analyse(g: _Group, where: str, *, allow_nonuniform: bool, correct_tilt: bool) -> _Stack:
    frames = g.frames
    fr0 = frames[0]
    ps = fr0.pixel_spacing
    if len(g.files) > 1:
        for f in g.files.values():
            if any(key == "geometry" for key, _ in f.notes):
                raise DicomError(
                    f"{f.path}: has no ImagePositionPatient/ImageOrientationPatient, so it "
                    f"cannot be placed among the other {len(g.files) - 1} file(s) of its "
                    "series; remove it or fix its header"
                )
    for fr in frames:
        if any(abs(a - b) > 1e-4 * max(a, b) for a, b in zip(fr.pixel_spacing, ps, strict=True)):
            raise DicomError(
                f"{where}: pixel spacing differs within the series ({ps} vs "
                f"{fr.pixel_spacing} mm in {fr.path.name}); medseg cannot stack these images"
            )
    iop = np.mean([fr.iop for fr in frames], axis=0)
    row = iop[:3] / np.linalg.norm(iop[:3])
    col = iop[3:] / np.linalg.norm(iop[3:])
    normal = _normal(iop)
    clusters_idx = _positions(frames, normal)
    clusters = [[frames[i] for i in c] for c in clusters_idx]
    centres = np.array([np.mean([fr.ipp for fr in c], axis=0) for c in clusters])
    along = centres @ normal
    slots, labels, key_names = _channel_order(clusters, where, along)
    meta: dict[str, Any] = {}
    if key_names:
        meta["channel_keys"] = key_names
    k = len(slots)
    resample: float | None = None
    if k == 1:
        thick = fr0.thickness
        spacing = thick if thick is not None and thick > 0 else 1.0
        meta.setdefault(
            "slice_spacing_source",
            "SliceThickness (single slice)" if thick else "default 1.0 mm (single slice)",
        )
        step = normal * spacing
    else:
        rel = centres - centres[0]
        dist = along - along[0]
        inplane = rel - dist[:, None] * normal[None, :]
        shear = (inplane * dist[:, None]).sum(axis=0) / float((dist**2).sum())
        residual = float(np.max(np.linalg.norm(inplane - dist[:, None] * shear, axis=1)))
        drift = float(np.linalg.norm(shear)) * float(dist[-1])
        if residual > max(0.05, 0.1 * min(ps)):
            raise DicomError(
                f"{where}: slice positions do not lie on one line (in-plane offsets jump by up "
                f"to {residual:.2f} mm); these look like several stacks in one series, split "
                "them into separate folders"
            )
        tilted = drift > max(0.02, 0.05 * min(ps))
        if tilted:
            angle = math.degrees(math.atan(float(np.linalg.norm(shear))))
            if not correct_tilt:
                raise DicomError(
                    f"{where}: gantry tilt of {angle:.2f} degrees (slice positions are not along "
                    "the image normal); read it with a sheared affine of the true geometry: "
                    f"{_option_hint('--correct-tilt', 'correct_tilt')}"
                )
            meta["gantry_tilt_deg"] = round(angle, 4)
            meta["tilt"] = "sheared affine (exact geometry, no resampling)"
            direction = normal + shear  # world step per mm along the normal
        else:
            direction = normal
        gaps = np.diff(along)
        med = float(np.median(gaps))
        tol = max(0.01 * med, min(0.02, 0.1 * med))
        uniform = bool(np.max(np.abs(gaps - med)) <= tol)
        if uniform:
            spacing = float(dist[-1]) / (k - 1)
            step = (centres[-1] - centres[0]) / (k - 1) if tilted else normal * spacing
        else:
            if not allow_nonuniform:
                worst = int(np.argmax(np.abs(gaps - med)))
                raise DicomError(
                    f"{where}: slice gaps are not uniform ({float(gaps.min()):.3f} to "
                    f"{float(gaps.max()):.3f} mm, median {med:.3f} mm; e.g. a missing slice "
                    f"after position {along[worst]:.2f} mm); resample it linearly to the median "
                    f"spacing: {_option_hint('--allow-nonuniform', 'allow_nonuniform')}"
                )
            resample = med
            step = direction * med
            meta["resampled_from_positions_mm"] = [round(float(v), 4) for v in dist]
            meta["resampled_to_spacing_mm"] = round(med, 6)
        meta.setdefault("slice_spacing_source", "ImagePositionPatient")
    a = np.eye(4)
    a[:3, 0] = row * ps[1]
    a[:3, 1] = col * ps[0]
    a[:3, 2] = step
    a[:3, 3] = centres[0]
    return _Stack(slots, labels, a, along - along[0], resample, meta)


# -- pixels -------------------------------------------------------------------------------------
_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}


def _decode_failure(ds: Any, path: Path, exc: BaseException) -> str:
    ts = str(ds.file_meta.TransferSyntaxUID)
    name = _ts_name(ts)
    hint = ""
    try:
        from pydicom.pixels import get_decoder

        dec = get_decoder(ts)
        if not dec.is_available:
            hint = f"; pydicom is missing: {'; '.join(dec.missing_dependencies)}"
    except Exception:
        hint = "; pydicom has no decoder for this transfer syntax"
    pkgs = _PACKAGES.get(ts, "a GDCM-enabled SimpleITK")
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    from pydicom.uid import UID

    if not UID(ts).is_compressed:
        return (
            f"{path}: cannot read the uncompressed pixel data ({name}): {reason[:200]}; the "
            "file is probably truncated or its Rows/Columns/BitsAllocated are wrong"
        )
    return (
        f"{path}: cannot decode pixel data in {name} ({ts}): {reason[:200]}{hint}; "
        f"install {pkgs} (pip install {pkgs}) or convert the file with dcmdjpeg/gdcmconv"
    )


def _rescale_of(ds: Any) -> tuple[float, float]:
    slope, inter = _float(ds.get("RescaleSlope")), _float(ds.get("RescaleIntercept"))
    shared = ds.get("SharedFunctionalGroupsSequence")
    item = shared[0] if shared else None
    if slope is None and item is not None:
        pvt = _first_item(item, None, "PixelValueTransformationSequence")
        if pvt is not None:
            slope, inter = _float(pvt.get("RescaleSlope")), _float(pvt.get("RescaleIntercept"))
    return (slope or 1.0), (inter or 0.0)


def _decode_with_sitk(ds: Any, path: Path, exc: BaseException) -> np.ndarray:
    """GDCM's decoding of one file, with GDCM's own rescale undone (back to stored values)."""
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(path))
        arr = sitk.GetArrayFromImage(reader.Execute())
    except Exception as exc2:
        raise DicomError(_decode_failure(ds, path, exc)) from exc2
    slope, inter = _rescale_of(ds)
    if slope != 1.0 or inter != 0.0:
        arr = np.rint((arr.astype(np.float64) - inter) / slope)
    return arr


def _decode(ds: Any, path: Path) -> np.ndarray:
    """Stored values of every frame, ``(frames, rows, cols, samples)``, native byte order."""
    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomError(
            f"{path}: has no pixel data (no PixelData element), so it is not an image; "
            "remove it from the folder or pick another series"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = np.asarray(ds.pixel_array)
    except DicomError:
        raise
    except Exception as exc:
        arr = _decode_with_sitk(ds, path, exc)
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    rows, cols = int(ds.Rows), int(ds.Columns)
    nframes = max(1, _int(ds.get("NumberOfFrames")) or 1)
    samples = _int(ds.get("SamplesPerPixel")) or 1
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric == "PALETTE COLOR" and samples == 1:
        from pydicom.pixels import apply_color_lut

        arr = np.asarray(apply_color_lut(arr, ds))
        samples = 3
    if arr.size != nframes * rows * cols * samples:
        raise DicomError(
            f"{path}: decoded {arr.size} values, expected {nframes} frame(s) of {rows}x{cols}"
            f"x{samples}; the pixel data is truncated or its header is wrong"
        )
    arr = arr.reshape(nframes, rows, cols, samples)
    if photometric == "MONOCHROME1":
        bits = _int(ds.get("BitsStored")) or arr.dtype.itemsize * 8
        if np.issubdtype(arr.dtype, np.integer):
            signed = (_int(ds.get("PixelRepresentation")) or 0) == 1
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            arr = (lo + hi - arr.astype(np.int64)).astype(arr.dtype)
        else:
            arr = float(np.max(arr)) + float(np.min(arr)) - arr
    return arr


def _read_pixels(path: Path) -> tuple[Any, np.ndarray]:
    try:
        ds = _ensure_transfer_syntax(_quiet_read(path, force=True))
    except Exception as exc:
        raise DicomError(
            f"{path}: cannot read the DICOM file ({type(exc).__name__}: {exc}); it may be truncated"
        ) from exc
    return ds, _decode(ds, path)


def _assemble(stack: _Stack) -> tuple[np.ndarray, dict[str, Any]]:
    """``(C, I, J, K)`` array with rescale applied, and facts for meta."""
    needed: dict[Path, list[_Frame]] = {}
    for slot in stack.slots:
        for fr in slot:
            needed.setdefault(fr.path, []).append(fr)
    images: dict[tuple[Path, int, int], np.ndarray] = {}
    photometrics: set[str] = set()
    for p, frs in needed.items():
        ds, arr = _read_pixels(p)
        photometrics.add(str(ds.get("PhotometricInterpretation", "") or "").strip().upper())
        for fr in frs:
            if fr.frame >= arr.shape[0]:
                raise DicomError(
                    f"{p}: frame {fr.frame + 1} is missing from the pixel data "
                    f"({arr.shape[0]} frame(s) decoded)"
                )
            img = arr[fr.frame]
            if fr.tile >= 0:
                side = fr.tiles_per_side
                r0, c0 = (fr.tile // side) * fr.rows, (fr.tile % side) * fr.cols
                img = img[r0 : r0 + fr.rows, c0 : c0 + fr.cols]
            if img.shape[:2] != (fr.rows, fr.cols):
                raise DicomError(f"{p}: image is {img.shape[:2]}, header says {fr.rows}x{fr.cols}")
            images[(fr.path, fr.frame, fr.tile)] = img
    m = len(stack.slots[0])
    samples = next(iter(images.values())).shape[2]
    k = len(stack.slots)
    rows, cols = stack.slots[0][0].rows, stack.slots[0][0].cols
    slopes = np.array([[fr.slope for fr in slot] for slot in stack.slots])  # (K, m)
    inters = np.array([[fr.intercept for fr in slot] for slot in stack.slots])
    raw_dtype = np.result_type(*[im.dtype for im in images.values()])
    is_int = np.issubdtype(raw_dtype, np.integer) or raw_dtype == np.bool_
    int_path = is_int and bool(np.all(slopes == 1.0)) and bool(np.all(inters == np.round(inters)))
    work = np.int32 if int_path else np.float32
    out = np.empty((m * samples, cols, rows, k), dtype=work)
    for kk, slot in enumerate(stack.slots):
        for ch, fr in enumerate(slot):
            img = images[(fr.path, fr.frame, fr.tile)]
            for s in range(samples):
                plane = img[:, :, s].T  # (rows, cols) -> (cols, rows) = (I, J)
                if int_path:
                    vals = plane.astype(np.int64) + int(fr.intercept)
                    if vals.size and (vals.min() < -(2**31) or vals.max() >= 2**31):
                        raise DicomError(f"{fr.path}: values overflow 32-bit integers")
                    out[ch * samples + s, :, :, kk] = vals
                else:
                    out[ch * samples + s, :, :, kk] = plane.astype(np.float64) * fr.slope + (
                        fr.intercept
                    )
    if int_path:
        lo, hi = (int(out.min()), int(out.max())) if out.size else (0, 0)
        out = out.astype(np.int16) if lo >= -32768 and hi <= 32767 else out.astype(np.float32)
    facts: dict[str, Any] = {"photometric": sorted(photometrics)}
    uniq = {(float(a), float(b)) for a, b in zip(slopes.ravel(), inters.ravel(), strict=True)}
    if len(uniq) == 1:
        one_slope, one_intercept = next(iter(uniq))
        facts["rescale"] = {"slope": one_slope, "intercept": one_intercept}
    else:
        facts["rescale"] = "per slice/frame"
    if "MONOCHROME1" in photometrics:
        facts["monochrome1_inverted"] = True
    facts["samples_per_pixel"] = int(samples)
    return out, facts


def _resample_slices(array: np.ndarray, positions: np.ndarray, spacing: float) -> np.ndarray:
    """Linear interpolation along K from ``positions`` (mm) to a uniform ``spacing`` (mm).

    Equivalent to ``scipy.ndimage.map_coordinates(order=1)`` along that single axis.
    """
    k_new = int(round(float(positions[-1] - positions[0]) / spacing)) + 1
    targets = positions[0] + spacing * np.arange(k_new)
    frac = np.interp(targets, positions, np.arange(len(positions), dtype=np.float64))
    i0 = np.clip(np.floor(frac).astype(int), 0, len(positions) - 2)
    w = (frac - i0).astype(np.float32)
    a = array.astype(np.float32, copy=False)
    return a[..., i0] * (1.0 - w) + a[..., i0 + 1] * w


def read(
    path: Path,
    *,
    series: str | int | None = None,
    allow_nonuniform: bool = False,
    correct_tilt: bool = False,
) -> Volume:
    """Read a DICOM series (folder, searched recursively, or one file) into a RAS+ ``Volume``.

    The array is ``(C, I, J, K)``: ``I`` along the image rows' direction (DICOM column index),
    ``J`` along the columns' direction (row index), ``K`` slices by ascending position along the
    normal. ``C`` is 1, 3 for RGB, or the number of volumes sharing the positions (time points,
    echoes, b-values...; ``meta["channels"]`` says which is which).

    ``series`` picks one series (index or SeriesInstanceUID, as :func:`list_series` gives them)
    when the folder holds several. ``allow_nonuniform`` resamples slices with missing or uneven
    gaps linearly to the median spacing along the normal instead of failing.
    ``correct_tilt`` reads a gantry-tilted series with a sheared affine whose K column is the
    actual step between slice positions: this is the exact geometry of the voxels, not a
    resampling (medseg's resampler handles sheared grids later). Every problem raises
    ``DicomError`` with one line naming the file or folder and what to do.
    """
    p = Path(path)
    groups = _groups(_scan(p))
    g = _select(groups, series, p)
    where = str(p) if len(groups) == 1 else f"{p} (series {groups.index(g)}, {g.uid})"
    stack = _analyse(g, where, allow_nonuniform=allow_nonuniform, correct_tilt=correct_tilt)
    array, facts = _assemble(stack)
    if stack.resample_spacing is not None:
        array = _resample_slices(array, stack.positions, stack.resample_spacing)
    affine = LPS_TO_RAS @ stack.affine_lps
    samples = facts.pop("samples_per_pixel")
    colours = ["R", "G", "B"] if samples == 3 else [str(s) for s in range(samples)]
    channels = []
    for lab in stack.channel_labels:
        if samples == 1:
            channels.append(lab or g.first.modality)
        else:
            channels.extend(f"{lab}, {c}" if lab else c for c in colours)
    first = g.first
    file_notes: dict[str, Any] = {}
    for f in g.files.values():
        for key, val in f.notes:
            file_notes.setdefault(key, val)
    syntaxes = sorted({_ts_name(f.transfer_syntax) for f in g.files.values()})
    meta: dict[str, Any] = {
        "source": str(p),
        "format": "dicom",
        "modality": first.modality,
        "series_uid": g.uid,
        "series_description": first.description,
        "series_number": first.series_number,
        "manufacturer": first.manufacturer,
        "transfer_syntax": syntaxes[0] if len(syntaxes) == 1 else syntaxes,
        "files": len(g.files),
        "channels": channels,
        **facts,
        **stack.meta,
        **file_notes,
    }
    return Volume(np.ascontiguousarray(array), Grid(array.shape[1:], affine), False, meta)


@dataclass(frozen=True)
class SourceFrame:
    """One stored 2D image of a series: a file, the 0-based ``frame`` inside it (enhanced
    multi-frame files; 0 otherwise) and the mosaic ``tile`` (-1 when not a mosaic)."""

    path: Path
    frame: int
    tile: int


@dataclass(frozen=True)
class SeriesGeometry:
    """Where :func:`read` puts a series' voxels, from the headers alone (no pixel decoding).

    ``grid`` equals ``read(path, series=..., correct_tilt=True).grid``; ``slices[k]`` are the
    stored images at slice ``k`` of that grid's K axis, in channel order. ``enhanced`` is True
    when any file holds several frames (enhanced or classic multi-frame), ``mosaic`` when the
    slices are tiles of Siemens mosaics.
    """

    path: Path
    grid: Grid
    slices: tuple[tuple[SourceFrame, ...], ...]
    series_uid: str
    enhanced: bool
    mosaic: bool


def read_geometry(path: Path, *, series: str | int | None = None) -> SeriesGeometry:
    """The grid of a series as :func:`read` builds it, and the stored image at each slice.

    Writers of objects that reference a series (DICOM-SEG, RTSTRUCT) use this to place each
    slice of a label map on the image it came from. A series whose slices :func:`read` would
    resample (uneven gaps) has no stored image per slice and raises ``DicomError``.
    """
    p = Path(path)
    groups = _groups(_scan(p))
    g = _select(groups, series, p)
    where = str(p) if len(groups) == 1 else f"{p} (series {groups.index(g)}, {g.uid})"
    stack = _analyse(g, where, allow_nonuniform=False, correct_tilt=True)
    fr0 = stack.slots[0][0]
    grid = Grid((fr0.cols, fr0.rows, len(stack.slots)), LPS_TO_RAS @ stack.affine_lps)
    slices = tuple(
        tuple(SourceFrame(fr.path, fr.frame, fr.tile) for fr in slot) for slot in stack.slots
    )
    return SeriesGeometry(
        path=p,
        grid=grid,
        slices=slices,
        series_uid=g.uid,
        enhanced=any(len(f.frames) > 1 and fr0.tile < 0 for f in g.files.values()),
        mosaic=fr0.tile >= 0,
    )
