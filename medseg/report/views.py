"""Report pictures in the orientation radiologists read, cut from ``(I, J[, K])`` arrays.

- **2D grids** (``K == 1``: PNG, TIFF, ... slices): as any image viewer shows the file, row 0
  at the top and column 0 at the left. medseg's 2D array is ``(I, J)`` with ``I`` = column x
  and ``J`` = row y (see ``medseg.io.image2d``), so the picture is the array transposed.
- **3D grids**: the array is first brought to LPS axis order with ``Grid.reoriented`` (``I``
  towards the patient's left, ``J`` posterior, ``K`` superior), so the picture depends on the
  affine, not on how the file stores its voxels: a DICOM-derived (LPS) and a NIfTI (RAS) copy
  of one scan give the same pictures. Then the radiological display convention:

  - axial (a plane of constant K): patient's right on the image's left, anterior up;
  - coronal (constant J): right on the left, superior up;
  - sagittal (constant I): anterior on the left, superior up.

Each picture is a ``(rows, columns)`` array with row 0 drawn at the top; ``View.aspect`` is a
pixel's height over its width in mm (from the spacing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medseg.volume import Grid, reorient_array

PLANES = ("axial", "coronal", "sagittal")
#: The plane of a 2D grid: the file's own rows and columns.
IMAGE = "image"
#: Patient directions at the (left, right, top, bottom) edges of each picture.
EDGES = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
    IMAGE: ("", "", "", ""),
}
#: The LPS axis each plane is a slice across.
_NORMAL = {"axial": 2, "coronal": 1, "sagittal": 0}


@dataclass(frozen=True)
class View:
    """One picture of a grid: ``plane`` (``PLANES`` or ``IMAGE``), the slice ``index`` along
    the plane's normal in LPS voxel order (0 for ``IMAGE``), and the pixel ``aspect`` (height /
    width, mm / mm)."""

    plane: str
    index: int
    aspect: float


def _lps(array: np.ndarray, grid: Grid) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``array`` ``(I, J, K)`` on ``grid`` in LPS axis order (a view) and its spacing in mm."""
    g, perm, flips = grid.reoriented("LPS")
    return reorient_array(array[None], perm, flips)[0], g.spacing


def _is_2d(grid: Grid) -> bool:
    return grid.shape[2] == 1


def cut(array: np.ndarray, grid: Grid, view: View) -> np.ndarray:
    """The ``(rows, columns)`` picture of ``array`` (``(I, J, K)``, or ``(I, J)`` for a 2D grid)
    in ``view``, row 0 at the top."""
    if _is_2d(grid):
        a2 = array if array.ndim == 2 else array[..., 0]
        return np.asarray(a2).T
    a, _ = _lps(array, grid)
    if view.plane == "axial":  # columns R -> L (LPS I), rows A -> P (LPS J)
        return a[:, :, view.index].T
    if view.plane == "coronal":  # columns R -> L, rows S -> I (LPS K reversed)
        return a[:, view.index, ::-1].T
    if view.plane == "sagittal":  # columns A -> P (LPS J), rows S -> I
        return a[view.index, :, ::-1].T
    raise ValueError(f"unknown plane {view.plane!r}")


def _busiest(a: np.ndarray, axis: int) -> int:
    """Index along ``axis`` of the slice with the most True voxels (the middle one if none)."""
    other = tuple(i for i in range(a.ndim) if i != axis)
    counts = a.sum(axis=other)
    return int(np.argmax(counts)) if counts.any() else a.shape[axis] // 2


def views_of(grid: Grid, focus: np.ndarray, fallback: np.ndarray | None = None) -> list[View]:
    """The pictures that show ``focus`` best (bool ``(I, J, K)`` or ``(I, J)``, e.g. the
    disagreeing voxels): for a 2D grid the image itself; for 3D the axial, coronal and sagittal
    slices each holding the most ``focus`` voxels (``fallback``'s, e.g. the class mask, when
    ``focus`` is empty; else the middle slices)."""
    sp = grid.spacing
    if _is_2d(grid):
        return [View(IMAGE, 0, sp[1] / sp[0])]
    a, s = _lps(focus, grid)
    if not a.any() and fallback is not None:
        a, s = _lps(fallback, grid)
    aspects = {"axial": s[1] / s[0], "coronal": s[2] / s[0], "sagittal": s[2] / s[1]}
    return [View(p, _busiest(a, _NORMAL[p]), aspects[p]) for p in PLANES]
