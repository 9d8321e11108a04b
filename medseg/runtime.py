"""Device, precision and memory budget: asked by training and inference alike.

torch is imported here because devices are torch's; nothing here changes process-wide state.
"""

from __future__ import annotations

import re

import torch

from medseg.errors import ModelError

#: Fraction of the available memory used when no budget is given.
DEFAULT_MEMORY_FRACTION = 0.5


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"cpu"``, ``"cuda"`` (``cuda:N``) or ``"auto"`` (CUDA when available)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {name}: CUDA is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ModelError(f"--device {name}: unknown device; use cpu, cuda or auto") from exc


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16 (Ampere and later), or a
    CPU whose oneDNN has AMX tiles or AVX512-BF16. Elsewhere bf16 is emulated and slower than
    float32."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, probe, None)
        if check is not None and check():
            return True
    return False


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (as oneDNN, through torch, sees them)."""
    check = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    return bool(check is not None and check())


def kept_heap_pays(device: torch.device) -> bool:
    """Whether keeping freed activations in the process heap
    (:func:`medseg.heap.kept_freed_memory`) makes tiled inference on ``device`` faster: on a
    CPU with AMX tiles, the property that separated the machines it was measured on
    (``benchmarks/bench_inference.py --flops-only``, default 3D network, 192x192x160, one
    196x196x164 tile, fraction of the conv3d peak). On the AMX Xeon it was tuned on the kept
    heap was faster (:data:`medseg.heap.KEEP_SPEEDUP`). On a 2-core AMD EPYC without AMX the
    first pass, what one case of that size costs, reached 0.37 kept against 0.56 given back
    (13.0 s against 8.6 s), while a warm further pass reached 0.80 kept against 0.71; an
    earlier run there measured 0.62 kept against 0.71. CUDA memory is torch's caching
    allocator's, not glibc's heap: never there."""
    return device.type == "cpu" and has_amx()


#: ``--precision``: "auto" (reduced precision on CUDA, float32 on the CPU), "float32" or "bf16".
PRECISIONS = ("auto", "float32", "bf16")


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse an unknown ``precision``, and "bf16" on a device without native bf16.

    "bf16" runs the network's convolutions under bf16 autocast (on the CPU too); stitching,
    TTA averaging and softmax stay float32. "auto" is float16/bf16 autocast on CUDA and float32
    on the CPU, where only "float32" keeps the tiled result equal to a whole-volume forward
    pass to float32 rounding."""
    if precision not in PRECISIONS:
        raise ModelError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not native_bf16(device):
        what = "GPU" if device.type == "cuda" else "CPU (no AMX or AVX512-BF16)"
        raise ModelError(
            f"--precision bf16: this {what} has no native bf16 and would run slower; "
            "use --precision float32"
        )


def default_memory_budget() -> int:
    """Bytes this process may use for tiles and outputs: half of the available memory."""
    import psutil

    return int(psutil.virtual_memory().available * DEFAULT_MEMORY_FRACTION)


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"4G"``, ``"512M"``, ``"1.5g"``, ``"2000000"`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)i?[bB]?\s*", text)
    if not m:
        raise ModelError(f"--max-memory {text!r}: expected a size such as 4G, 512M or 2000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def bf16_autocast(device: torch.device) -> bool:
    """Whether bf16 autocast makes training faster on ``device``: where it has native bf16
    (:func:`native_bf16`: a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16). Elsewhere bf16
    is emulated and slower, and training stays float32. The weights, the optimiser and the
    loss stay float32 (mixed precision, as nnU-Net trains on GPUs).

    Measured, not assumed, on a CPU with AVX512-BF16 and no AMX (``benchmarks/bench_precision.py``;
    2-core AMD EPYC, torch 2.13, 2 threads, one training step of each shipped network, median
    of repeats with the precisions alternating, machine shared with other jobs): bf16 over
    float32 step time DRIVE 2D 0.55-0.91x (0.28 vs 0.51 s on the quietest run), ISBI 2012 2D
    0.81-0.87x (0.88 vs 1.02 s), BraTS 2013 3D 0.73-0.75x (0.89 vs 1.22 s).
    bf16 is faster for every shipped network there, so such CPUs keep it."""
    return native_bf16(device)
