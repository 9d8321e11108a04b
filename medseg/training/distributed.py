"""DistributedDataParallel plumbing: the process group ``torchrun`` sets up, and the few
collectives the loop needs (every helper is a no-op in a single process)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the group (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


#: what ``torchrun`` (and ``torch.multiprocessing`` launchers) set besides ``WORLD_SIZE``: the
#: process group can only be joined with all of them
_GROUP_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _world_size(env: Mapping[str, str]) -> int:
    try:
        return int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched_as_group(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is one rank of a launched group: ``WORLD_SIZE`` > 1 together with
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (all of which ``torchrun``
    sets). A stray ``WORLD_SIZE`` alone is not a group."""
    env = os.environ if env is None else env
    return _world_size(env) > 1 and all(env.get(k) for k in _GROUP_ENV)


def launch_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank as its launcher set it (0 outside a launched group), known before
    the process group is joined."""
    env = os.environ if env is None else env
    if not launched_as_group(env):
        return 0
    try:
        return int(env["RANK"])
    except ValueError:
        return 0


def init_distributed(device: torch.device, warn: Callable[[str], None] | None = None) -> DistInfo:
    """Join the process group set up by ``torchrun`` (:func:`launched_as_group`), else no-op.

    A ``WORLD_SIZE`` > 1 without the rest of the launcher's environment is ignored, with one
    line to ``warn``: joining would wait for ranks that were never started."""
    world = _world_size(os.environ)
    if world <= 1:
        return DistInfo()
    if not launched_as_group():
        missing = [k for k in _GROUP_ENV if not os.environ.get(k)]
        if warn is not None:
            warn(
                f"warning: WORLD_SIZE={os.environ['WORLD_SIZE']} is ignored (no "
                f"{', '.join(missing)}: not started by torchrun); training in one process"
            )
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def barrier(info: DistInfo) -> None:
    """Wait for every rank."""
    if info.enabled:
        dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's ``flag`` on every rank (so all ranks stop at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_float(x: float, info: DistInfo) -> float:
    """Rank 0's ``x`` on every rank."""
    if not info.enabled:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t.item())


def sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (batch-norm statistics) on every rank."""
    if info.enabled:
        for b in model.buffers():
            dist.broadcast(b, src=0)
