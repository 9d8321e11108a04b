"""How glibc treats the large blocks that tensors and arrays free: give them back to the
system (the least resident memory) or keep them for the next allocation (the least time).

A U-Net pass allocates and frees activations of tens to hundreds of MiB per layer, the same
sizes every tile or training step. glibc serves such blocks by ``mmap`` and unmaps them when
freed, so every layer faults its pages in again and the kernel zeroes them. Measured on the
default 3D network (depth 3, base 16, 2 threads): one 196x196x164 tile took 5.5 s, 2.8 s of
it system time for 1.6 million page faults; with the blocks kept, the same pass took 3.9 s
with no faults from the second pass on (the first must fault its peak in once). Eight
100x100x84 tiles of a 192x192x160 scan took 7.7 s instead of 11.0, and a BraTS-sized 3D
training step 0.64 s instead of 0.99. The price is the heap's fragmentation
(:data:`KEEP_OVERHEAD`). Both modes are process-wide ``mallopt`` settings and no-ops where the
C library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from typing import Any

#: glibc ``mallopt`` parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
#: glibc's defaults (mallopt(3)); setting any threshold ends glibc's dynamic mmap threshold,
#: so leaving a kept heap restores its steady state for large blocks instead: the threshold
#: at its 64-bit maximum, 32 MiB, and trimming at twice that, as the dynamic rule sets it
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_STEADY_MMAP_THRESHOLD = 32 << 20
#: mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"
_NEVER_TRIM = -1

#: Growth of the resident peak over a tiled prediction with freed blocks kept, over the same
#: with them given back: measured 1.21 (lean forward, eight tiles), 1.39 (plain forward, eight
#: tiles) and 1.38 (plain, one 196x196x164 tile) on a 192x192x160 scan with the default 3D
#: network. Tile planning divides its budget by it in that mode.
KEEP_OVERHEAD = 1.4

#: Speed of tiled inference with freed blocks kept over the same tiles with them given back:
#: measured 1.43 (plain forward) and 1.53 (lean forward) on eight 100x100x84 tiles of a
#: 192x192x160 scan; on a 512x512x300 CT (base 8, depth 4, default budget) eight kept
#: 260x260x164 tiles ran 63 s against 72-75 s for four 260x260x308 given back, with 1.41x
#: the input voxels. Tile planning trades up to this many more computed voxels for a kept heap.
KEEP_SPEEDUP = 1.5

_mode = "default"


@functools.cache
def _libc() -> Any | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 (absent outside glibc)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def mode() -> str:
    """``"keep"``, ``"return"`` or ``"default"`` (glibc's own settings, or their steady state
    after a :func:`kept_freed_memory` block)."""
    return _mode


def keep_freed_memory() -> bool:
    """Serve every block from the heap and never trim it, so freed activations are reused
    without page faults (process-wide, idempotent). True where it took effect."""
    global _mode
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    _mode = "keep" if ok else _mode
    return ok


def return_freed_memory(threshold_bytes: int = 1 << 20) -> bool:
    """Have glibc serve allocations of ``threshold_bytes`` and more by ``mmap``, so that they
    go back to the system when freed, and give back what the heap holds now (process-wide,
    idempotent). True where it took effect.

    Tile activations are allocated and freed once per tile. glibc raises its mmap threshold
    after the first large block is freed (dynamic threshold, up to 32 MiB), after which such
    blocks come from the heap, which fragments and keeps the peak resident memory well above
    what is alive: measured on a 512x512x300 int16 CT, 5 classes, ``--max-memory 400M``,
    peak RSS fell from 753 MiB to the figure in the README's benchmark table.
    """
    return _give_back(int(threshold_bytes), _DEFAULT_TRIM_THRESHOLD, "return")


def _give_back(mmap_threshold: int, trim_threshold: int, new_mode: str) -> bool:
    """Large blocks by ``mmap`` again from ``mmap_threshold`` bytes, the heap trimmed from
    ``trim_threshold``, and what it holds now given back; ``new_mode`` where it took effect."""
    global _mode
    libc = _libc()
    if libc is None:
        return False
    ok = (
        bool(libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX))
        and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
        and bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
    )
    libc.malloc_trim(0)
    _mode = new_mode if ok else _mode
    return ok


@contextlib.contextmanager
def kept_freed_memory(keep: bool = True) -> Iterator[None]:
    """:func:`keep_freed_memory` inside the block (when ``keep``); afterwards the heap is
    given back and the mode before it restored, so code after a training run or a prediction
    allocates as it did before. Inside a kept heap already (a training run validating) the
    block changes nothing."""
    before = _mode
    if not keep or before == "keep":
        yield
        return
    keep_freed_memory()
    try:
        yield
    finally:
        if before == "return":
            return_freed_memory()
        else:  # glibc's defaults as they stand once large blocks have been freed (see above)
            _give_back(_STEADY_MMAP_THRESHOLD, 2 * _STEADY_MMAP_THRESHOLD, "default")
