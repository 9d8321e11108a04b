"""The built-in demo data set: synthetic 3D phantoms with organ-like ellipsoids.

Each case is drawn analytically in world coordinates (RAS+ mm) and sampled on its own grid,
with anisotropic spacing and a varied orientation (axis permutations, flips and a small
rotation), so labels are exact at every voxel centre and the pipeline's geometry handling is
exercised. Intensities: a body ellipsoid with two organs of different brightness, a smooth
multiplicative bias field (as MR inhomogeneity) and Gaussian noise. numpy only; writing goes
through ``medseg.io``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg import atomic
from medseg.volume import LPS_TO_RAS, Grid, Volume

LABELS = {0: "background", 1: "liver", 2: "kidney"}
_ORIENTATIONS = (
    ("R", "A", "S"),
    ("L", "P", "S"),
    ("L", "A", "S"),
    ("P", "I", "R"),
    ("A", "S", "L"),
)
_AXES = {
    "R": (0, 1.0),
    "L": (0, -1.0),
    "A": (1, 1.0),
    "P": (1, -1.0),
    "S": (2, 1.0),
    "I": (2, -1.0),
}


@dataclass(frozen=True)
class Ellipsoid:
    centre: tuple[float, float, float]  # RAS+ mm
    radii: tuple[float, float, float]  # mm, along the rotated axes
    rotation: np.ndarray  # 3x3, columns are the ellipsoid's axes in world

    def inside(self, xyz: np.ndarray) -> np.ndarray:
        local = (xyz - np.asarray(self.centre)) @ self.rotation
        return np.sum((local / np.asarray(self.radii)) ** 2, axis=-1) <= 1.0


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _case_grid(rng: np.random.Generator, index: int) -> Grid:
    codes = _ORIENTATIONS[index % len(_ORIENTATIONS)]
    direction = np.zeros((3, 3))
    for v, c in enumerate(codes):
        w, s = _AXES[c]
        direction[w, v] = s
    direction = _rotation(rng, 8.0) @ direction
    # anisotropic: the through-plane axis (the one along S/I) is 2.5 mm, in-plane ~1.6 mm
    spacing = np.array([2.5 if c in "SI" else 1.6 for c in codes])
    extent_mm = np.array([96.0, 96.0, 80.0])  # R-L, A-P, S-I field of view
    world_axis = [_AXES[c][0] for c in codes]
    shape = tuple(int(round(extent_mm[w] / s)) for w, s in zip(world_axis, spacing, strict=True))
    centre_idx = (np.asarray(shape) - 1) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing[None, :]
    affine[:3, 3] = rng.normal(0, 3.0, 3) - affine[:3, :3] @ centre_idx
    return Grid((shape[0], shape[1], shape[2]), affine)


def make_case(seed: int, index: int) -> tuple[Volume, Volume]:
    """One phantom: ``(image, label)`` on the same randomly oriented, anisotropic grid."""
    rng = np.random.default_rng([seed, index])
    grid = _case_grid(rng, index)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), axis=-1)
    xyz = grid.world(ijk)
    body = Ellipsoid(
        (0.0, 0.0, 0.0), tuple(rng.uniform([38, 32, 30], [44, 38, 36])), _rotation(rng, 5)
    )
    liver = Ellipsoid(
        tuple(rng.uniform([-20, -6, -4], [-14, 4, 6])),
        tuple(rng.uniform([19, 15, 15], [24, 19, 19])),
        _rotation(rng, 25),
    )
    kidney = Ellipsoid(
        tuple(rng.uniform([19, -8, -6], [24, 2, 4])),
        tuple(rng.uniform([11, 9, 13], [13, 11, 16])),
        _rotation(rng, 25),
    )
    label = np.zeros(grid.shape, np.uint8)
    label[liver.inside(xyz)] = 1
    label[kidney.inside(xyz)] = 2
    image = np.where(body.inside(xyz), 100.0, 0.0)
    image[label == 1] = 160.0
    image[label == 2] = 55.0
    # smooth multiplicative inhomogeneity: a low-order polynomial in world coordinates
    coef = rng.normal(0, 0.004, 3)
    bias = np.exp(xyz @ coef)
    image = image * bias + rng.normal(0, 8.0, grid.shape)
    meta = {"source": f"demo phantom {index}", "modality": "MR"}
    return (
        Volume(image[None].astype(np.float32), grid, meta=meta),
        Volume(label[None], grid, is_label=True, meta=meta),
    )


def write_dataset(out: Path, n_cases: int = 24, n_val: int = 6, seed: int = 0) -> Path:
    """Write ``n_cases`` phantoms as NIfTI under ``out`` and return the manifest path.

    Layout: ``out/images/demo_XXX.nii.gz``, ``out/labels/demo_XXX.nii.gz`` and
    ``out/manifest.json`` (paths relative to ``out``, its ``data_root`` "."; the last ``n_val``
    cases are "val").
    """
    from medseg.io import write_volume

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n_cases):
        cid = f"demo_{i:03d}"
        image, label = make_case(seed, i)
        write_volume(image, out / "images" / f"{cid}.nii.gz")
        write_volume(label, out / "labels" / f"{cid}.nii.gz")
        cases.append(
            {
                "case_id": cid,
                "images": [f"images/{cid}.nii.gz"],
                "label": f"labels/{cid}.nii.gz",
                "split": "val" if i >= n_cases - n_val else "train",
            }
        )
    manifest = {
        "name": "demo",
        "data_root": ".",
        "channels": ["MR"],
        "modalities": ["MR"],
        "labels": {str(k): v for k, v in LABELS.items()},
        "cases": cases,
    }
    path = out / "manifest.json"
    atomic.write_text(path, json.dumps(manifest, indent=2) + "\n")
    return path


def _save_dataset(ds: Any, tmp: Path) -> None:
    ds.save_as(tmp, enforce_file_format=True)


def write_dicom_series(volume: Volume, folder: Path, *, series_description: str = "demo") -> None:
    """Write a one-channel volume as an MR DICOM series (one file per K slice, int16 + rescale).

    Voxel axis I runs along the row direction cosine (ImageOrientationPatient[0:3]), J along the
    column cosine and K along the slices, in DICOM's LPS world; shuffled instance numbers are
    not used, so a reader must sort by position. Used for the demo's DICOM case.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    grid = volume.grid
    lps = LPS_TO_RAS[:3, :3]  # RAS+ -> LPS+ (the flip is its own inverse)
    d = lps @ grid.direction
    sx, sy, _ = grid.spacing
    arr = volume.array[0]
    lo, hi = float(arr.min()), float(arr.max())
    slope = max(hi - lo, 1e-6) / 30000.0
    intercept = lo
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    for k in range(grid.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        sop_uid = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice_{k:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "MR"
        ds.PatientName = "Demo^Phantom"
        ds.PatientID = "DEMO"
        ds.SeriesDescription = series_description
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps @ grid.world([0, 0, k])]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*d[:, 0], *d[:, 1])]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]  # row spacing (between rows = J), column
        ds.SliceThickness = f"{grid.spacing[2]:.6f}"
        ds.Rows, ds.Columns = grid.shape[1], grid.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope = f"{slope:.10g}"
        ds.RescaleIntercept = f"{intercept:.10g}"
        stored = np.round((arr[:, :, k].T - intercept) / float(ds.RescaleSlope)).astype(np.int16)
        ds.PixelData = stored.tobytes()
        atomic.write_with(path, functools.partial(_save_dataset, ds))
