"""The ``[train]`` table of a pipeline TOML as a frozen value (no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from medseg.errors import PlanError

#: ``[train]`` options that are on/off switches: a quoted "false" would otherwise read as true
_SWITCHES = (
    "include_background", "batch_dice", "region_dice", "deterministic", "amp", "tensorboard",
    "postprocess",
)  # fmt: skip


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


@dataclass(frozen=True)
class TrainConfig:
    """``[train]`` options of a pipeline TOML (defaults: nnU-Net's where it has one).

    Training length is the recipe, in optimiser steps: ``steps`` when given, else ``epochs x
    iterations_per_epoch`` (:attr:`total_steps`); the poly learning-rate schedule follows the
    step alone, never the clock, so the same recipe gives the same model on any machine. An
    epoch is ``iterations_per_epoch`` steps (the last one shorter when ``steps`` is not a
    multiple): validation, the log row and the checkpoint come at its end.
    ``time_budget_minutes`` is an optional cap on one invocation's wall clock: it stops training
    early (leaving time for the final validation) and the run says so
    (``train_summary.json``); it never shapes the schedule, and ``--resume`` continues the
    planned steps. ``region_dice`` takes the Dice terms of
    the loss over the plan's regions (the manifest's ``regions``) instead of single classes.
    ``amp`` trains under bf16 autocast where :func:`medseg.runtime.bf16_autocast` finds native
    bf16 (measured faster there).
    """

    epochs: int = 50
    iterations_per_epoch: int = 250
    steps: int | None = None
    batch_size: int = 2
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    grad_clip: float = 12.0
    loss: str = "dice_ce"
    include_background: bool = True
    batch_dice: bool = False
    region_dice: bool = False
    class_weights: Any = None
    foreground_fraction: float = 1.0 / 3.0
    augment: dict[str, Any] = field(default_factory=dict)
    val_every: int = 1
    val_tile_size: Any = None
    workers: int = 2
    seed: int = 12345
    n_folds: int = 5
    fold: Any = 0
    time_budget_minutes: float | None = None
    deterministic: bool = False
    amp: bool = True
    select: str = "best"
    tensorboard: bool = False
    postprocess: bool = True
    postprocess_metric: str = "dice"

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise PlanError(f"[train] optimizer {self.optimizer!r} must be 'sgd' or 'adamw'")
        if self.select not in ("best", "last"):
            raise PlanError(f"[train] select {self.select!r} must be 'best' or 'last'")
        for name in ("epochs", "iterations_per_epoch", "batch_size", "val_every"):
            if int(getattr(self, name)) < 1:
                raise PlanError(f"[train] {name} must be >= 1")
        if self.steps is not None and not _whole(self.steps):
            raise PlanError(f"[train] steps = {self.steps!r} must be a whole number >= 1")
        budget = self.time_budget_minutes
        if budget is not None and not (_number(budget) and budget > 0):
            raise PlanError(
                f"[train] time_budget_minutes = {self.time_budget_minutes!r} must be > 0 "
                "(leave it out for no cap)"
            )
        if self.workers < 0:
            raise PlanError("[train] workers must be >= 0")
        for name in _SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise PlanError(
                    f"[train] {name} = {getattr(self, name)!r} must be true or false (a TOML "
                    "boolean, unquoted)"
                )
        if self.postprocess_metric not in ("dice", "rand"):
            raise PlanError(
                f"[train] postprocess_metric {self.postprocess_metric!r} must be 'dice' or "
                "'rand' (1 - adapted Rand error of the components of each class)"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, **overrides: Any) -> TrainConfig:
        """From a ``[train]`` table plus command-line overrides (None values are ignored)."""
        kw = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(kw) - known
        if unknown:
            raise PlanError(f"[train]: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        kw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**kw)
        except TypeError as exc:
            raise PlanError(f"[train]: {exc}") from exc

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole training: ``steps``, else epochs x iterations."""
        if self.steps is not None:
            return int(self.steps)
        return int(self.epochs) * int(self.iterations_per_epoch)

    @property
    def total_epochs(self) -> int:
        """Epochs of :attr:`total_steps` (the last one may be shorter)."""
        return -(-self.total_steps // int(self.iterations_per_epoch))

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 1e-2 if self.optimizer == "sgd" else 3e-4
