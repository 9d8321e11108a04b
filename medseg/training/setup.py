"""Setting a training run up: the config with its overrides, the device and process group,
the fold's cases, then the loss and the seeded network with its optimiser.

:class:`Run` and :class:`Learner` are the frozen values the loop's phases
(:mod:`medseg.training.loop`) pass between them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.config import Pipeline
from medseg.errors import ModelError, PlanError
from medseg.preprocess.plan import Plan
from medseg.runtime import resolve_device
from medseg.training.augment import AugmentConfig
from medseg.training.checkpoint import seed_everything, set_deterministic
from medseg.training.config import TrainConfig
from medseg.training.distributed import DistInfo, init_distributed
from medseg.training.losses import SegmentationLoss
from medseg.training.sampling import SamplingConfig
from medseg.training.splits import (
    fold_cases,
    list_cached_cases,
    load_or_create_splits,
    manifest_split,
)


@dataclass(frozen=True)
class Run:
    """What this invocation trains, fixed before the first step."""

    cfg: TrainConfig
    pipeline: Pipeline
    prep: Path
    out: Path
    dev: torch.device
    info: DistInfo
    plan: Plan
    train_ids: list[str]
    val_ids: list[str]
    sampling: SamplingConfig
    augment: AugmentConfig
    say: Callable[[str], None]


@dataclass(frozen=True)
class Learner:
    """The network (unwrapped), its optimiser, the loss and the activations' memory format."""

    model: nn.Module
    opt: torch.optim.Optimizer
    loss_fn: SegmentationLoss
    fmt: torch.memory_format


def setup_run(
    pipeline: Pipeline,
    out_dir: str | os.PathLike[str],
    *,
    fold: int | str | None,
    epochs: int | None,
    steps: int | None = None,
    device: str,
    deterministic: bool | None,
    prep_dir: str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | None,
    log: Callable[[str], None] | None,
) -> Run:
    """Config, device, process group, deterministic flags, plan and the fold's cases.

    An explicit ``epochs`` (``--epochs``) replaces a ``[train] steps`` of the pipeline: the
    length asked for on the command line is the one trained."""
    table = {**pipeline.train, **(overrides or {})}
    if epochs is not None and steps is None:
        table.pop("steps", None)
    cfg = TrainConfig.from_dict(
        table,
        epochs=epochs,
        steps=steps,
        fold=fold,
        deterministic=deterministic if deterministic else None,
    )
    prep = Path(prep_dir) if prep_dir is not None else pipeline.prep_dir
    if prep is None:
        raise PlanError(f"{pipeline.path}: no prep_dir in the pipeline; pass --prep DIR")
    say = log if log is not None else (lambda _m: None)
    dev, info = _device(device, say)
    set_deterministic(cfg.deterministic)
    plan = Plan.load(prep / "plan.json")
    train_ids, val_ids = _fold_ids(cfg, pipeline, prep, info)
    return Run(
        cfg=cfg,
        pipeline=pipeline,
        prep=prep,
        out=Path(out_dir),
        dev=dev,
        info=info,
        plan=plan,
        train_ids=train_ids,
        val_ids=val_ids,
        sampling=SamplingConfig(plan.patch_output_size, plan.margin, cfg.foreground_fraction),
        augment=AugmentConfig.from_dict(cfg.augment),
        say=say if info.is_main else (lambda _m: None),
    )


def _device(device: str, warn: Callable[[str], None]) -> tuple[torch.device, DistInfo]:
    """The training device (cpu or cuda; under ``torchrun`` on CUDA, this rank's GPU)."""
    dev = resolve_device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ModelError(
            f"--device {device}: training runs on cpu or cuda; use one of them or auto"
        )
    info = init_distributed(dev, warn)
    if info.enabled and dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    return dev, info


def _fold_ids(
    cfg: TrainConfig, pipeline: Pipeline, prep: Path, info: DistInfo
) -> tuple[list[str], list[str]]:
    """Training and validation case ids of ``cfg.fold`` (splits.json written by rank 0)."""
    all_ids = list_cached_cases(prep)
    if str(cfg.fold) == "manifest":
        return manifest_split(pipeline, all_ids)
    splits = (
        load_or_create_splits(prep, all_ids, cfg.n_folds, cfg.seed, write=info.is_main)
        if str(cfg.fold) != "all"
        else []
    )
    return fold_cases(splits, cfg.fold, all_ids)


def build_learner(run: Run) -> Learner:
    """The loss, then the network initialised from the seeded global torch generator."""
    from medseg.model import UNet

    cfg, plan = run.cfg, run.plan
    loss_fn = SegmentationLoss(
        cfg.loss,
        include_background=cfg.include_background,
        batch_dice=cfg.batch_dice,
        class_weights=_class_weights(cfg, run.prep, run.train_ids, plan.num_classes),
        regions=_dice_regions(cfg, plan, run.prep),
    ).to(run.dev)
    seed_everything(cfg.seed)
    model = UNet(**plan.network)
    if tuple(plan.margin) != (model.margin,) * plan.spatial_dims:
        raise PlanError(
            f"{run.prep / 'plan.json'}: margin {plan.margin} does not match the network's "
            f"{model.margin}; regenerate the plan with medseg preprocess"
        )
    fmt = _memory_format(run.dev, plan.spatial_dims)
    model.to(run.dev, memory_format=fmt)  # type: ignore[call-overload]
    opt: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=True,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
    else:
        opt = torch.optim.AdamW(
            model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
    return Learner(model, opt, loss_fn, fmt)


def _memory_format(device: torch.device, spatial_dims: int) -> torch.memory_format:
    """Channels-last on the CPU, where oneDNN convolves NHWC/NDHWC without reordering around
    every batch norm, ReLU and pooling; CUDA keeps the contiguous layout cuDNN expects."""
    from medseg.model.unet import channels_last_format

    if device.type != "cpu":
        return torch.contiguous_format
    return channels_last_format(spatial_dims)


def _dice_regions(cfg: TrainConfig, plan: Plan, prep_dir: Path) -> list[list[int]] | None:
    """The plan's regions (class indices) when ``[train] region_dice`` asks for them."""
    if not cfg.region_dice:
        return None
    if not plan.regions:
        raise PlanError(
            f"{prep_dir / 'plan.json'}: [train] region_dice needs regions; declare them in the "
            'manifest ("regions": {"whole": [1, 2, 3], ...}) and rerun medseg preprocess'
        )
    return [list(v) for v in plan.regions.values()]


def _class_weights(cfg: TrainConfig, prep_dir: Path, ids: Sequence[str], n: int) -> Any:
    """``[train] class_weights``: a list, or ``"balanced"`` (median frequency balancing,
    Eigen & Fergus 2015) from the training labels."""
    if cfg.class_weights is None or isinstance(cfg.class_weights, list):
        return cfg.class_weights
    if cfg.class_weights != "balanced":
        raise PlanError("[train] class_weights must be a list of numbers or 'balanced'")
    from medseg.preprocess.cache import load_case

    counts = np.zeros(n, dtype=np.float64)
    for cid in ids:
        lab = np.asarray(load_case(prep_dir, cid, mmap=True).label).ravel()
        counts += np.bincount(lab[lab >= 0], minlength=n)[:n]
    freq = counts / max(counts.sum(), 1.0)
    present = freq > 0
    w = np.zeros(n)
    w[present] = np.median(freq[present]) / freq[present]
    return w.tolist()
