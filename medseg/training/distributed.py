"""DistributedDataParallel plumbing: the process group ``torchrun`` sets up, and the few
collectives the loop needs (every helper is a no-op in a single process)."""

from __future__ import annotations

import os
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


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group set up by ``torchrun`` (env ``WORLD_SIZE`` > 1), else no-op."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
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
