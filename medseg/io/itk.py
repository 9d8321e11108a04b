"""NRRD / MetaImage (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) through SimpleITK.

ITK keeps geometry in LPS+ mm and ``GetArrayFromImage`` returns ``(k, j, i)`` arrays. Both are
converted here, once: the array is transposed to ``(i, j, k)`` and the direction rows and the
origin are multiplied by ``diag(-1, -1, 1)`` to give a RAS+ affine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medseg.atomic import write_with
from medseg.errors import GeometryError, ReadError, WriteError
from medseg.volume import LPS_TO_RAS, Grid, Volume


def itk_affine(image: sitk.Image) -> np.ndarray:
    """4x4 voxel ``(i, j, k)`` -> RAS+ mm affine of a 2D or 3D SimpleITK image."""
    dim = image.GetDimension()
    d = np.eye(3)
    d[:dim, :dim] = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing = np.ones(3)
    spacing[:dim] = image.GetSpacing()
    origin = np.zeros(3)
    origin[:dim] = image.GetOrigin()
    lps = np.eye(4)
    lps[:3, :3] = d * spacing[None, :]
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def read(path: Path, **options: Any) -> Volume:
    """Read an NRRD or MetaImage file into a RAS+ ``Volume`` ``(C, I, J, K)``.

    Vector pixels (several components) become channels; a 4th ITK dimension becomes channels
    too. The pixel type is kept (integer labels stay integer).
    """
    if options:
        raise ReadError(f"{path}: NRRD/MetaImage reader takes no options, got {sorted(options)}")
    p = Path(path)
    try:
        image = sitk.ReadImage(str(p))
        arr = sitk.GetArrayFromImage(image)  # (k, j, i[, c]) or (t, k, j, i)
    except RuntimeError as exc:
        why = " ".join(str(exc).split())[-200:]
        raise ReadError(
            f"{p}: cannot read as NRRD/MetaImage ({why}); the file may be truncated or corrupt"
        ) from None
    dim = image.GetDimension()
    ncomp = image.GetNumberOfComponentsPerPixel()
    if dim == 4 and ncomp == 1:
        # (t, k, j, i) -> channels are the 4th ITK axis; geometry from the first 3
        image = image[:, :, :, 0]
        arr = arr.transpose(0, 3, 2, 1)
    elif dim in (2, 3):
        if ncomp == 1:
            arr = arr[..., None]
        arr = np.moveaxis(arr, -1, 0)  # (c, [k,] j, i)
        arr = arr.transpose(0, *range(arr.ndim - 1, 0, -1))  # (c, i, j[, k])
        if dim == 2:
            arr = arr[..., None]
    else:
        raise ReadError(
            f"{p}: {dim}D image with {ncomp} components per pixel; medseg reads 2D/3D images "
            f"(vector pixels become channels) and 4D scalar images"
        )
    try:
        grid = Grid((arr.shape[1], arr.shape[2], arr.shape[3]), itk_affine(image))
    except GeometryError as exc:
        raise ReadError(f"{p}: invalid geometry: {exc}") from None
    meta = {"source": str(p), "format": "itk"}
    return Volume(np.ascontiguousarray(arr), grid, False, meta)


def to_itk_image(volume: Volume) -> sitk.Image:
    """The SimpleITK image (LPS geometry, vector pixels for several channels) of a volume.

    Labels are stored in the smallest of uint8/uint16/int16/int32 that holds their values;
    images keep an integer dtype or become float32. The direction must be orthonormal (ITK
    cannot store shear); a sheared affine raises ``WriteError``.
    """
    a = volume.array
    if volume.is_label:
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        dtype = next(
            np.dtype(t)
            for t in (np.uint8, np.uint16, np.int16, np.int32, np.int64)
            if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max
        )
    elif a.dtype == np.bool_:
        dtype = np.dtype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        dtype = a.dtype.newbyteorder("=")
    else:
        dtype = np.dtype(np.float32)
    d = volume.grid.direction
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-6):
        raise WriteError("ITK formats cannot store a sheared affine; write NIfTI (.nii.gz)")
    # (c, i, j, k) -> (k, j, i, c)
    kji = np.ascontiguousarray(np.transpose(a, (3, 2, 1, 0)).astype(dtype, copy=False))
    multi = a.shape[0] > 1
    image = sitk.GetImageFromArray(kji if multi else kji[..., 0], isVector=multi)
    lps = LPS_TO_RAS @ volume.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(x) for x in (lps[:3, :3] / spacing[None, :]).ravel()])
    image.SetOrigin([float(x) for x in lps[:3, 3]])
    return image


def write(volume: Volume, path: Path) -> None:
    """Write ``volume`` atomically as ``.nrrd`` or ``.mha`` (gzip-compressed, one file).

    ``.nhdr`` / ``.mhd`` (header plus a separate data file) are refused: the data file name is
    written into the header, so the two files cannot be renamed into place atomically.
    """
    p = Path(path)
    if p.name.lower().endswith((".nhdr", ".mhd")):
        raise WriteError(
            f"{p}: detached-header formats (.nhdr/.mhd) are not written; use .nrrd or .mha"
        )
    image = to_itk_image(volume)

    def write(tmp: Path) -> None:
        try:
            sitk.WriteImage(image, str(tmp), True)
        except RuntimeError as exc:
            # as an OSError, the atomic writer names a full disk as such (ITK gives no errno)
            raise OSError(f"ITK: {' '.join(str(exc).split())[-200:]}") from None

    write_with(p, write)
