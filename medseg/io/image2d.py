"""2D images (PNG, TIFF, GIF, JPEG, BMP) through Pillow.

Axis convention (the same as ITK/SimpleITK for 2D files): the array is ``(C, I, J, 1)`` with
``I`` = image column (x, left to right, size = width) and ``J`` = image row (y, top to bottom,
size = height), i.e. ``array[c, x, y, 0] == pixels[y, x]`` of the usual ``(height, width)``
numpy view. The grid is ITK's for a 2D file: spacing 1 mm, origin 0, identity direction in LPS,
so in RAS+ the affine is ``diag(-1, -1, 1)``: columns run towards L, rows towards P. Files carry
no trustworthy physical pixel size (DPI is print metadata), so spacing is always 1 mm; set the
real spacing in the pipeline if it matters. Writing a volume read here gives back the same pixel
layout; the affine itself is not stored in a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from medseg.atomic import write_with
from medseg.errors import ReadError, WriteError
from medseg.volume import LPS_TO_RAS, Grid, Volume, drop_singleton_k

#: RAS+ affine of a 2D file: ITK reads it with the identity LPS geometry (direction, spacing 1
#: mm, origin 0), so medseg's grid is that identity taken to RAS+.
AFFINE_2D = LPS_TO_RAS @ np.eye(4)


def _palette_is_grey(img: Image.Image) -> bool:
    pal = img.getpalette()
    if pal is None:
        return False
    rgb = np.asarray(pal, dtype=np.int64).reshape(-1, 3)
    used = np.unique(np.asarray(img))
    used = used[used < len(rgb)]
    return bool(np.all(rgb[used, 0] == rgb[used, 1]) and np.all(rgb[used, 1] == rgb[used, 2]))


def _pixels(img: Image.Image, path: Path) -> np.ndarray:
    """``(height, width, C)`` array from a Pillow image, modes normalised."""
    mode = img.mode
    if mode == "P":
        # a greyscale palette stores grey levels (DRIVE's GIF masks: 0/255): give the levels;
        # a colour palette gives RGB(A)
        if _palette_is_grey(img):
            img = img.convert("L")
        else:
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "1":
        img = img.convert("L")
    elif mode in ("LA", "PA"):
        img = img.convert("LA")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif mode.startswith("I;16"):
        a16 = np.asarray(img)
        return a16.astype(a16.dtype.newbyteorder("="))[..., None]
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ReadError(f"{path}: unsupported image layout {a.shape} (mode {img.mode})")
    if a.shape[2] in (2, 4) and np.all(a[..., -1] == np.iinfo(np.uint8).max):
        a = a[..., :-1]  # constant opaque alpha carries no information
    return a


def read(path: Path, **options: Any) -> Volume:
    """Read a 2D image into a ``Volume`` ``(C, width, height, 1)`` (see module docstring).

    Greyscale -> 1 channel (8 or 16 bit kept), RGB -> 3 channels, RGBA -> 4 channels unless the
    alpha is constant 255 (then dropped), greyscale-palette GIF/PNG -> its grey levels. Multi-page
    files (TIFF stacks, animated GIF) are refused: convert them to a 3D format first.
    """
    if options:
        raise ReadError(f"{path}: image reader takes no options, got {sorted(options)}")
    p = Path(path)
    try:
        with Image.open(p) as img:
            n_frames = int(getattr(img, "n_frames", 1))
            if n_frames > 1:
                raise ReadError(
                    f"{p}: {n_frames} frames/pages; medseg reads single 2D images, "
                    f"save the stack as NIfTI or one file per slice"
                )
            img.load()
            hw = _pixels(img, p)
            mode = img.mode
    except ReadError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ReadError(f"{p}: cannot read as a 2D image ({why}); is it truncated?") from None
    arr = np.ascontiguousarray(np.transpose(hw, (2, 1, 0))[..., None])  # (C, x, y, 1)
    grid = Grid((arr.shape[1], arr.shape[2], 1), AFFINE_2D)
    return Volume(arr, grid, False, {"source": str(p), "format": "image2d", "mode": mode})


def write(volume: Volume, path: Path) -> None:
    """Write a 2D volume (``K == 1``) atomically as PNG (or TIFF/BMP/GIF by suffix).

    Pixel ``(x, y)`` of the file is ``array[:, x, y, 0]``: the inverse of :func:`read`. Labels
    are stored as 8-bit (values 0..255) or 16-bit (0..65535) greyscale; images with 1 channel
    as 8/16-bit greyscale when their values are integers in range, 3/4 channels as RGB(A)
    8-bit. Float images are refused for PNG (write ``.tif`` for float32, or NIfTI).
    """
    p = Path(path)
    a = volume.array
    if a.shape[3] != 1:
        raise WriteError(
            f"{p}: volume has {a.shape[3]} slices (K > 1); 2D image files hold one slice, "
            f"write .nii.gz or .nrrd instead"
        )
    c = a.shape[0]
    hw = np.transpose(drop_singleton_k(a), (2, 1, 0))  # (height, width, C)
    is_tiff = p.suffix.lower() in (".tif", ".tiff")
    integral = np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_
    if not integral and np.all(np.isfinite(a)) and np.array_equal(a, np.round(a)):
        integral = True
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if c == 1:
        if integral and lo >= 0 and hi <= 255:
            img = Image.fromarray(np.ascontiguousarray(hw[..., 0].astype(np.uint8)))
        elif integral and lo >= 0 and hi <= 65535:
            img = Image.fromarray(np.ascontiguousarray(hw[..., 0].astype(np.uint16)))
        elif is_tiff and not volume.is_label:
            img = Image.fromarray(np.ascontiguousarray(hw[..., 0].astype(np.float32)))
        else:
            raise WriteError(
                f"{p}: values {lo:g}..{hi:g} ({a.dtype}) do not fit an 8/16-bit image; "
                f"write .nii.gz (or .tif for float images)"
            )
    elif c in (3, 4) and not volume.is_label:
        if not (integral and lo >= 0 and hi <= 255):
            raise WriteError(f"{p}: RGB(A) values {lo:g}..{hi:g} must be integers in 0..255")
        img = Image.fromarray(np.ascontiguousarray(hw.astype(np.uint8)))
    else:
        raise WriteError(
            f"{p}: {c} channels; 2D image files hold 1 (grey), 3 (RGB) or 4 (RGBA) channels"
        )
    fmt = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".gif": "GIF", ".bmp": "BMP"}.get(
        p.suffix.lower()
    )
    if fmt is None:
        raise WriteError(f"{p}: medseg writes 2D images as .png, .tif, .gif or .bmp (not JPEG)")
    write_with(p, lambda tmp: img.save(tmp, format=fmt))
