"""Inference speed and memory: medseg overlap-tile vs the whole-volume pass and vs MONAI.

Prints, for one 3D volume and one network (depth 4 so that MONAI's BasicUNet, which always
has 4 poolings, has the same depth and widths), at the sizes issue 3 names:

1. tiled / whole-volume forward time of the same (inference-prepared) network at the
   automatic tile size (default budget), and at a forced 4 GiB budget for reference;
2. output voxels per second on 192x192x160, medseg ``predict_logits`` (defaults: batch norm
   folded, channels-last) vs MONAI ``sliding_window_inference`` (roi 96^3, overlap 0.5,
   gaussian) with ``BasicUNet`` of the same widths;
3. peak resident memory (``VmHWM`` of a fresh subprocess each) of a 5-class 512x512x300 case
   (``--rss-only``; a narrow network, since the comparison is about buffers): medseg streams
   an argmax into an int8 array within ``--rss-budget``; MONAI accumulates float32 logits for
   every class plus a count map (its argmax is taken in slabs so it adds no int64 volume);
4. achieved convolution GFLOP/s of the tiled pass as a fraction of the best conv3d throughput
   measured on this machine (both memory formats, 16-64 channels).

Run: ``python benchmarks/bench_inference.py`` (speed, ~3 min on 2 cores) and
``python benchmarks/bench_inference.py --rss-only`` (memory, full size).
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


def whole_volume(net: Any, image: np.ndarray) -> np.ndarray:
    """The reference: mirror-pad once to the smallest valid size, one forward pass."""
    m = net.margin
    full = [shapes.valid_output_size(n, net.depth) for n in image.shape[1:]]
    pad = [(0, 0)] + [(m, m + f - n) for n, f in zip(image.shape[1:], full, strict=True)]
    x = torch.from_numpy(np.pad(image, pad, mode="reflect"))[None]
    if getattr(net, "channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last_3d)
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
            self.flops += 2 * inp[0].numel() * int(m.out_channels) * k
        else:
            self.flops += 2 * out.numel() * int(m.in_channels) * k  # type: ignore[arg-type]

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
        extra = {"tiles": len(layout.tiles), "tile": layout.size, "batch": layout.batch_size}
    else:
        from monai.inferers import sliding_window_inference

        net_m = _monai(base, classes)
        with torch.inference_mode():
            out = sliding_window_inference(
                torch.from_numpy(image)[None], (96, 96, 96), 1, net_m, overlap=0.5, mode="gaussian"
            )
            assert isinstance(out, torch.Tensor)
            labels = np.empty(shape, np.int8)
            for k in range(0, shape[2], 16):  # slabs: no full-volume int64 argmax
                labels[..., k : k + 16] = out[0, ..., k : k + 16].argmax(0).numpy()
        extra = {}
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak over exec
    with open("/proc/self/status") as fh:
        status = fh.read()
    peak = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM"))) / 1024
    print(json.dumps({"peak_mib": peak, "seconds": time.perf_counter() - t, **extra}))


def rss(a: argparse.Namespace) -> None:
    """Peak memory of each tool on the full-size 5-class case, one fresh process each."""
    shape = [int(round(s * a.rss_scale)) for s in (512, 512, 300)]
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
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res[tool] = json.loads(out.strip().splitlines()[-1])
    med, mon = res["medseg"], res["monai"]
    print(
        f"peak RSS, {shape} 5 classes, base {a.rss_base}, {a.threads} threads: medseg "
        f"{med['peak_mib']:.0f} MiB ({med['seconds']:.1f} s, --max-memory {a.rss_budget}, "
        f"{med['tiles']} tiles of {med['tile']}, batch {med['batch']}), MONAI "
        f"{mon['peak_mib']:.0f} MiB ({mon['seconds']:.1f} s); ratio medseg/MONAI "
        f"{med['peak_mib'] / mon['peak_mib']:.3f} (goal <= 0.25); time ratio MONAI/medseg "
        f"{mon['seconds'] / med['seconds']:.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, nargs=3, default=[192, 192, 160])
    ap.add_argument("--base", type=int, default=8, help="base channels of both networks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rss-only", action="store_true", help="run only the memory comparison")
    ap.add_argument("--rss-scale", type=float, default=1.0, help="side factor on 512x512x300")
    ap.add_argument("--rss-base", type=int, default=2)
    ap.add_argument("--rss-budget", default="1G", help="medseg --max-memory in the RSS run")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        tool, shape, classes, base, budget = a.child
        rss_child(tool, tuple(json.loads(shape)), int(classes), int(base), budget)
        return
    torch.set_num_threads(a.threads)
    if a.rss_only:
        rss(a)
        return

    size = tuple(a.size)
    image = np.random.default_rng(0).normal(size=(1, *size)).astype(np.float32)
    net = _net(a.base, 4, 2)
    vox = int(np.prod(size))
    print(
        f"volume {size}, UNet depth 4 base {a.base}, {a.threads} threads, torch {torch.__version__}"
    )
    fast = infer.inference_model(net)  # what predict_logits runs: BN folded, channels-last
    with torch.inference_mode():  # warm-up on a small input: oneDNN kernel selection
        fast(torch.zeros(1, 1, *(shapes.input_size(4, 4),) * 3))
    t_whole = _time(lambda: whole_volume(fast, image), repeats=2)
    auto = infer.tile_layout(net, size)
    out = np.empty((2, *size), np.float32)

    def sink(tile: Any, logits: np.ndarray) -> None:
        out[(slice(None), *tile.write.slices())] = logits

    t_auto = _time(lambda: infer.run_tiles(fast, image, auto, sink, prepare=False), repeats=2)
    counter = FlopCounter(fast)  # one uncounted-time pass: FLOPs of one tiled inference
    with torch.inference_mode():
        infer.run_tiles(fast, image, auto, lambda t, o: None, prepare=False)
    counter.remove()
    t_api = _time(lambda: infer.predict_logits(net, image))
    # the path before inference preparation: contiguous layout, batch norm not folded
    t_plain = _time(
        lambda: infer.run_tiles(net, image, auto, sink, prepare=False, channels_last=False)
    )
    gib = 4 << 30
    forced = infer.tile_layout(net, size, max_memory=gib)
    t_forced = _time(lambda: infer.predict_logits(net, image, max_memory=gib))
    print(f"whole-volume forward        {t_whole:8.2f} s  (same prepared network, one pass)")
    print(
        f"tiled, auto budget          {t_auto:8.2f} s  tiles {len(auto.tiles)} of {auto.size}"
        f"  ratio tiled/whole {t_auto / t_whole:.3f} (goal <= 1.15); predict_logits "
        f"{t_api:.2f} s"
    )
    print(
        f"same tiles, unprepared net  {t_plain:8.2f} s  (contiguous, batch norm unfolded); "
        f"speed-up of the preparation {t_plain / t_auto:.2f}x"
    )
    print(
        f"tiled, 4 GiB budget         {t_forced:8.2f} s  tiles {len(forced.tiles)} of "
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
        f"medseg {vox / t_api / 1e6:.3f} Mvox/s; ratio medseg/MONAI {t_monai / t_api:.3f} "
        "(goal >= 1.5)"
    )

    achieved = counter.flops / t_auto / 1e9
    peak = conv_peak(a.threads)
    print(
        f"conv GFLOP/s: tiled {achieved:.1f} ({counter.flops / 1e9:.0f} GFLOP, "
        f"{counter.flops / vox / 1e3:.1f} kFLOP per output voxel); measured conv3d peak "
        f"{peak:.1f}; fraction {achieved / peak:.3f} (goal >= 0.6)"
    )


if __name__ == "__main__":
    main()
