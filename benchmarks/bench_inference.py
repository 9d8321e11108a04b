"""Inference speed and memory: medseg overlap-tile vs the whole-volume pass and vs MONAI.

Prints, for one 3D volume and one network (depth 4 so that MONAI's BasicUNet, which always
has 4 poolings, has the same depth and widths):

1. tiled / whole-volume forward time of the same network at the automatic tile size (and at a
   forced 1 GiB budget, which cuts the volume into several tiles);
2. output voxels per second, medseg ``predict_logits`` vs MONAI ``sliding_window_inference``
   (overlap 0.5, gaussian weighting, roi 96^3) with ``BasicUNet`` of the same widths;
3. peak resident memory (``ru_maxrss`` of a fresh subprocess each) of a 5-class case of
   512x512x300 voxels (``--rss-scale`` shrinks every side; both tools get the same volume and a
   tiny network, since the comparison is about buffers, not arithmetic): medseg streams an
   argmax into an int8 array, MONAI accumulates float32 logits for every class;
4. achieved convolution GFLOP/s of the tiled pass as a fraction of the best conv3d throughput
   measured on this machine (default and channels-last memory formats).

Run: ``python benchmarks/bench_inference.py [--size 128 128 96] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg import infer
from medseg.model import UNet, shapes


def _net(base: int, depth: int, classes: int) -> UNet:
    torch.manual_seed(0)
    return UNet(3, 1, classes, depth=depth, base_channels=base, norm="batch").eval()


def _monai(base: int, classes: int) -> nn.Module:
    from monai.networks.nets import BasicUNet

    feats = (base, 2 * base, 4 * base, 8 * base, 16 * base, base)
    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=classes, features=feats).eval()


def _time(fn: Any, repeats: int = 1, warmup: bool = False) -> float:
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def whole_volume(net: UNet, image: np.ndarray) -> np.ndarray:
    """The reference: mirror-pad once to the smallest valid size, one forward pass."""
    m = net.margin
    full = [shapes.valid_output_size(n, net.depth) for n in image.shape[1:]]
    pad = [(0, 0)] + [(m, m + f - n) for n, f in zip(image.shape[1:], full, strict=True)]
    x = torch.from_numpy(np.pad(image, pad, mode="reflect"))[None]
    with torch.inference_mode():
        return net(x)[0].numpy()


class FlopCounter:
    """Multiply-adds x 2 of every convolution run while active (forward hooks)."""

    def __init__(self, model: nn.Module) -> None:
        self.flops = 0
        self.hooks = [
            m.register_forward_hook(self._hook)
            for m in model.modules()
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))
        ]

    def _hook(self, m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        k = int(np.prod(m.kernel_size))  # type: ignore[arg-type]
        if isinstance(m, nn.ConvTranspose3d):
            self.flops += 2 * inp[0].numel() * m.out_channels * k
        else:
            self.flops += 2 * out.numel() * m.in_channels * k

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def conv_peak(threads: int) -> float:
    """Best conv3d GFLOP/s over a few layer shapes and both memory formats."""
    best = 0.0
    for c, s in ((16, 64), (32, 48), (64, 40)):
        conv = nn.Conv3d(c, c, 3).eval()
        for cl in (False, True):
            x = torch.randn(2, c, s, s, s)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last_3d)
                conv = conv.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
            with torch.inference_mode():
                dt = _time(lambda conv=conv, x=x: conv(x), repeats=2, warmup=True)
            flops = 2 * 2 * c * c * 27 * (s - 2) ** 3
            best = max(best, flops / dt / 1e9)
    return best


def rss_child(tool: str, shape: tuple[int, ...], classes: int, base: int, budget: str) -> None:
    """Run one tool on a random volume and print its peak RSS (MiB) as JSON."""
    torch.set_num_threads(int(budget.split(":")[1]))
    image = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    t = time.perf_counter()
    if tool == "medseg":
        net = _net(base, 4, classes)
        mem = infer.parse_bytes(budget.split(":")[0])
        layout = infer.tile_layout(net, shape, max_memory=mem)
        labels = np.zeros(shape, np.int8)

        def sink(tile: Any, logits: np.ndarray) -> None:
            labels[tile.write.slices()] = logits.argmax(0)

        infer.run_tiles(net, image, layout, sink)
        extra = {"tiles": len(layout.tiles), "tile": layout.size}
    else:
        from monai.inferers import sliding_window_inference

        net_m = _monai(base, classes)
        with torch.inference_mode():
            out = sliding_window_inference(
                torch.from_numpy(image)[None], (96, 96, 96), 1, net_m, overlap=0.5, mode="gaussian"
            )
            labels = out[0].argmax(0).to(torch.int8).numpy()  # type: ignore[union-attr]
        extra = {}
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak over exec
    with open("/proc/self/status") as fh:
        status = fh.read()
    peak = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM"))) / 1024
    print(json.dumps({"peak_mib": peak, "seconds": time.perf_counter() - t, **extra}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, nargs=3, default=[128, 128, 96])
    ap.add_argument("--base", type=int, default=8, help="base channels of both networks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rss-scale", type=float, default=0.5, help="side factor on 512x512x300")
    ap.add_argument("--rss-base", type=int, default=2)
    ap.add_argument("--rss-budget", default="1G", help="medseg --max-memory in the RSS run")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        tool, shape, classes, base, budget = a.child
        rss_child(tool, tuple(json.loads(shape)), int(classes), int(base), budget)
        return
    torch.set_num_threads(a.threads)
    # memory first, in fresh subprocesses, before this process holds big buffers
    if not a.skip_rss:
        shape = [max(16, int(round(s * a.rss_scale))) for s in (512, 512, 300)]
        res = {}
        for tool in ("medseg", "monai"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                tool,
                json.dumps(shape),
                "5",
                str(a.rss_base),
                f"{a.rss_budget}:{a.threads}",
            ]
            res[tool] = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
        print(
            f"peak RSS, {shape} 5 classes, base {a.rss_base}: "
            f"medseg {res['medseg']['peak_mib']:.0f} MiB ({res['medseg']['seconds']:.1f} s, "
            f"budget {a.rss_budget}, "
            f"{res['medseg']['tiles']} tiles), MONAI {res['monai']['peak_mib']:.0f} MiB "
            f"({res['monai']['seconds']:.1f} s); ratio medseg/MONAI "
            f"{res['medseg']['peak_mib'] / res['monai']['peak_mib']:.3f} (goal <= 0.25)"
        )

    size = tuple(a.size)
    image = np.random.default_rng(0).normal(size=(1, *size)).astype(np.float32)
    net = _net(a.base, 4, 2)
    vox = int(np.prod(size))
    print(
        f"volume {size}, UNet depth 4 base {a.base}, {a.threads} threads, torch {torch.__version__}"
    )

    t_whole = _time(lambda: whole_volume(net, image))
    auto = infer.tile_layout(net, size)
    with torch.inference_mode():  # warm-up on a small input: oneDNN kernel selection
        net(torch.zeros(1, 1, *(shapes.input_size(4, 4),) * 3))
    counter = FlopCounter(net)
    t_auto = _time(lambda: infer.predict_logits(net, image))
    counter.remove()
    gib = 1 << 30
    forced = infer.tile_layout(net, size, max_memory=gib)
    t_forced = (
        t_auto
        if forced.size == auto.size
        else _time(lambda: infer.predict_logits(net, image, max_memory=gib))
    )
    print(f"whole-volume forward        {t_whole:8.2f} s")
    print(
        f"tiled, auto budget          {t_auto:8.2f} s  tiles {len(auto.tiles)} of {auto.size}"
        f"  ratio tiled/whole {t_auto / t_whole:.3f} (goal <= 1.15)"
    )
    print(
        f"tiled, 1 GiB budget         {t_forced:8.2f} s  tiles {len(forced.tiles)} of "
        f"{forced.size}  ratio tiled/whole {t_forced / t_whole:.3f}"
    )

    from monai.inferers import sliding_window_inference

    mnet = _monai(a.base, 2)
    x = torch.from_numpy(image)[None]

    def run_monai() -> None:
        with torch.inference_mode():
            sliding_window_inference(x, (96, 96, 96), 1, mnet, overlap=0.5, mode="gaussian")

    t_monai = _time(run_monai)
    print(
        f"MONAI sliding window        {t_monai:8.2f} s  ({vox / t_monai / 1e6:.3f} Mvox/s); "
        f"medseg {vox / t_auto / 1e6:.3f} Mvox/s; ratio medseg/MONAI {t_monai / t_auto:.3f} "
        "(goal >= 1.5)"
    )

    achieved = counter.flops / t_auto / 1e9
    net_cl = net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    lay = infer.tile_layout(net_cl, size)
    out = np.empty((2, *size), np.float32)

    def sink(tile: Any, logits: np.ndarray) -> None:
        out[(slice(None), *tile.write.slices())] = logits

    t_cl = _time(lambda: infer.run_tiles(net_cl, image, lay, sink, channels_last=True))
    peak = conv_peak(a.threads)
    best = max(achieved, counter.flops / t_cl / 1e9)
    print(
        f"conv GFLOP/s: tiled {achieved:.1f}, channels-last {counter.flops / t_cl / 1e9:.1f}; "
        f"measured conv3d peak {peak:.1f}; fraction {best / peak:.3f} (goal >= 0.6)"
    )


if __name__ == "__main__":
    main()
