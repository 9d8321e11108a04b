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
   measured on this machine (both memory formats, 16-64 channels);
5. on a CPU with native bf16 (AMX, AVX512-BF16), ``predict_logits`` under ``--precision
   bf16`` against its float32 time and MONAI's (float32, as its recipe runs);
7. nnU-Net v2 (Isensee et al. 2021, Nature Methods) where ``--nnunet-python`` has
   ``nnunetv2``: its ``nnUNetPredictor`` (tile step 0.5, gaussian, no mirroring) with the
   PlainConvUNet its planner builds for the volume, cut to the same 5 stages and widths, in
   2 and 3; run by ``benchmarks/nnunet_baseline.py`` in a fresh process of that Python.

Run: ``python benchmarks/bench_inference.py`` (speed, ~3 min on 2 cores) and
``python benchmarks/bench_inference.py --rss-only`` (memory, full size);
``--cli-only``: the ``medseg infer`` command against the library path it wraps;
``--onnx-only``: 6. the same ``predict_logits`` (same tiles) with the network run by
onnxruntime (``medseg export`` graph, ``--engine onnxruntime``) against torch, on the CPU;
``--nnunet-only``: 7. medseg and nnU-Net's predictor alternating, best of ``--nnunet-repeats``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunet_baseline import SCRIPT as NNUNET
from nnunet_baseline import SKIP_MESSAGE, available
from torch import nn

from medseg import heap, runtime
from medseg.inference import case, cohort, model_folder, tiled
from medseg.model import UNet, shapes


def run_nnunet(python: str, *args: str) -> dict[str, Any]:
    """``nnunet_baseline.py ARGS`` in a fresh ``python`` process; its last line as JSON."""
    run = subprocess.run([python, str(NNUNET), *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"nnU-Net baseline failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


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
    """Multiply-adds x 2 of every convolution run while active (forward hooks); with
    ``timed`` also the wall time of each convolution (pre/post hooks), per module name."""

    def __init__(self, model: nn.Module, timed: bool = False) -> None:
        self.flops = 0
        self.per: dict[str, list[float]] = {}  # name -> [flops, seconds]
        self._t0 = 0.0
        self.hooks = []
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                self.hooks.append(m.register_forward_hook(self._hook(name)))
                if timed:
                    self.hooks.append(m.register_forward_pre_hook(self._start))

    def _start(self, m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        self._t0 = time.perf_counter()

    def _hook(self, name: str) -> Any:
        def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            dt = time.perf_counter() - self._t0
            k = int(np.prod(m.kernel_size))  # type: ignore[arg-type]
            if isinstance(m, nn.ConvTranspose3d):
                f = 2 * inp[0].numel() * int(m.out_channels) * k
            else:
                f = 2 * out.numel() * int(m.in_channels) * k  # type: ignore[arg-type]
            self.flops += f
            rec = self.per.setdefault(name, [0.0, 0.0])
            rec[0] += f
            rec[1] += dt

        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


#: (channels, spatial side) of the layers the peak is taken over: the widths of real 3D U-Nets
#: (16-256) at sizes where their activations are tens to hundreds of MiB.
PEAK_SHAPES = ((16, 64), (32, 48), (64, 40), (128, 28), (256, 20))


def conv_peak(threads: int) -> tuple[float, dict[str, float]]:
    """Best conv3d (3x3x3, C -> C, batch 2) GFLOP/s over ``PEAK_SHAPES`` in both memory
    formats; also every measurement, for the report."""
    best, seen = 0.0, {}
    for c, s in PEAK_SHAPES:
        conv = nn.Conv3d(c, c, 3).eval()
        for cl in (False, True):
            x = torch.randn(2, c, s, s, s)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last_3d)
                conv = conv.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
            with torch.inference_mode():
                dt = _time(lambda conv=conv, x=x: conv(x), repeats=3, warmup=True)
            flops = 2 * 2 * c * c * 27 * (s - 2) ** 3
            seen[f"{c}ch {s}^3 {'cl' if cl else 'ncdhw'}"] = flops / dt / 1e9
            best = max(best, flops / dt / 1e9)
    return best, seen


def flops_report(a: argparse.Namespace) -> None:
    """Achieved conv GFLOP/s of the tiled pass of the network the planner builds for 3D
    (``_DEFAULT_BASE[3]`` base channels, depth ``_MAX_DEPTH[3]``) over channels-last vs
    contiguous, batch 1 vs 2, a few tile sizes and the two heap modes (:mod:`medseg.heap`),
    as a fraction of ``conv_peak``.

    Each layout is timed twice: its first ``run_tiles`` call in the process (what one case of
    that size costs: with the heap kept, its first pass still faults its pages in), and warm,
    a further call inside the same kept heap (what each further tile or mirrored TTA pass of
    a case costs, as its heap is warm by then, and how ``conv_peak`` itself is timed: after a
    warm-up). ``medseg infer`` gives the heap back between the cases of a cohort, so each
    case's first pass runs cold."""
    from medseg.preprocess.plan import _DEFAULT_BASE, _MAX_DEPTH

    base, depth = _DEFAULT_BASE[3], _MAX_DEPTH[3]
    size = tuple(a.size)
    image = np.random.default_rng(0).normal(size=(1, *size)).astype(np.float32)
    net = _net(base, depth, 2)
    peak, seen = conv_peak(a.threads)
    print(f"conv3d peak {peak:.1f} GFLOP/s; " + ", ".join(f"{k} {v:.0f}" for k, v in seen.items()))
    auto = tiled.tile_layout(tiled.inference_model(net), size)
    # (channels-last, forced tile or None for the automatic one, batch size, keep the heap)
    configs: list[tuple[bool, int | None, int | None, bool]] = [
        (True, None, None, True),
        (True, None, None, False),
        (False, None, None, True),
    ]
    configs += [(True, t, b, True) for t in a.flops_tiles for b in (1, 2)]
    best = {"first": (0.0, ""), "warm": (0.0, "")}
    for cl, tile, batch, keep in configs:
        fast = tiled.inference_model(net, channels_last=cl)
        with torch.inference_mode():  # oneDNN kernel selection on a small input
            fast(torch.zeros(1, 1, *(shapes.input_size(shapes.min_output_size(depth), depth),) * 3))
        layout = tiled.tile_layout(
            fast,
            size,
            tile_size=tile,
            batch_size=batch if tile is not None else None,
            keep_heap=keep,
        )

        def run(fast: nn.Module = fast, layout: tiled.TileLayout = layout) -> None:
            tiled.run_tiles(fast, image, layout, lambda t, o: None, prepare=False)

        counter = FlopCounter(fast)
        first = _time(run)
        counter.remove()
        with heap.kept_freed_memory(layout.keep_heap):
            run()
            warm = _time(run)
        label = (
            f"{'channels-last' if cl else 'contiguous'} tile {layout.size} x"
            f"{len(layout.tiles)} batch {layout.batch_size}, heap "
            f"{'kept' if layout.keep_heap else 'not kept'}{', lean' if layout.lean else ''}"
        )
        row = []
        for name, dt in (("first", first), ("warm", warm)):
            gf = counter.flops / dt / 1e9
            row.append(f"{name} {dt:.2f} s, {gf:.1f} GFLOP/s, fraction {gf / peak:.3f}")
            if gf > best[name][0]:
                best[name] = (gf, label)
        print(f"  {label}: " + "; ".join(row), flush=True)
    for name, (gf, label) in best.items():
        print(
            f"conv GFLOP/s, default 3D network (depth {depth}, base {base}), {size}, {name} "
            f"pass: best {gf:.1f} ({label}); peak {peak:.1f}; fraction {gf / peak:.3f} "
            "(goal >= 0.6)"
        )
    # per convolution, in the best layout at the auto tile: where the time goes
    fast = tiled.inference_model(net, channels_last=True)
    counter = FlopCounter(fast, timed=True)
    tiled.run_tiles(fast, image, auto, lambda t, o: None, prepare=False)
    counter.remove()
    total = sum(t for _, t in counter.per.values())
    for name, (f, t) in counter.per.items():
        print(
            f"    {name:28s} {f / 1e9:7.1f} GFLOP {t:6.2f} s ({100 * t / total:4.1f} %) "
            f"{f / t / 1e9:6.1f} GFLOP/s = {f / t / 1e9 / peak:.2f} of peak"
        )


#: Synthetic CT geometry: LPS voxel axes (as DICOM converters write CT), 0.7 x 0.7 x 1.0 mm.
CT_SPACING = (0.7, 0.7, 1.0)
#: The CT normalisation of the plan (nnU-Net style: clip to foreground percentiles, z-score).
CT_CLIP = (-1000.0, 1500.0)
CT_MEAN_STD = (40.0, 350.0)


def write_ct(path: str, shape: tuple[int, int, int]) -> None:
    """A CT-like int16 NIfTI: -1024 outside the reconstruction circle (the corners), noisy air
    (-1000 +- 15 HU) inside it, an elliptic body (40 +- 30 HU) with fat rim and bone. The crop
    to the non-background box therefore keeps almost the whole field of view, as on real CT."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    ni, nj, nk = shape
    x = (np.arange(ni)[:, None] - (ni - 1) / 2) / (ni / 2)
    y = (np.arange(nj)[None, :] - (nj - 1) / 2) / (nj / 2)
    circle = x**2 + y**2 < 1.0
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1.0
    rim = body & ((x / 0.75) ** 2 + (y / 0.55) ** 2 >= 1.0)
    bone = (x / 0.12) ** 2 + ((y + 0.35) / 0.1) ** 2 < 1.0
    data = np.empty(shape, np.int16, order="F")  # NIfTI's own voxel order: no copy on save
    for k in range(nk):
        sl = np.where(circle, -1000 + 15 * rng.standard_normal((ni, nj)), -1024.0)
        sl = np.where(body, 40 + 30 * rng.standard_normal((ni, nj)), sl)
        sl[rim] = -100.0
        sl[bone] = 700.0 + 100.0 * np.sin(k / 7.0)
        data[:, :, k] = sl.astype(np.int16)
    affine = np.diag([-CT_SPACING[0], -CT_SPACING[1], CT_SPACING[2], 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(np.int16)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, path)


def write_model_folder(folder: str, base: int, classes: int) -> None:
    """A model folder as ``medseg train`` leaves it (plan.json + model.pt state_dict), holding a
    randomly initialised U-Net (depth 4, so that MONAI's BasicUNet has the same widths) and a
    plan with CT normalisation, RAS orientation, crop to non-zero and the scan's own spacing
    (after reorientation: no resampling)."""

    from medseg.preprocess.plan import ChannelPlan, Plan

    net = _net(base, 4, classes)
    plan = Plan(
        spatial_dims=3,
        channels=[ChannelPlan("CT", "CT", "ct", CT_CLIP, *CT_MEAN_STD)],
        label_values=list(range(classes)),
        class_names=[f"class{c}" for c in range(classes)],
        network=dict(net.network),
        patch_output_size=(shapes.min_output_size(4),) * 3,
        tile_output_size=(shapes.min_output_size(4),) * 3,
        margin=(net.margin,) * 3,
        orientation=("R", "A", "S"),
        target_spacing=CT_SPACING,
        crop_to_nonzero=True,
    )
    Path(folder).mkdir(parents=True, exist_ok=True)
    plan.save(Path(folder) / "plan.json")
    torch.save(net.state_dict(), Path(folder) / "model.pt")


def _peak_mib() -> float:
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak over exec
    with open("/proc/self/status") as fh:
        status = fh.read()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM"))) / 1024


def rss_child(tool: str, work: str, classes: int, base: int, budget: str) -> None:
    """What each tool's user runs on ``work/ct.nii.gz``; prints peak RSS (MiB) as JSON.

    medseg: ``load_model`` + ``read_volume`` + ``predict_case`` + ``write_prediction`` (the
    ``medseg infer`` path). MONAI: ``LoadImage`` (float32), ``ScaleIntensityRange`` (the CT
    window of the plan), ``sliding_window_inference`` (roi 96^3, overlap 0.5, gaussian),
    argmax in slabs (no int64 volume), nibabel save of uint8 labels.
    """

    mem, threads = budget.split(":")
    torch.set_num_threads(int(threads))
    root = Path(work)
    t = time.perf_counter()
    stages: dict[str, float] = {"import": _peak_mib()}
    if tool == "medseg":
        from medseg.io import read_volume

        loaded = model_folder.load_model(root / "model")
        vol = read_volume(root / "ct.nii.gz")
        stages["read"] = _peak_mib()
        # the allocator as the command sets it (medseg.inference.cohort.load_for_infer)
        heap.return_freed_memory()
        pred = case.predict_case(
            [vol],
            loaded,
            max_memory=runtime.parse_bytes(mem),
            keep_heap=runtime.kept_heap_pays(torch.device("cpu")),
            tile_scope=lambda layout: heap.kept_freed_memory(layout.keep_heap),
        )
        stages["predict"] = _peak_mib()
        cohort.write_prediction(pred, root / "medseg_labels.nii.gz")
        extra = {k: pred.info[k] for k in ("tiles", "tile_size", "batch_size")}
    else:
        import nibabel as nib
        from monai.inferers import sliding_window_inference
        from monai.transforms import LoadImage, ScaleIntensityRange

        net_m = _monai(base, classes)
        img = LoadImage(image_only=True, dtype=np.float32)(str(root / "ct.nii.gz"))
        lo, hi = CT_CLIP
        x = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(img)
        stages["read"] = _peak_mib()
        shape = tuple(x.shape)
        with torch.inference_mode():
            out = sliding_window_inference(
                torch.as_tensor(x)[None, None], (96, 96, 96), 1, net_m, overlap=0.5, mode="gaussian"
            )
            assert isinstance(out, torch.Tensor)
            labels = np.empty(shape, np.uint8)
            for k in range(0, shape[2], 16):  # slabs: no full-volume int64 argmax
                labels[..., k : k + 16] = out[0, ..., k : k + 16].argmax(0).numpy()
        stages["predict"] = _peak_mib()
        del out
        nib.save(nib.Nifti1Image(labels, img.affine.numpy()), str(root / "monai_labels.nii.gz"))
        extra = {}
    stages["write"] = _peak_mib()
    print(
        json.dumps(
            {"peak_mib": _peak_mib(), "seconds": time.perf_counter() - t, "stages": stages, **extra}
        )
    )


def rss(a: argparse.Namespace) -> None:
    """Peak memory of each tool on a 512x512x300 int16 CT NIfTI, 5 classes, fresh processes.

    ``.nii.gz``: how CT is shipped (MSD, TotalSegmentator, ...); all tools decompress it
    through nibabel or SimpleITK, so none gets file-backed pages for free. nnU-Net runs its
    default 3d_fullres plan for this CT (``nnunet_baseline.py rss``).
    """
    import tempfile

    shape = tuple(int(round(s * a.rss_scale)) for s in (512, 512, 300))
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="medseg-bench-") as work:
        write_ct(f"{work}/ct.nii.gz", shape)  # type: ignore[arg-type]
        write_model_folder(f"{work}/model", a.rss_base, 5)
        for tool in ("medseg", "monai", "nnunet"):
            if a.rss_tools and tool not in a.rss_tools:
                continue
            if tool == "nnunet":
                if not available(a.nnunet_python):
                    print(f"nnunet {SKIP_MESSAGE}")
                    continue
                res[tool] = run_nnunet(
                    a.nnunet_python,
                    "rss",
                    "--work",
                    work,
                    "--base",
                    str(a.rss_base),
                    "--threads",
                    str(a.threads),
                )
            else:
                cmd = [sys.executable, __file__, "--child", tool, work, "5", str(a.rss_base),
                       f"{a.rss_budget}:{a.threads}"]  # fmt: skip
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                res[tool] = json.loads(out.strip().splitlines()[-1])
            print(tool, json.dumps(res[tool]))
    med = res.get("medseg")
    for tool, what in (("monai", "MONAI"), ("nnunet", "nnU-Net")):
        if med is None or tool not in res:
            continue
        other = res[tool]
        print(
            f"peak RSS, int16 CT {list(shape)} .nii.gz, 5 classes, base {a.rss_base}, "
            f"{a.threads} threads: medseg {med['peak_mib']:.0f} MiB ({med['seconds']:.1f} s, "
            f"--max-memory {a.rss_budget}, {med['tiles']} tiles of {med['tile_size']}, batch "
            f"{med['batch_size']}), {what} {other['peak_mib']:.0f} MiB ({other['seconds']:.1f} s"
            f"{', patch ' + str(other['patch_size']) if 'patch_size' in other else ''}); ratio "
            f"medseg/{what} {med['peak_mib'] / other['peak_mib']:.3f}"
            f"{' (goal <= 0.25)' if tool == 'monai' else ''}; time ratio "
            f"{what}/medseg {other['seconds'] / med['seconds']:.2f}"
        )


def cli_vs_library(a: argparse.Namespace) -> None:
    """Wall time of ``medseg infer`` (the command, with the allocator settings it chooses)
    against the library path it wraps (``load_model`` + ``read_volume`` + ``predict_case`` +
    ``write_prediction``, the ``--child medseg`` process) on the same CT NIfTI and model,
    each a fresh process, alternating, best of ``a.cli_repeats``: a ratio near 1 shows the
    command keeps the library's speed (imports and startup included on both sides)."""
    import tempfile

    shape = tuple(int(round(s * a.rss_scale)) for s in (512, 512, 300))
    best = {"cli": float("inf"), "library": float("inf")}
    with tempfile.TemporaryDirectory(prefix="medseg-bench-") as work:
        write_ct(f"{work}/ct.nii.gz", shape)  # type: ignore[arg-type]
        write_model_folder(f"{work}/model", a.rss_base, 5)
        for r in range(a.cli_repeats):
            cli = [sys.executable, "-m", "medseg.cli", "infer", "--volume", f"{work}/ct.nii.gz",
                   "--model", f"{work}/model", "--output", f"{work}/cli_{r}.nii.gz",
                   "--device", "cpu", "--max-memory", a.rss_budget]  # fmt: skip
            lib = [sys.executable, __file__, "--child", "medseg", work, "5", str(a.rss_base),
                   f"{a.rss_budget}:{a.threads}"]  # fmt: skip
            for name, cmd in (("cli", cli), ("library", lib)):
                t = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                best[name] = min(best[name], time.perf_counter() - t)
    print(
        f"medseg infer command vs library path, int16 CT {list(shape)} .nii.gz, 5 classes, "
        f"base {a.rss_base}, --max-memory {a.rss_budget}, kept heap "
        f"{runtime.kept_heap_pays(torch.device('cpu'))}: command {best['cli']:.1f} s, library "
        f"{best['library']:.1f} s; ratio command/library {best['cli'] / best['library']:.3f}"
    )


def onnx_vs_torch(a: argparse.Namespace) -> None:
    """Seconds of ``predict_logits`` over the benchmark volume with the torch network
    (prepared: batch norm folded, channels-last) and with its ONNX export run by onnxruntime
    (same threads), at the same tiles (torch's automatic layout); alternating, best of
    ``a.onnx_repeats``; and the largest logit difference as a fraction of the logits' range."""
    import tempfile

    from medseg.inference.engine import OnnxRuntimeNetwork
    from medseg.model.export import export_onnx

    size = tuple(a.size)
    image = np.random.default_rng(0).normal(size=(1, *size)).astype(np.float32)
    net = _net(a.base, 4, 2)
    tile = tiled.tile_layout(tiled.inference_model(net), size).size
    with tempfile.TemporaryDirectory(prefix="medseg-bench-") as work:
        export_onnx(net, f"{work}/m.onnx")
        ort_net = OnnxRuntimeNetwork(f"{work}/m.onnx", net.network, threads=a.threads)
        runs = {
            "torch": lambda: tiled.predict_logits(net, image, tile_size=tile, prepare=True),
            "onnxruntime": lambda: tiled.predict_logits(ort_net, image, tile_size=tile),
        }
        best = {k: float("inf") for k in runs}
        out: dict[str, np.ndarray] = {}
        for _ in range(a.onnx_repeats):
            for name, run in runs.items():
                t = time.perf_counter()
                out[name] = run()
                best[name] = min(best[name], time.perf_counter() - t)
    ref = out["torch"]
    diff = float(np.max(np.abs(out["onnxruntime"] - ref)) / (ref.max() - ref.min()))
    print(
        f"onnxruntime vs torch, predict_logits {list(size)}, UNet depth 4 base {a.base}, tile "
        f"{tile}, {a.threads} threads: torch {best['torch']:.2f} s, onnxruntime "
        f"{best['onnxruntime']:.2f} s; ratio onnxruntime/torch time "
        f"{best['onnxruntime'] / best['torch']:.3f}; max logit difference {diff:.1e} of the range"
    )


def monai_speed(a: argparse.Namespace) -> float:
    """Seconds of one MONAI ``sliding_window_inference`` (roi 96^3, overlap 0.5, gaussian)
    over the benchmark volume with ``BasicUNet`` of base ``a.base``."""
    from monai.inferers import sliding_window_inference

    size = tuple(a.size)
    image = np.random.default_rng(0).normal(size=(1, *size)).astype(np.float32)
    mnet = _monai(a.base, 2)
    x = torch.from_numpy(image)[None]

    def run_monai() -> None:
        with torch.inference_mode():
            sliding_window_inference(x, (96, 96, 96), 1, mnet, overlap=0.5, mode="gaussian")

    return _time(run_monai)


def nnunet_speed(
    a: argparse.Namespace, vox: int, medseg_pass: Any, t_medseg: float, repeats: int = 1
) -> None:
    """nnU-Net's predictor on the same volume in a fresh process of ``--nnunet-python``: its
    planned 3d_fullres patch, the PlainConvUNet cut to 5 stages (4 poolings, as medseg and
    BasicUNet here) with widths ``base * 2**i``, tile step 0.5, gaussian, no mirroring.
    ``repeats`` > 1 alternates it with ``medseg_pass`` (one cold ``predict_logits`` call) and
    keeps the best of each, so that a changing load on a shared machine hits both alike."""
    import tempfile

    if not available(a.nnunet_python):
        print(f"nnU-Net predictor            {SKIP_MESSAGE}")
        return
    best = {"medseg": t_medseg, "nnunet": float("inf")}
    for _ in range(repeats):
        if repeats > 1:
            best["medseg"] = min(best["medseg"], _time(medseg_pass))
        with tempfile.TemporaryDirectory(prefix="medseg-bench-") as work:
            r = run_nnunet(a.nnunet_python, "speed", "--work", work, "--base", str(a.base),
                           "--threads", str(a.threads), "--size", *map(str, a.size))  # fmt: skip
        best["nnunet"] = min(best["nnunet"], float(r["seconds"]))
    t, t_medseg = best["nnunet"], best["medseg"]
    print(
        f"nnU-Net predictor           {t:8.2f} s  ({vox / t / 1e6:.3f} Mvox/s, patch "
        f"{r['patch_size']}, {r['stages']} stages); medseg {t_medseg:.2f} s "
        f"({vox / t_medseg / 1e6:.3f} Mvox/s); ratio medseg/nnU-Net {t / t_medseg:.3f}"
        f"{f', best of {repeats} alternating' if repeats > 1 else ''}"
    )


def nnunet_only(a: argparse.Namespace) -> None:
    """medseg ``predict_logits`` (one call each, in this process) and nnU-Net (a fresh process
    each) alternating, best of each."""
    net = _net(a.base, 4, 2)
    image = np.random.default_rng(0).normal(size=(1, *a.size)).astype(np.float32)
    nnunet_speed(
        a,
        int(np.prod(a.size)),
        lambda: tiled.predict_logits(net, image, prepare=True),
        float("inf"),
        a.nnunet_repeats,
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
    ap.add_argument("--flops-only", action="store_true", help="only the GFLOP/s comparison")
    ap.add_argument("--cli-only", action="store_true", help="only medseg infer vs the library")
    ap.add_argument("--cli-repeats", type=int, default=2)
    ap.add_argument("--onnx-only", action="store_true", help="only onnxruntime vs torch")
    ap.add_argument("--onnx-repeats", type=int, default=2)
    ap.add_argument("--flops-tiles", type=int, nargs="*", default=[92])
    ap.add_argument("--rss-tools", nargs="*", help="only these tools (medseg, monai, nnunet)")
    ap.add_argument("--nnunet-only", action="store_true", help="only medseg vs nnU-Net speed")
    ap.add_argument("--nnunet-repeats", type=int, default=3, help="alternations, --nnunet-only")
    ap.add_argument(
        "--nnunet-python",
        default=sys.executable,
        help="a Python with nnunetv2 installed (the optional nnU-Net v2 baseline)",
    )
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--monai-speed-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        tool, work, classes, base, budget = a.child
        rss_child(tool, work, int(classes), int(base), budget)
        return
    torch.set_num_threads(a.threads)
    if a.rss_only:
        rss(a)
        return
    if a.flops_only:
        flops_report(a)
        return
    if a.cli_only:
        cli_vs_library(a)
        return
    if a.onnx_only:
        onnx_vs_torch(a)
        return
    if a.nnunet_only:
        nnunet_only(a)
        return
    if a.monai_speed_child:
        print(json.dumps({"seconds": monai_speed(a)}))
        return

    size = tuple(a.size)
    image = np.random.default_rng(0).normal(size=(1, *size)).astype(np.float32)
    net = _net(a.base, 4, 2)
    vox = int(np.prod(size))
    print(
        f"volume {size}, UNet depth 4 base {a.base}, {a.threads} threads, torch {torch.__version__}"
    )
    fast = tiled.inference_model(net)  # what predict_logits runs: BN folded, channels-last
    with torch.inference_mode():  # warm-up on a small input: oneDNN kernel selection
        fast(torch.zeros(1, 1, *(shapes.input_size(4, 4),) * 3))
    auto = tiled.tile_layout(net, size)
    out = np.empty((2, *size), np.float32)

    def sink(tile: Any, logits: np.ndarray) -> None:
        out[(slice(None), *tile.write.slices())] = logits

    # both on the same warm, kept heap (medseg.heap): the ratio is what tiling costs
    with heap.kept_freed_memory():
        t_whole = _time(lambda: whole_volume(fast, image), repeats=2)
        t_auto = _time(lambda: tiled.run_tiles(fast, image, auto, sink, prepare=False), repeats=2)
    counter = FlopCounter(fast)  # one uncounted-time pass: FLOPs of one tiled inference
    with torch.inference_mode():
        tiled.run_tiles(fast, image, auto, lambda t, o: None, prepare=False)
    counter.remove()
    t_api = _time(lambda: tiled.predict_logits(net, image, prepare=True))  # one call, cold
    # the path before inference preparation: contiguous layout, batch norm not folded
    t_plain = _time(
        lambda: tiled.run_tiles(net, image, auto, sink, prepare=False, channels_last=False)
    )
    gib = 4 << 30
    forced = tiled.tile_layout(net, size, max_memory=gib)
    t_forced = _time(lambda: tiled.predict_logits(net, image, max_memory=gib, prepare=True))
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

    # a fresh process, as MONAI's user runs it: medseg's heap settings must not carry over
    cmd = [sys.executable, __file__, "--monai-speed-child", "--base", str(a.base)]
    cmd += ["--threads", str(a.threads), "--size", *map(str, size)]
    run = subprocess.run(cmd, check=True, capture_output=True, text=True)
    t_monai = float(json.loads(run.stdout.strip().splitlines()[-1])["seconds"])
    print(
        f"MONAI sliding window        {t_monai:8.2f} s  ({vox / t_monai / 1e6:.3f} Mvox/s); "
        f"medseg {vox / t_api / 1e6:.3f} Mvox/s; ratio medseg/MONAI {t_monai / t_api:.3f} "
        "(goal >= 1.5)"
    )

    nnunet_speed(a, vox, lambda: tiled.predict_logits(net, image, prepare=True), t_api)

    if runtime.native_bf16(torch.device("cpu")):  # opt-in: medseg infer --precision bf16
        t_bf16 = _time(lambda: tiled.predict_logits(net, image, prepare=True, precision="bf16"))
        print(
            f"predict_logits, bf16        {t_bf16:8.2f} s  speed-up over float32 "
            f"{t_api / t_bf16:.2f}x; ratio medseg bf16 / MONAI float32 {t_monai / t_bf16:.3f}"
        )

    achieved = counter.flops / t_auto / 1e9
    peak, _ = conv_peak(a.threads)
    print(
        f"conv GFLOP/s: tiled {achieved:.1f} ({counter.flops / 1e9:.0f} GFLOP, "
        f"{counter.flops / vox / 1e3:.1f} kFLOP per output voxel); measured conv3d peak "
        f"{peak:.1f}; fraction {achieved / peak:.3f} (this base-{a.base} network; the goal >= 0.6 "
        "is measured by --flops-only on the planner's default 3D network)"
    )


if __name__ == "__main__":
    main()
