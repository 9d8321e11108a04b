"""Shared helpers of the DICOM-SEG and RTSTRUCT tests: a synthetic double-oblique series and
frame geometry computed with plain numpy from DICOM attributes (no medseg code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from tests.io.test_dicom import OBLIQUE, write_slice

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])


def double_oblique_series(folder: Path, *, frame_of_reference: bool = False) -> Path:
    """Six 40x32 MR slices, double-oblique, 0.8 x 0.6 mm pixels, 1.5 mm apart along the
    normal; no FrameOfReferenceUID, no PatientSex / StudyDate (anonymised)."""
    folder.mkdir(parents=True, exist_ok=True)
    row, col = np.array(OBLIQUE[:3]), np.array(OBLIQUE[3:])
    normal = np.cross(row, col)
    for k in range(6):
        ipp = np.array([10.0, -20.0, 30.0]) + 1.5 * k * normal
        f = write_slice(
            folder / f"s{k}.dcm",
            np.full((32, 40), k, dtype=np.int16),
            iop=OBLIQUE,
            ipp=tuple(ipp),
            pixel_spacing=(0.6, 0.8),
            modality="MR",
            instance=k + 1,
            series_uid="1.2.826.0.1.3680043.8.498.1",
        )
        if not frame_of_reference:
            ds = pydicom.dcmread(f)
            del ds.FrameOfReferenceUID
            ds.save_as(f, enforce_file_format=True)
    return folder


def frame_geometry(item: Any, shared: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(IPP, row cosine, column cosine) in LPS and (row, column) spacing of one SEG frame."""

    def first(name: str) -> Any:
        for src in (item, shared):
            if src is not None and name in src:
                return src[name].value[0]
        raise KeyError(name)

    ipp = np.array(first("PlanePositionSequence").ImagePositionPatient, dtype=float)
    iop = np.array(first("PlaneOrientationSequence").ImageOrientationPatient, dtype=float)
    ps = np.array(first("PixelMeasuresSequence").PixelSpacing, dtype=float)
    return ipp, iop, ps


def pixel_world_ras(
    ipp: np.ndarray, iop: np.ndarray, ps: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """RAS+ mm of pixels (row, col) of a DICOM image plane (PS3.3 C.7.6.2.1.1), ``(n, 3)``."""
    lps = ipp[None] + np.outer(cols * ps[1], iop[:3]) + np.outer(rows * ps[0], iop[3:])
    return lps @ RAS_FROM_LPS.T
