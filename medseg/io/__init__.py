"""Read and write volumes: NIfTI, DICOM, NRRD/MHA (SimpleITK), 2D images.

``read_volume`` dispatches on the suffix, or on a directory (a DICOM folder), and returns a
``Volume`` in RAS+ with its array ``(C, I, J, K)``. Every format-specific reader converts its
native convention (LPS, row/column order) once, here, never later.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medseg.errors import ReadError, WriteError
from medseg.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE2D_SUFFIXES = (".png", ".tif", ".tiff", ".gif", ".jpg", ".jpeg", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: Every suffix a volume file may carry, longest first where one ends another.
VOLUME_SUFFIXES = (*NIFTI_SUFFIXES[::-1], *ITK_SUFFIXES, *IMAGE2D_SUFFIXES, *DICOM_SUFFIXES)


def split_suffix(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``("case_01", ".nii.gz")`` for ``case_01.nii.gz``: the name without its volume suffix,
    which is how medseg derives case ids from file names. A folder (a DICOM series) has suffix
    ``""``; an unknown suffix is split as ``pathlib`` does."""
    p = Path(path)
    if p.is_dir():
        return p.name, ""
    low = p.name.lower()
    for suffix in VOLUME_SUFFIXES:
        if low.endswith(suffix) and len(p.name) > len(suffix):
            return p.name[: -len(suffix)], p.name[-len(suffix) :]
    return p.stem, p.suffix


def volume_format(path: str | os.PathLike[str]) -> str:
    """``"nifti" | "dicom" | "itk" | "image2d"`` for a path, by suffix or directory."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    if name.endswith(IMAGE2D_SUFFIXES):
        return "image2d"
    if name.endswith(DICOM_SUFFIXES) or "." not in name:
        return "dicom"
    raise ReadError(
        f"{p}: unknown file type; medseg reads .nii/.nii.gz, DICOM (folder or file), "
        f".nrrd/.nhdr/.mha/.mhd and .png/.tif/.gif/.jpg images"
    )


def read_volume(
    path: str | os.PathLike[str],
    *,
    series: str | int | None = None,
    label: bool = False,
    reference: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Volume:
    """Read a scan or label map into a RAS+ ``Volume``.

    ``series`` picks one series of a DICOM folder (SeriesInstanceUID or index as listed by
    ``medseg inspect``). ``label=True`` requires integer values and returns an integer
    ``Volume`` with ``is_label=True``. Further ``options`` go to the format's reader (DICOM:
    ``allow_nonuniform``, ``correct_tilt``).

    A DICOM-SEG file (or a folder holding only one) is read as a label map of segment
    numbers; an RT Structure Set needs ``reference``, the image series it was drawn on, and
    is rasterised onto that series' grid. With ``reference`` a DICOM-SEG lands on the
    reference's grid too; for every other format ``reference`` is ignored (they carry their
    own grid), so a manifest can pass a case's image for any label.
    """
    p = Path(path)
    if not p.exists():
        raise ReadError(f"{p}: no such file or folder")
    fmt = volume_format(p)
    derived = _derived_object(p) if fmt == "dicom" else None
    if derived is not None:
        vol = _read_derived(derived, reference, series)
        return as_label(vol, str(p))
    if fmt == "nifti":
        import medseg.io.nifti as nifti

        vol = nifti.read(p)
    elif fmt == "itk":
        import medseg.io.itk as itk

        vol = itk.read(p)
    elif fmt == "image2d":
        import medseg.io.image2d as image2d

        vol = image2d.read(p)
    else:
        import medseg.io.dicom as dicom

        vol = dicom.read(p, series=series, **options)
    if fmt != "dicom" and (series is not None or options):
        raise ReadError(f"{p}: options {['series', *options]} apply to DICOM input only")
    return as_label(vol, str(p)) if label else vol


def _derived_object(p: Path) -> tuple[str, Path] | None:
    """``("seg" | "rtstruct", file)`` when ``p`` is (or is a folder holding only) one such
    object; None for image files and series (a folder is decided by its first DICOM file)."""
    from medseg.io.dicom import _quiet_read
    from medseg.io.dicom_seg import is_dicom_seg
    from medseg.io.rtstruct import is_rtstruct

    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
    found: list[tuple[str, Path]] = []
    for f in files:
        try:
            ds = _quiet_read(f, stop_before_pixels=True)
        except Exception:
            continue
        kind = "seg" if is_dicom_seg(ds) else "rtstruct" if is_rtstruct(ds) else None
        if kind is None:
            return None
        found.append((kind, f))
    return found[0] if len(found) == 1 else None


def _read_derived(
    derived: tuple[str, Path], reference: str | os.PathLike[str] | None, series: Any
) -> Volume:
    kind, f = derived
    if kind == "seg":
        from medseg.io.dicom_seg import read_dicom_seg

        return read_dicom_seg(f, reference=reference, series=series)
    from medseg.errors import RTStructError
    from medseg.io.rtstruct import read_rtstruct

    if reference is None:
        raise RTStructError(
            f"{f}: an RT Structure Set holds contours only; give the image series it was "
            "drawn on (--reference DICOM_DIR, reference= in Python)"
        )
    return read_rtstruct(f, reference, series=series)


def as_label(vol: Volume, source: str) -> Volume:
    """The same volume with integer values checked and stored in the smallest fitting dtype."""
    import numpy as np

    a = vol.array
    if not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.isfinite(a)):
            raise ReadError(f"{source}: label map contains NaN or infinite values")
        if not np.array_equal(a, np.round(a)):
            raise ReadError(f"{source}: label map has non-integer values; is this an image?")
    if a.shape[0] != 1:
        raise ReadError(f"{source}: label map has {a.shape[0]} channels, expected 1")
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    dtype = next(
        (
            t
            for t in (np.uint8, np.uint16, np.int16, np.int32)
            if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max
        ),
        np.int64,
    )
    meta = dict(vol.meta)
    return Volume(a.astype(dtype, copy=False), vol.grid, True, meta)


def write_volume(volume: Volume, path: str | os.PathLike[str]) -> None:
    """Write ``volume`` atomically; format from the suffix (.nii/.nii.gz, .nrrd/.mha, .png)."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        import medseg.io.nifti as nifti

        nifti.write(volume, p)
    elif name.endswith(ITK_SUFFIXES):
        import medseg.io.itk as itk

        itk.write(volume, p)
    elif name.endswith(IMAGE2D_SUFFIXES):
        import medseg.io.image2d as image2d

        image2d.write(volume, p)
    else:
        raise WriteError(f"{p}: cannot write this suffix; use .nii.gz, .nrrd, .mha or .png")
