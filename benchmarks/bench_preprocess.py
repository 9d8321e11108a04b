"""Preprocessing speed: resampling a CT against SimpleITK and scikit-image, and per-case times.

Resamples a synthetic 512 x 512 x 200 int16 CT at 0.7 x 0.7 x 2.5 mm onto 1.0 mm isotropic
(358 x 358 x 500) with cubic quality and with linear interpolation, in one process, and prints
ratios against what a user would pick instead:

- SimpleITK ``Resample`` with ``sitkBSpline`` (cubic B-spline) and ``sitkLinear``, its default
  threads (all cores);
- ``skimage.transform.resize(order=3, mode="edge", anti_aliasing=False)``, nnU-Net's default
  image resampling.

Goals (issue 4): cubic >= 3x faster than SimpleITK B-spline and >= 10x faster than skimage;
linear time <= 1.2x SimpleITK linear. Then ``medseg preprocess`` of the real ``nrrd`` and
``brats2013`` data sets (if present), printing seconds per case.

Run: ``.venv/bin/python benchmarks/bench_preprocess.py [--skip-skimage] [--skip-cohort]``
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from medseg.resample import resample_array
from medseg.volume import Grid

SHAPE = (512, 512, 200)
SPACING = (0.7, 0.7, 2.5)
TARGET = (1.0, 1.0, 1.0)


def synthetic_ct(seed: int = 0) -> np.ndarray:
    """int16 HU-like volume: smooth anatomy plus noise (interpolation cost is data-blind)."""
    rng = np.random.default_rng(seed)
    coarse = ndi.zoom(rng.normal(size=(32, 32, 13)), (16, 16, 200 / 13), order=1)
    body = coarse[: SHAPE[0], : SHAPE[1], : SHAPE[2]] * 300.0
    return (body + rng.normal(0, 20, size=SHAPE)).astype(np.int16)


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def sitk_image(ct: np.ndarray, grid: Grid):
    """The CT as a SimpleITK image (x = I); built outside the timed region."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(ct.transpose(2, 1, 0)))
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    return img


def sitk_resample(img, target: Grid, interp: int):
    """Only ``sitk.Resample`` is timed, as a SimpleITK user would call it."""
    import SimpleITK as sitk

    return sitk.Resample(
        img,
        [int(s) for s in target.shape],
        sitk.Transform(),
        interp,
        target.origin,
        target.spacing,
        img.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )


def sitk_array(out) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-skimage", action="store_true", help="skip the slow skimage run")
    ap.add_argument("--skip-cohort", action="store_true", help="skip the real-data runs")
    args = ap.parse_args()
    import SimpleITK as sitk

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    ct = synthetic_ct()
    grid = Grid.from_spacing(SHAPE, SPACING)
    target = grid.with_spacing(TARGET)
    print(f"input {SHAPE} int16 at {SPACING} mm -> {target.shape} at {TARGET} mm")

    t_cubic, ours3 = timed(lambda: resample_array(ct[None], grid, target, order=3), 2)
    t_lin, ours1 = timed(lambda: resample_array(ct[None], grid, target, order=1), 2)
    img = sitk_image(ct, grid)
    t_sb, out3 = timed(lambda: sitk_resample(img, target, sitk.sitkBSpline))
    t_sl, out1 = timed(lambda: sitk_resample(img, target, sitk.sitkLinear), 2)
    sitk3, sitk1 = sitk_array(out3), sitk_array(out1)

    # Same numbers? medseg = scipy.ndimage.map_coordinates exactly; compare with SimpleITK
    # away from the border (their boundary handling differs).
    inner = (slice(8, -8),) * 3
    d3 = float(np.abs(ours3[0][inner] - sitk3[inner]).max())  # type: ignore[index]
    d1 = float(np.abs(ours1[0][inner] - sitk1[inner]).max())  # type: ignore[index]
    rows = [
        ("medseg cubic (B-spline)", t_cubic),
        ("SimpleITK sitkBSpline", t_sb),
        ("medseg linear", t_lin),
        ("SimpleITK sitkLinear", t_sl),
    ]
    t_sk = None
    if not args.skip_skimage:
        from skimage.transform import resize

        ct32 = ct.astype(np.float32)
        t_sk, _ = timed(
            lambda: resize(ct32, target.shape, order=3, mode="edge", anti_aliasing=False)
        )
        rows.append(("skimage resize order=3", t_sk))
    for name, t in rows:
        print(f"  {name:<26} {t:7.2f} s")
    print(f"max |medseg - SimpleITK| inside: cubic {d3:.3g} HU, linear {d1:.3g} HU")
    print(f"cubic:  SimpleITK B-spline / medseg = {t_sb / t_cubic:.1f}x  (goal >= 3)")
    if t_sk is not None:
        print(f"cubic:  skimage order 3 / medseg    = {t_sk / t_cubic:.1f}x  (goal >= 10)")
    print(f"linear: medseg / SimpleITK linear   = {t_lin / t_sl:.2f}x  (goal <= 1.2)")

    if args.skip_cohort:
        return
    data = Path(os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2] / "shared/data"))
    root = Path(__file__).resolve().parents[1]
    from medseg.manifest import load_manifest
    from medseg.preprocess.cohort import Options, preprocess_cohort

    for name in ("nrrd", "brats2013"):
        man = root / "data_manifests" / f"{name}.json"
        if not (data.is_dir() and man.is_file()):
            print(f"{name}: data or manifest missing, skipped")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            lines: list[str] = []
            t = time.perf_counter()
            res = preprocess_cohort(
                load_manifest(man, data), tmp, options=Options(workers=2), report=lines.append
            )
            total = time.perf_counter() - t
        per = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(res.done.items()))
        print(f"medseg preprocess {name}: {total:.1f} s for {len(res.done)} cases (2 workers)")
        print(f"  per case: {per}")


if __name__ == "__main__":
    main()
