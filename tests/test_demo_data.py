"""The demo phantoms: varied geometry, exact labels, and a DICOM series SimpleITK agrees with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.demo_data import make_case, write_dicom_series


def test_phantoms_vary_orientation_and_are_anisotropic() -> None:
    grids = [make_case(0, i)[0].grid for i in range(5)]
    assert len({g.orientation for g in grids}) == 5
    for g in grids:
        assert sorted(np.round(g.spacing, 3)) == [1.6, 1.6, 2.5]
        assert g.is_oblique  # a small random rotation on top of the axis permutation


def test_phantom_labels_hold_both_organs_with_distinct_intensity() -> None:
    image, label = make_case(0, 7)
    counts = np.bincount(label.array.ravel(), minlength=3)
    assert counts[1] > 2000 and counts[2] > 400
    means = [float(image.array[label.array == c].mean()) for c in (1, 2)]
    assert means[0] > 130 and means[1] < 80


def test_dicom_series_matches_simpleitk_reading(tmp_path: Path) -> None:
    image, _ = make_case(0, 3)  # P-I-R orientation: a sagittal-like stack
    write_dicom_series(image, tmp_path)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    assert arr.shape == image.shape
    # int16 storage with rescale: quantisation step is range / 30000
    step = float(np.ptp(image.array)) / 30000.0
    assert np.abs(arr - image.array[0]).max() <= step
    lps = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps @ np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    affine[:3, 3] = lps @ np.array(img.GetOrigin())
    np.testing.assert_allclose(affine, image.affine, atol=1e-4)
