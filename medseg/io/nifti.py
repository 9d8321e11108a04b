"""NIfTI-1/2 reading and writing with nibabel.

The affine is nibabel's ``img.affine`` (sform when its code is set, else qform, else the
zooms-only fallback), which is already voxel index -> RAS+ mm. Arrays come back ``(C, I, J, K)``:
the 4th NIfTI axis becomes the channels (a 5th axis, as in NIfTI vector images, too, once
singleton axes are squeezed).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg.atomic import write_with
from medseg.errors import GeometryError, ReadError, WriteError
from medseg.volume import Grid, Volume

#: NIfTI xform codes: 1 = scanner anatomical, 2 = aligned to another scan.
SCANNER = 1
ALIGNED = 2


def _channels_last_to_first(data: np.ndarray, path: Path) -> np.ndarray:
    """``(I, J[, K[, T[, C...]]])`` -> ``(C, I, J, K)``; extra axes must reduce to one."""
    if data.ndim < 2:
        raise ReadError(f"{path}: NIfTI image has {data.ndim} dimension(s); need at least 2")
    if data.ndim == 2:
        data = data[:, :, None]
    spatial, extra = data.shape[:3], data.shape[3:]
    kept = [n for n in extra if n != 1]
    if len(kept) > 1:
        raise ReadError(
            f"{path}: NIfTI image has shape {data.shape}; medseg reads at most one non-spatial "
            f"axis (channels or time), split the file first"
        )
    c = kept[0] if kept else 1
    data = data.reshape(*spatial, c)
    return np.moveaxis(data, 3, 0)


def read(path: Path, **options: Any) -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` file into a RAS+ ``Volume`` ``(C, I, J, K)``.

    Scaled data (``scl_slope`` / ``scl_inter`` set and not identity) comes back as float32 with
    the scaling applied; unscaled integer data keeps its dtype; float64 is stored as float32.
    The whole file is decompressed here, so a truncated ``.nii.gz`` fails now, not later.
    """
    if options:
        raise ReadError(f"{path}: NIfTI reader takes no options, got {sorted(options)}")
    p = Path(path)
    try:
        img = nib.load(str(p))
        if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
            raise ReadError(f"{p}: not a NIfTI image (nibabel read it as {type(img).__name__})")
        # after loading, nibabel keeps the scaling on the array proxy, not on img.header
        slope = float(getattr(img.dataobj, "slope", 1.0))
        inter = float(getattr(img.dataobj, "inter", 0.0))
        scaled = slope != 1.0 or inter != 0.0
        if scaled:
            data = img.get_fdata(dtype=np.float32)
        else:
            data = np.asarray(img.dataobj.get_unscaled())  # type: ignore[attr-defined]
            if data.dtype == np.float64:
                data = data.astype(np.float32)
            data = np.array(data, copy=True)  # detach from any memory map
        affine = np.asarray(img.affine, dtype=np.float64)
        qcode = int(img.header["qform_code"])
        scode = int(img.header["sform_code"])
    except ReadError:
        raise
    except MemoryError:
        raise
    except (
        nib.filebasedimages.ImageFileError,
        nib.spatialimages.HeaderDataError,
        OSError,
        EOFError,
        zlib.error,
        gzip.BadGzipFile,
        ValueError,
        TypeError,
    ) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ReadError(
            f"{p}: cannot read as NIfTI ({why}); the file may be truncated or not NIfTI"
        ) from None
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    arr = _channels_last_to_first(data, p)
    try:
        grid = Grid((arr.shape[1], arr.shape[2], arr.shape[3]), affine)
    except GeometryError as exc:
        raise ReadError(f"{p}: invalid NIfTI geometry: {exc}") from None
    meta = {"source": str(p), "format": "nifti", "qform_code": qcode, "sform_code": scode}
    return Volume(np.ascontiguousarray(arr), grid, False, meta)


def _label_dtype(a: np.ndarray) -> np.dtype:
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    for t in (np.uint8, np.uint16, np.int16, np.int32):
        if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
            return np.dtype(t)
    raise WriteError(f"label values {lo}..{hi} do not fit in int32")


def _image_dtype(a: np.ndarray) -> np.dtype:
    if a.dtype == np.bool_:
        return np.dtype(np.uint8)
    if np.issubdtype(a.dtype, np.integer) and a.dtype.itemsize <= 4:
        return a.dtype.newbyteorder("=")
    if np.issubdtype(a.dtype, np.integer):
        big = a.size == 0 or np.abs(a).max() > 2**31
        return np.dtype(np.float32) if big else np.dtype(np.int32)
    return np.dtype(np.float32)


def rigid_part(affine: np.ndarray) -> np.ndarray:
    """The affine with its 3x3 part replaced by the closest rotation (or reflection) times the
    column norms: what a qform can hold. Identical to ``affine`` when it has no shear."""
    m = affine[:3, :3]
    zooms = np.linalg.norm(m, axis=0)
    u, _, vt = np.linalg.svd(m / zooms)
    out = affine.copy()
    out[:3, :3] = (u @ vt) * zooms
    return out


def to_nifti_image(volume: Volume) -> nib.Nifti1Image:
    """The ``Nifti1Image`` that :func:`write` stores (data dtype, sform and qform set).

    sform holds the affine exactly. qform cannot hold shear: for a sheared affine it holds the
    closest rigid affine (:func:`rigid_part`, polar decomposition); readers that prefer sform
    (nibabel, ITK when sform is set, medseg) still see the exact geometry.
    """
    a = volume.array
    dtype = _label_dtype(a) if volume.is_label else _image_dtype(a)
    data = np.moveaxis(a, 0, 3) if a.shape[0] > 1 else a[0]
    data = np.asarray(data, dtype=dtype)
    affine = np.array(volume.affine, dtype=np.float64)
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    img = nib.Nifti1Image(data, affine, header=hdr)
    meta = volume.meta
    scode = ALIGNED if meta.get("sform_code") == ALIGNED else SCANNER
    qcode = ALIGNED if meta.get("qform_code") == ALIGNED else SCANNER
    img.set_sform(affine, code=scode)
    img.set_qform(rigid_part(affine), code=qcode)
    img.header.set_xyzt_units("mm", "sec")
    return img


def write(volume: Volume, path: Path) -> None:
    """Write ``volume`` as NIfTI-1 atomically (``.nii`` or ``.nii.gz`` by suffix).

    Labels are stored in the smallest of uint8/uint16/int16/int32 that holds their values;
    images keep an integer dtype (up to 32 bit) or become float32. Several channels become a 4D
    file ``(I, J, K, C)``. sform and qform are both set: code 2 ("aligned") where the source
    had it (``volume.meta``), else 1 ("scanner").
    """
    p = Path(path)
    img = to_nifti_image(volume)
    try:
        write_with(p, lambda tmp: nib.save(img, str(tmp)))
    except (nib.spatialimages.HeaderDataError, ValueError) as exc:
        raise WriteError(f"{p}: cannot write NIfTI: {exc}") from None
