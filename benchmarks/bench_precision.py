"""Training step time of each shipped pipeline's network, float32 vs bf16 autocast, on this CPU.

For every ``pipelines/*.toml``: the ``[plan] network`` with the data set's channel and class
counts, one batch of the pipeline's ``batch_size`` input patches (``patch_output_size`` grown by
the margin), channels-last as training runs on the CPU, and one training step as the loop takes
it (AdamW/SGD, cross-entropy, gradient clipping). Prints seconds per step (median of
``--repeats`` runs of ``--steps`` steps after ``--warmup`` steps, the two precisions
alternating) in float32 and in bf16 autocast, and the CPU model with its bf16/AMX flags, as a
Markdown table.

Network only: the patch sampling and augmentation run in a DataLoader worker beside it during
training, and validation adds its own minutes; use the figure to compare precisions and to size
a recipe's step count, with margin.

    .venv/bin/python benchmarks/bench_precision.py [--steps 30] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medseg.config import load_pipeline  # noqa: E402
from medseg.model import UNet, shapes  # noqa: E402
from medseg.model.unet import channels_last_format  # noqa: E402
from medseg.runinfo import cpu_info  # noqa: E402

#: channels and classes of each shipped data set (the manifests': RGB, FLAIR+T1c, EM)
DATASETS = {"drive": (3, 2), "isbi2012": (1, 2), "brats2013": (2, 5)}


def _step_seconds(pipeline: Path, steps: int, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per training step of ``pipeline``'s network in float32 and bf16
    autocast: wall clock (``f32``, ``bf16``) and this process's CPU time divided by the
    threads (``f32_cpu``, ``bf16_cpu``).

    The two precisions alternate within each repeat, so a change in the machine's load
    between repeats moves both alike. On a machine shared with other jobs the wall clock
    grows with their load; the CPU time per thread stays near the wall clock of an idle
    machine (an estimate: threads that wait also spin)."""
    pipe = load_pipeline(pipeline)
    in_ch, out_ch = DATASETS[pipe.name]
    kw = dict(pipe.plan["network"])
    dims = int(pipe.plan.get("spatial_dims", 2))
    net = UNet(spatial_dims=dims, in_channels=in_ch, out_channels=out_ch, **kw)
    fmt = channels_last_format(dims)
    net.to(memory_format=fmt)  # type: ignore[call-overload]
    net.train()
    batch = int(pipe.train.get("batch_size", 2))
    size = [shapes.input_size(int(s), net.depth) for s in pipe.plan["patch_output_size"]]
    out_size = [int(s) for s in pipe.plan["patch_output_size"]]
    x = torch.randn(batch, in_ch, *size).contiguous(memory_format=fmt)
    y = torch.randint(0, out_ch, (batch, *out_size))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(bf16: bool) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()

    times: dict[str, list[float]] = {"f32": [], "bf16": [], "f32_cpu": [], "bf16_cpu": []}
    threads = torch.get_num_threads()
    for bf16 in (False, True):
        for _ in range(warmup):
            step(bf16)
    for _ in range(repeats):
        for bf16, key in ((False, "f32"), (True, "bf16")):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step(bf16)
            times[key].append((time.perf_counter() - t0) / steps)
            times[f"{key}_cpu"].append((time.process_time() - c0) / steps / threads)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pipelines", nargs="*", default=sorted(DATASETS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = cpu_info()
    print(f"CPU: {info['model']}; flags: {', '.join(info['flags']) or 'no bf16/AMX'}; "
          f"torch {torch.__version__}, {args.threads} threads")  # fmt: skip
    print(
        "| pipeline | network | s/step float32 | s/step bf16 | bf16 / float32 | "
        "CPU-s/step/thread float32 | CPU-s/step/thread bf16 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.pipelines:
        toml = REPO / "pipelines" / f"{name}.toml"
        net = load_pipeline(toml).plan["network"]
        t = _step_seconds(toml, args.steps, args.warmup, args.repeats)
        desc = f"depth {net['depth']}, base {net['base_channels']}"
        print(
            f"| {name} | {desc} | {t['f32']:.3f} | {t['bf16']:.3f} | "
            f"{t['bf16'] / t['f32']:.2f}x | {t['f32_cpu']:.3f} | {t['bf16_cpu']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
