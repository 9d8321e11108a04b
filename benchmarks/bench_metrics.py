"""HD95 / NSD speed and agreement: medseg.metrics vs MONAI, MedPy and DeepMind surface-distance.

Cases (spacing 0.8 x 0.8 x 2.5 mm):
  smooth256  256^3 grid, a smoothly deformed sphere vs a differently deformed one
  noisy256   256^3 grid, the same reference vs a prediction with a noisy (rough) boundary
  organ512   512 x 512 x 300 CT-sized grid, a liver-sized smooth object vs a perturbed one

Each tool gets the same boolean masks; the best of REPEATS runs is reported for medseg and MONAI,
one run for the slower tools. Prints seconds, the speed ratio (tool / medseg) and the largest
difference of values (HD95 vs MONAI, NSD vs DeepMind).
Run: .venv/bin/python benchmarks/bench_metrics.py
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
from scipy import ndimage

from medseg import metrics as M

SPACING = (0.8, 0.8, 2.5)
REPEATS = 3
TOL_MM = 2.0


def _deformed(shape, centre, radii, seed, amp, sigma):
    """Ellipsoid whose radius is modulated by smooth (large sigma) or rough (small) noise."""
    rng = np.random.default_rng(seed)
    g = [np.arange(n, dtype=np.float32) - c for n, c in zip(shape, centre, strict=True)]
    r2 = sum(
        (
            x[(slice(None),) + (None,) * (2 - i)]
            if i == 0
            else x[(None,) * i + (slice(None),) + (None,) * (2 - i)]
        )
        ** 2
        / rr**2
        for i, (x, rr) in enumerate(zip(g, radii, strict=True))
    )
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    noise *= amp / (noise.std() + 1e-12)
    return np.sqrt(r2) + noise < 1.0


def cases():
    s = (256, 256, 256)
    ref = _deformed(s, (128, 128, 128), (100, 95, 90), 0, 0.03, 12)
    yield "smooth256", _deformed(s, (129, 127, 128), (98, 96, 88), 1, 0.03, 12), ref
    yield "noisy256", _deformed(s, (128, 128, 128), (100, 95, 90), 2, 0.03, 1.5), ref
    s = (512, 512, 300)
    # ~ 200 x 150 x 60 mm object, about 1 L: a liver in an abdominal CT
    ref = _deformed(s, (250, 270, 150), (125, 94, 12), 3, 0.03, 8)
    yield "organ512", _deformed(s, (252, 268, 150), (123, 95, 12), 4, 0.04, 8), ref


def best(fn, repeats):
    t_best, val = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        val = fn()
        t_best = min(t_best, time.perf_counter() - t)
    return t_best, val


def main() -> None:
    import torch
    from monai.metrics import compute_hausdorff_distance

    torch.set_num_threads(2)
    try:
        import surface_distance as sd
    except ImportError:
        sd = None
    try:
        from medpy.metric.binary import hd95 as medpy_hd95
    except ImportError:
        medpy_hd95 = None
    warnings.filterwarnings("ignore")
    print(f"{'case':10s} {'tool':10s} {'seconds':>8s} {'ratio':>7s}  value")
    for name, pred, ref in cases():
        ours_t, ours = best(lambda p=pred, r=ref: M.hausdorff_distance(p, r, SPACING, 95), REPEATS)
        nsd_t, nsd = best(lambda p=pred, r=ref: M.surface_dice(p, r, SPACING, TOL_MM), 1)
        print(
            f"{name:10s} {'medseg':10s} {ours_t:8.3f} {'1.0':>7s}  HD95 {ours:.6f} mm "
            f"(surface voxels {int(M._face_boundary(np.pad(ref, 1)).sum())})"
        )
        print(f"{name:10s} {'medseg NSD':10s} {nsd_t:8.3f} {'':>7s}  NSD@{TOL_MM}mm {nsd:.8f}")
        P = torch.from_numpy(pred[None, None])
        R = torch.from_numpy(ref[None, None])
        t, v = best(
            lambda P=P, R=R: float(
                compute_hausdorff_distance(
                    P, R, include_background=True, percentile=95, spacing=list(SPACING)
                )
            ),
            REPEATS,
        )
        print(
            f"{name:10s} {'MONAI':10s} {t:8.3f} {t / ours_t:7.1f}  HD95 {v:.6f} mm "
            f"|diff| {abs(v - ours):.2e}"
        )
        if sd is not None:

            def dm(p=pred, r=ref):
                d = sd.compute_surface_distances(r, p, SPACING)
                return sd.compute_robust_hausdorff(d, 95), sd.compute_surface_dice_at_tolerance(
                    d, TOL_MM
                )

            t, (h, n) = best(dm, 1)
            print(
                f"{name:10s} {'DeepMind':10s} {t:8.3f} {t / ours_t:7.1f}  HD95 {h:.6f} mm "
                f"(surfel-weighted definition); NSD {n:.8f} |diff| {abs(n - nsd):.2e} "
                f"(NSD ratio {t / nsd_t:.1f})"
            )
        if medpy_hd95 is not None and pred.size <= 256**3:
            t, v = best(lambda p=pred, r=ref: medpy_hd95(p, r, voxelspacing=SPACING), 1)
            print(
                f"{name:10s} {'MedPy':10s} {t:8.3f} {t / ours_t:7.1f}  HD95 {v:.6f} mm "
                "(pooled-percentile definition)"
            )
        elif medpy_hd95 is not None:
            print(f"{name:10s} {'MedPy':10s} skipped: full-volume EDT of 78M voxels needs >4 GB")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
