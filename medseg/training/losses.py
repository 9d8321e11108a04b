"""Segmentation losses: soft Dice + cross-entropy, and the U-Net paper's weighted cross-entropy.

All take logits ``(B, classes, *spatial)`` and integer class targets ``(B, 1, *spatial)`` with
``-1`` = ignore (unannotated voxels contribute nothing, as in the 3D U-Net paper's sparse
annotation, Cicek et al. 2016). Losses are computed in float32 even under autocast.

- ``dice_ce`` (default): soft Dice (Milletari et al. 2016, per sample and class, smoothing
  ``1e-5`` on numerator and denominator, as MONAI's ``DiceCELoss``) plus mean cross-entropy.
- ``weighted_ce``: the U-Net paper's energy (Ronneberger et al. 2015, eq. 1), cross-entropy
  weighted per voxel by the border weight map ``w(x) = w_c(x) + w0 exp(-(d1 + d2)^2 / 2 sigma^2)``
  that preprocessing stores as ``weights.npy``; averaged over annotated voxels.
- ``dice_weighted_ce``: soft Dice plus the weighted cross-entropy.
- ``ce``: cross-entropy, optionally with per-class weights (class balancing).

Region Dice (``regions``, ``[train] region_dice = true``): the Dice terms are taken over unions
of classes, e.g. BraTS's whole tumour / tumour core / enhancing tumour, with the region's
probability the sum of its classes' softmax probabilities. This optimises the overlap that
nested-region data sets are scored by, as nnU-Net's region-based BraTS training does with
sigmoids (Isensee et al. 2021, "nnU-Net for Brain Tumor Segmentation", BrainLes 2020, LNCS
12659); the softmax keeps one class per voxel, so the cross-entropy and the argmax stay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import PlanError

KINDS = ("dice_ce", "ce", "weighted_ce", "dice_weighted_ce")


def _valid(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return target != ignore_index


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -1,
    smooth: float = 1e-5,
    include_background: bool = True,
    batch_dice: bool = False,
    regions: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """``1 - (2 |P G| + s) / (|P| + |G| + s)`` of softmax probabilities, mean over classes.

    Per sample and class (``batch_dice=False``) or pooled over the batch. Ignored voxels are
    removed from both P and G. With ``regions`` (lists of class indices) the foreground terms
    are one per region, P and G summed over the region's classes; the background class stays
    a term when ``include_background``.
    """
    logits = logits.float()
    t = target[:, 0].long()
    valid = _valid(t, ignore_index)
    probs = torch.softmax(logits, dim=1) * valid.unsqueeze(1)
    onehot = F.one_hot(t.clamp(min=0), logits.shape[1]).movedim(-1, 1).float()
    onehot = onehot * valid.unsqueeze(1)
    if regions:
        probs, onehot = _to_regions(probs, regions), _to_regions(onehot, regions)
    dims = tuple(range(2, logits.ndim))
    if batch_dice:
        dims = (0, *dims)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2.0 * inter + smooth) / (denom + smooth)
    if not include_background:
        dice = dice[..., 1:]
    return 1.0 - dice.mean()


def _to_regions(x: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """``(B, 1 + len(regions), ...)``: channel 0 (background) then each region's class sum."""
    parts = [x[:, :1]] + [x[:, list(r)].sum(1, keepdim=True) for r in regions]
    return torch.cat(parts, dim=1)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -1,
    voxel_weights: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy averaged over annotated voxels.

    With ``voxel_weights`` ``(B, 1, *spatial)``: ``sum(w * ce) / n_annotated`` (the U-Net
    energy, normalised by voxel count so its scale does not depend on patch size). With
    ``class_weights`` ``(classes,)``: torch's class-weighted mean.
    """
    logits = logits.float()
    t = target[:, 0].long()
    if voxel_weights is None:
        return F.cross_entropy(
            logits, t, weight=class_weights, ignore_index=ignore_index, reduction="mean"
        )
    ce = F.cross_entropy(
        logits, t, weight=class_weights, ignore_index=ignore_index, reduction="none"
    )
    n = _valid(t, ignore_index).sum().clamp(min=1)
    return (ce * voxel_weights[:, 0].float()).sum() / n


class SegmentationLoss(nn.Module):
    """The training loss chosen by ``[train] loss`` (one of ``KINDS``)."""

    def __init__(
        self,
        kind: str = "dice_ce",
        *,
        ignore_index: int = -1,
        include_background: bool = True,
        batch_dice: bool = False,
        class_weights: Sequence[float] | None = None,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        regions: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise PlanError(f"[train] loss {kind!r} not in {KINDS}")
        for r in regions or []:
            if not r or min(int(c) for c in r) < 1:
                raise PlanError(f"region {list(r)}: a region is a non-empty list of classes >= 1")
        self.regions = [[int(c) for c in r] for r in regions] if regions else None
        self.kind = kind
        self.ignore_index = ignore_index
        self.include_background = include_background
        self.batch_dice = batch_dice
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        cw = torch.tensor(list(class_weights), dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", cw, persistent=False)

    @property
    def needs_weights(self) -> bool:
        """Whether the loss reads the cached border weight map."""
        return self.kind in ("weighted_ce", "dice_weighted_ce")

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.needs_weights and weights is None:
            raise PlanError(
                f"[train] loss {self.kind!r} needs border weight maps; set "
                "[preprocess] border_weights = true and rerun medseg preprocess"
            )
        cw: torch.Tensor | None = self.class_weights  # type: ignore[assignment]
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.kind in ("dice_ce", "dice_weighted_ce"):
            loss = loss + self.dice_weight * soft_dice_loss(
                logits,
                target,
                ignore_index=self.ignore_index,
                include_background=self.include_background,
                batch_dice=self.batch_dice,
                regions=self.regions,
            )
        vw = weights if self.needs_weights else None
        return loss + self.ce_weight * cross_entropy(
            logits, target, ignore_index=self.ignore_index, voxel_weights=vw, class_weights=cw
        )
