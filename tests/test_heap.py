"""glibc heap modes: freed blocks given back (resident memory, ``VmRSS``) or kept for reuse
(page faults, ``ru_minflt``), measured by the kernel in fresh subprocesses."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from medseg import heap, tiling
from medseg.inference import tiled
from medseg.model import UNet

_RETURN_SCRIPT = """
import sys
import numpy as np
from medseg.heap import return_freed_memory

def rss_kib():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS"))

if sys.argv[1] == "set" and not return_freed_memory():
    print("skip")
    raise SystemExit
a = np.ones(16 << 20, np.uint8)  # freeing an mmapped block raises glibc's dynamic threshold
del a
base = rss_kib()
b = np.ones(8 << 20, np.uint8)  # below the raised threshold: from the heap, unless set
c = np.ones(1 << 16, np.uint8)  # a live block above it: the heap cannot shrink past it
del b
print(rss_kib() - base)
del c
"""

#: page faults of filling a 192 MiB block after freeing a 256 MiB one (smaller, as small blocks
#: allocated meanwhile may take the start of the freed space; torch tensors: numpy advises
#: huge pages for large arrays, which hides the page count)
_FAULTS_SCRIPT = """
import resource
import sys
import torch
from medseg import heap

mode = sys.argv[1]
if mode == "keep" and not heap.keep_freed_memory():
    print("skip")
    raise SystemExit

def fill(mib=256):
    return torch.empty(mib << 20, dtype=torch.uint8).fill_(1)

if mode in ("context", "default-context"):
    if mode == "context":
        heap.return_freed_memory()
    with heap.kept_freed_memory():
        del_me = fill()
        del del_me
    print(heap.mode())
del_me = fill()
del del_me
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
again = fill(192)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(script: str, mode: str) -> list[str]:
    # glibc's own defaults: a MALLOC_* variable left in this process's environment (Dask's
    # nanny sets MALLOC_TRIM_THRESHOLD_ for its workers) would change the controls
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run(
        [sys.executable, "-c", script, mode], capture_output=True, text=True, check=True, env=env
    )
    return run.stdout.split()


def test_return_freed_memory_gives_large_blocks_back_to_the_system() -> None:
    got = _run(_RETURN_SCRIPT, "set")
    if got == ["skip"]:
        pytest.skip("no glibc mallopt on this platform")
    assert int(got[0]) < 1024  # the 8 MiB block went back
    assert int(_run(_RETURN_SCRIPT, "default")[0]) > 4096  # without it glibc keeps it


#: pages of the re-allocated block: base pages; with transparent huge pages set to "always"
#: a mmapped block faults per 2 MiB instead, so the controls compare with the kept count
_PAGES = (192 << 20) // 4096


def _faults(mode: str) -> list[str]:
    out = _run(_FAULTS_SCRIPT, mode)
    if out == ["skip"]:
        pytest.skip("no glibc mallopt on this platform")
    return out


def test_keep_freed_memory_reuses_pages_without_faults() -> None:
    kept = int(_faults("keep")[0])
    assert kept < _PAGES // 100  # the second block reused the first one's pages
    # the control: glibc's default serves the block by mmap and faults it in again
    assert int(_faults("default")[0]) > 10 * max(kept, 8)


@pytest.mark.parametrize(
    ("start", "after"), [("context", "return"), ("default-context", "default")]
)
def test_kept_freed_memory_gives_the_heap_back_and_restores_the_mode(
    start: str, after: str
) -> None:
    kept = int(_faults("keep")[0])
    mode, faults = _faults(start)
    assert mode == after
    assert int(faults) > 10 * max(kept, 8)  # back to mmap: the block faults in again


def test_kept_freed_memory_leaves_an_outer_keep_in_force() -> None:
    try:
        if not heap.keep_freed_memory():
            pytest.skip("no glibc mallopt on this platform")
        with heap.kept_freed_memory():
            assert heap.mode() == "keep"
        assert heap.mode() == "keep"  # a training run validating keeps its own mode
    finally:
        heap.return_freed_memory()
    assert heap.mode() == "return"


@pytest.fixture
def net3d() -> UNet:
    torch.manual_seed(0)
    return UNet(3, 1, 2, depth=2, base_channels=4).eval()


def test_tile_layout_keeps_the_heap_only_where_the_budget_allows(net3d: UNet) -> None:
    fast = tiled.inference_model(net3d)
    shape = (60, 60, 60)
    roomy = tiled.tile_layout(fast, shape, max_memory=8 << 30, keep_heap=True)
    assert roomy.keep_heap and len(roomy.tiles) == 1
    # a budget that fits the one tile but not with the kept heap's overhead: more memory
    # for tiles beats a faster heap, so the same single tile runs with blocks given back
    network = dict(fast.network)  # type: ignore[arg-type]
    need = tiling.tile_bytes(
        roomy.size, network, channels_last=tiled.default_channels_last(fast), lean=roomy.lean
    )
    tight = tiled.tile_layout(fast, shape, max_memory=int(need * 1.1), keep_heap=True)
    assert len(tight.tiles) == 1 and not tight.keep_heap
    # forced tiles: kept where the estimate times the overhead fits
    forced = tiled.tile_layout(fast, shape, tile_size=20, max_memory=8 << 30, keep_heap=True)
    assert forced.keep_heap
    small = tiled.tile_layout(fast, shape, tile_size=20, max_memory=1 << 10, keep_heap=True)
    assert not small.keep_heap


def test_kept_layouts_honour_the_budget_and_the_voxel_trade() -> None:
    """Over a sweep of budgets for a CT-sized scan (planning only, nothing runs): a kept
    layout's estimate times the heap's overhead fits the budget, it computes at most
    KEEP_SPEEDUP times the voxels of the layout given the whole budget, and the trade happens
    (kept with more tiles than that layout) as well as not (given back)."""
    net = UNet(3, 1, 5, depth=4, base_channels=8).eval()
    fast = tiled.inference_model(net)
    network = dict(fast.network)  # type: ignore[arg-type]
    cl = tiled.default_channels_last(fast)
    shape = (512, 512, 300)
    traded = given_back = 0
    for gib in (0.25, 0.5, 1, 2, 3, 4, 6, 8, 11, 16, 24):
        budget = int(gib * (1 << 30))
        lay = tiled.tile_layout(fast, shape, max_memory=budget, keep_heap=True)
        whole = tiled._layout_within(fast, shape, None, budget, None)
        if lay.keep_heap:
            need = lay.batch_size * tiling.tile_bytes(
                lay.size, network, channels_last=cl, lean=lay.lean
            )
            assert need * heap.KEEP_OVERHEAD <= budget, gib
            ratio = tiled.computed_voxels(lay, network) / tiled.computed_voxels(whole, network)
            assert ratio <= heap.KEEP_SPEEDUP, gib
            traded += len(lay.tiles) > len(whole.tiles)
        else:
            assert lay == whole, gib
            given_back += 1
    assert traded and given_back


def test_tile_layout_plans_no_kept_heap_where_it_does_not_pay(net3d: UNet) -> None:
    """Not asked to plan for a kept heap, the layout is the one the whole budget gets; by
    default it asks :func:`medseg.runtime.kept_heap_pays` (AMX present)."""
    from medseg import runtime

    fast = tiled.inference_model(net3d)
    shape = (60, 60, 60)
    plain = tiled.tile_layout(fast, shape, max_memory=8 << 30, keep_heap=False)
    assert not plain.keep_heap
    assert plain == tiled._layout_within(fast, shape, None, 8 << 30, None)
    default = tiled.tile_layout(fast, shape, max_memory=8 << 30)
    assert default.keep_heap == runtime.kept_heap_pays(torch.device("cpu"))


def test_kept_heap_pays_where_amx_is(monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg import runtime

    for amx in (False, True):
        monkeypatch.setattr(runtime, "has_amx", lambda amx=amx: amx)
        assert runtime.kept_heap_pays(torch.device("cpu")) is amx
        assert not runtime.kept_heap_pays(torch.device("meta"))


def test_the_cli_keeps_the_heap_while_the_layout_says_so_and_run_tiles_never(
    net3d: UNet,
) -> None:
    from medseg.inference.cohort import kept_heap_for

    image = np.random.default_rng(1).normal(size=(1, 37, 41, 29)).astype(np.float32)
    fast = tiled.inference_model(net3d)
    layout = tiled.tile_layout(fast, image.shape[1:], tile_size=16)
    heap.return_freed_memory()
    if heap.mode() != "return":
        pytest.skip("no glibc mallopt on this platform")
    for keep in (False, True):
        lay = tiled.TileLayout(layout.size, layout.tiles, layout.batch_size, False, keep)
        for scope, kept in ((kept_heap_for, keep), (None, False)):
            seen: set[str] = set()
            with kept_heap_for(lay) if scope else contextlib.nullcontext():
                tiled.run_tiles(
                    fast, image, lay, lambda _t, _o, s=seen: s.add(heap.mode()), prepare=False
                )
            assert seen == {"keep" if kept else "return"}
            assert heap.mode() == "return"
