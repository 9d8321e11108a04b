"""Training throughput: medseg's loop vs the equivalent MONAI loop on the same data.

For ISBI 2012 (2D) and BraTS 2013 (3D, resampled to 2 mm) from ``../shared/data``:
preprocess once into a temporary folder, then time

- medseg: ``medseg.training.train`` (foreground oversampling, elastic/rotation/scale/mirror +
  intensity augmentation, Dice+CE, SGD) with DataLoader workers;
- MONAI: ``BasicUNet`` of the same widths, ``RandCropByPosNegLabeld`` + flips/rot90,
  ``DiceCELoss``, the same optimiser, batch size and worker count, on the same cached arrays.

Prints patches/s and labelled (output) voxels/s of both, their ratios, and the fraction of step
time each loop waits for data. The first epoch (worker start, warm-up) is excluded. Each loop
runs in a fresh process, as each tool's user runs it (medseg's heap mode, :mod:`medseg.heap`,
must not carry over into MONAI's loop, nor the reverse).

    .venv/bin/python benchmarks/bench_train.py [--steps 30] [--workers 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))

CASES = {
    "isbi2012 (2D)": """
name = "bench-isbi"
manifest = "{repo}/data_manifests/isbi2012.json"
prep_dir = "{prep}"
[plan]
network = {{depth = 3, base_channels = 8}}
patch_output_size = [116, 116]
tile_output_size = [252, 252]
[train]
batch_size = 4
augment = {{p_elastic = 0.5, elastic_sigma = 10.0, p_rotate = 0.3}}
""",
    "brats2013 (3D, 2 mm)": """
name = "bench-brats"
manifest = "{repo}/data_manifests/brats2013.json"
prep_dir = "{prep}"
[plan]
network = {{depth = 2, base_channels = 8}}
target_spacing = [2.0, 2.0, 2.0]
patch_output_size = [36, 36, 36]
tile_output_size = [60, 60, 60]
[train]
batch_size = 2
augment = {{p_rotate = 0.2, p_scale = 0.2}}
""",
}


def _preprocess(toml: Path) -> None:
    from medseg.cli import main

    try:
        main(["preprocess", "--pipeline", str(toml), "--data-root", str(DATA)])
    except SystemExit as exc:
        if exc.code:
            raise


def bench_medseg(pipe, steps: int, workers: int, out: Path) -> dict[str, float]:
    """Patches/s and data-wait fraction of medseg's loop, epochs after the first."""
    from medseg import heap
    from medseg.training import train

    per_epoch = max(2, steps // 3)
    with heap.kept_freed_memory():  # as `medseg train` runs it on the CPU
        res = train(
            pipe,
            out,
            fold="all",
            epochs=4,
            device="cpu",
            progress=False,
            overrides={"iterations_per_epoch": per_epoch, "workers": workers},
        )
    rows = res.log[1:]
    seconds = sum(r["seconds"] for r in rows)
    wait = sum(r["data_wait_fraction"] * r["seconds"] for r in rows)
    return {"steps_per_s": per_epoch * len(rows) / seconds, "wait": wait / seconds}


class _Cases(torch.utils.data.Dataset):
    """The cached cases as MONAI dict samples (image, label), loaded into memory."""

    def __init__(self, prep: Path, transform) -> None:
        from medseg.preprocess.cache import list_cases, load_case

        self.items = []
        for cid in list_cases(prep):
            c = load_case(prep, cid, mmap=False)
            img, lab = np.asarray(c.image), np.asarray(c.label)
            if img.shape[-1] == 1:  # 2D cases: drop K
                img, lab = img[..., 0], lab[..., 0]
            self.items.append({"image": img, "label": np.maximum(lab, 0).astype(np.int64)})
        self.transform = transform

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i: int):
        return self.transform(self.items[i % len(self.items)])


def bench_monai(prep: Path, steps: int, workers: int) -> dict[str, float]:
    """The standard MONAI recipe at the same batch size, widths and optimiser."""
    from monai.data import list_data_collate
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet
    from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd, RandRotate90d

    from medseg.preprocess.plan import Plan

    plan = Plan.load(prep / "plan.json")
    dims = plan.spatial_dims
    # same output voxels per patch as medseg's valid-convolution output (padded convs here),
    # rounded up to MONAI BasicUNet's multiple of 16
    roi = tuple(int(np.ceil(s / 16) * 16) for s in plan.patch_output_size)
    batch = 4 if dims == 2 else 2
    base = int(plan.network["base_channels"])
    feats = (base, 2 * base, 4 * base, 8 * base, 16 * base, base)
    transform = Compose(
        [
            RandCropByPosNegLabeld(
                keys=["image", "label"], label_key="label", spatial_size=roi, pos=1, neg=2,
                num_samples=batch,
            ),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandRotate90d(keys=["image", "label"], prob=0.5, spatial_axes=(0, 1)),
        ]
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        _Cases(prep, transform),
        batch_size=1,
        num_workers=workers,
        collate_fn=list_data_collate,
        sampler=range(10**9),
    )
    net = BasicUNet(dims, plan.in_channels, plan.num_classes, features=feats)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    it = iter(loader)
    warm = max(2, steps // 3)
    wait = total = 0.0
    n = 0
    for k in range(warm + steps):
        t0 = time.perf_counter()
        b = next(it)
        t1 = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(net(b["image"].float()), b["label"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
        if k >= warm:
            wait += t1 - t0
            total += time.perf_counter() - t0
            n += 1
    del it
    return {"steps_per_s": n / total, "wait": wait / total, "roi": roi, "batch": batch}


def _child(tool: str, toml: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One tool's loop in a fresh process; its result dict."""
    cmd = [sys.executable, __file__, "--child", tool, str(toml), str(out)]
    cmd += ["--steps", str(args.steps), "--workers", str(args.workers)]
    cmd += ["--threads", str(args.threads)]
    run = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per loop")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers for both")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from medseg.config import load_pipeline
    from medseg.preprocess.plan import Plan

    if args.child:
        tool, toml_arg, out_arg = args.child
        pipe = load_pipeline(Path(toml_arg))
        if tool == "medseg":
            res = bench_medseg(pipe, args.steps, args.workers, Path(out_arg))
        else:
            res = bench_monai(pipe.prep_dir, args.steps, args.workers)
        print(json.dumps(res))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in CASES.items():
            prep = Path(tmp) / f"prep{len(rows)}"
            toml = Path(tmp) / f"p{len(rows)}.toml"
            toml.write_text(text.format(repo=REPO, prep=prep))
            _preprocess(toml)
            pipe = load_pipeline(toml)
            plan = Plan.load(prep / "plan.json")
            batch = int(pipe.train["batch_size"])
            med = _child("medseg", toml, Path(tmp) / f"run{len(rows)}", args)
            mon = _child("monai", toml, Path(tmp) / "unused", args)
            out_vox = int(np.prod(plan.patch_output_size))
            mon_vox = int(np.prod(mon["roi"]))
            m_pps, o_pps = med["steps_per_s"] * batch, mon["steps_per_s"] * mon["batch"]
            rows.append(
                (name, m_pps, o_pps, m_pps * out_vox / (o_pps * mon_vox), med["wait"], mon["wait"])
            )
            print(
                f"{name}: medseg {m_pps:.2f} patches/s (output {plan.patch_output_size}, "
                f"data wait {med['wait']:.1%}); MONAI {o_pps:.2f} patches/s (roi {mon['roi']}, "
                f"data wait {mon['wait']:.1%})"
            )
    print()
    print(f"CPU, {os.cpu_count()} cores, {args.threads} threads, {args.workers} worker(s)")
    print("| data | medseg patches/s | MONAI patches/s | patch ratio | labelled-voxel ratio | "
          "medseg data wait | MONAI data wait |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, a, b, v, wa, wb in rows:
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {v:.2f}x | {wa:.1%} | {wb:.1%} |")


if __name__ == "__main__":
    main()
