"""Losses against independent references: MONAI DiceCELoss and torch cross-entropy by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from medseg.training.losses import SegmentationLoss, cross_entropy, soft_dice_loss


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 9, 7, generator=g)
    target = torch.randint(0, 3, (2, 1, 9, 7), generator=g)
    return logits, target


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
def test_dice_ce_matches_monai_dicece(batch, batch_dice: bool, include_background: bool) -> None:
    logits, target = batch
    ref = DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        include_background=include_background,
        batch=batch_dice,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
    )(logits, target)
    ours = SegmentationLoss(
        "dice_ce", include_background=include_background, batch_dice=batch_dice
    )(logits, target)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_dice_ce_matches_monai_3d() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 2, 5, 6, 4, generator=g)
    target = torch.randint(0, 2, (1, 1, 5, 6, 4), generator=g)
    ref = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target)
    assert torch.allclose(SegmentationLoss()(logits, target), ref, atol=1e-6)


def test_ignored_voxels_count_as_if_absent(batch) -> None:
    logits, target = batch
    target = target[:1].clone()
    logits = logits[:1]
    ign = torch.zeros_like(target, dtype=torch.bool)
    ign[..., :3, :] = True
    tgt = target.masked_fill(ign, -1)
    keep = ~ign[0, 0]
    # MONAI on the annotated voxels only, as a flat (1, C, N) "image"
    ref = DiceCELoss(to_onehot_y=True, softmax=True)(
        logits[0][:, keep][None], target[0, 0][keep][None, None]
    )
    assert torch.allclose(SegmentationLoss()(logits, tgt), ref, atol=1e-6)
    # and changing the logits of ignored voxels changes nothing
    noisy = logits.clone()
    noisy[..., :3, :] += 100.0
    assert torch.allclose(SegmentationLoss()(noisy, tgt), ref, atol=1e-6)


def test_weighted_ce_is_the_unet_energy_by_hand(batch) -> None:
    logits, target = batch
    g = torch.Generator().manual_seed(1)
    w = torch.rand(2, 1, 9, 7, generator=g) * 10
    tgt = target.clone()
    tgt[0, 0, 0, :] = -1
    logp = torch.log_softmax(logits, dim=1)
    valid = tgt[:, 0] >= 0
    picked = torch.gather(logp, 1, tgt.clamp(min=0)).squeeze(1)
    ref = -(w[:, 0] * picked)[valid].sum() / valid.sum()
    ours = SegmentationLoss("weighted_ce")(logits, tgt, w)
    assert torch.allclose(ours, ref, atol=1e-5)
    # all-ones weights give plain cross-entropy
    plain = F.cross_entropy(logits, tgt[:, 0], ignore_index=-1)
    assert torch.allclose(cross_entropy(logits, tgt, voxel_weights=torch.ones_like(w)), plain)


def test_class_weighted_ce_matches_torch(batch) -> None:
    logits, target = batch
    cw = [0.2, 1.0, 3.0]
    ref = F.cross_entropy(logits, target[:, 0], weight=torch.tensor(cw))
    assert torch.allclose(SegmentationLoss("ce", class_weights=cw)(logits, target), ref)


def test_dice_of_perfect_prediction_is_near_zero() -> None:
    target = torch.randint(0, 3, (1, 1, 8, 8))
    logits = F.one_hot(target[:, 0], 3).movedim(-1, 1).float() * 50
    assert soft_dice_loss(logits, target).item() < 1e-4


def test_weighted_loss_without_weights_is_a_clear_error(batch) -> None:
    from medseg.errors import PlanError

    with pytest.raises(PlanError, match="border"):
        SegmentationLoss("weighted_ce")(*batch)


BRATS_REGIONS = [[1, 2, 3, 4], [1, 3, 4], [4]]


@pytest.mark.parametrize("batch_dice", [False, True])
def test_region_dice_matches_monai_dice_of_summed_channels(batch_dice: bool) -> None:
    """Region Dice = MONAI's DiceLoss on channels built by hand: background, then each
    region's summed softmax probability against the union of its one-hot classes."""
    from monai.losses import DiceLoss

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 6, 5, 4, generator=g)
    target = torch.randint(0, 5, (2, 1, 6, 5, 4), generator=g)
    probs = torch.softmax(logits, 1)
    onehot = F.one_hot(target[:, 0], 5).movedim(-1, 1).float()
    p_reg = torch.stack([probs[:, 0]] + [probs[:, r].sum(1) for r in BRATS_REGIONS], 1)
    g_reg = torch.stack([onehot[:, 0]] + [onehot[:, r].sum(1) for r in BRATS_REGIONS], 1)
    ref = DiceLoss(batch=batch_dice, smooth_nr=1e-5, smooth_dr=1e-5)(p_reg, g_reg)
    ours = soft_dice_loss(logits, target, batch_dice=batch_dice, regions=BRATS_REGIONS)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_region_dice_with_one_class_per_region_is_the_class_dice(batch) -> None:
    logits, target = batch
    plain = SegmentationLoss("dice_ce")(logits, target)
    regions = SegmentationLoss("dice_ce", regions=[[1], [2]])(logits, target)
    assert torch.allclose(plain, regions, atol=1e-7)


def test_region_with_background_class_is_refused() -> None:
    from medseg.errors import PlanError

    with pytest.raises(PlanError, match="region"):
        SegmentationLoss("dice_ce", regions=[[0, 1]])
