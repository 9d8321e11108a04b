"""Validation by exact overlap-tile inference of whole cached cases (the same tiling
``medseg infer`` uses, not a patch estimate), Dice per class and per region, and the
postprocessing decision taken on those predictions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.errors import PlanError
from medseg.preprocess.plan import Plan
from medseg.training.losses import SegmentationLoss


@dataclass
class Validation:
    """Dice of every class (mean over cases; ``mean_dice`` averages the foreground classes),
    loss, the predicted classes and, when asked for, the class probabilities; Dice of every
    region of the plan (mean over cases)."""

    dice: dict[str, float]
    mean_dice: float
    loss: float | None
    predictions: dict[str, np.ndarray]
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    region_dice: dict[str, float] = field(default_factory=dict)


def _reference(case: Any, prep_dir: Path) -> np.ndarray:
    """The ``(I, J, K)`` class-index label of a cached case; unlabelled cases are an error."""
    if case.label is None:
        raise PlanError(
            f"{prep_dir}/cases/{case.case_id}: cached without a label; training and validation "
            "need labelled cases (check the manifest and rerun medseg preprocess)"
        )
    return np.asarray(case.label[0])


def _predict_case(
    model: nn.Module, image: np.ndarray, dims: int, tile: Any, tta: Any = None
) -> np.ndarray:
    """Logits ``(classes, I, J, K)`` of a whole cached case (2D: slice by slice along K)."""
    from medseg.inference.tiled import predict_logits

    tile_size = tuple(tile) if tile is not None else None
    if dims == 3:
        return predict_logits(model, np.asarray(image), tile_size=tile_size, tta=tta, prepare=True)
    slices = [
        predict_logits(model, np.asarray(image[..., k]), tile_size=tile_size, tta=tta, prepare=True)
        for k in range(image.shape[-1])
    ]
    return np.stack(slices, axis=-1)


def validate(
    model: nn.Module,
    prep_dir: Path,
    case_ids: Sequence[str],
    plan: Plan,
    loss_fn: SegmentationLoss | None,
    tile_size: Any = None,
    *,
    tta: str | Sequence[int] | None = None,
    probabilities: bool = False,
) -> Validation:
    """Exact overlap-tile inference of each whole validation case; Dice per class.

    Ignored voxels (-1) are left out of both prediction and reference. ``tta`` as in
    ``medseg infer``; ``probabilities`` keeps each case's softmax (float32).
    """
    from medseg.inference.tiled import softmax
    from medseg.metrics import dice
    from medseg.preprocess.cache import load_case

    was_training = model.training
    model.eval()
    per_class: dict[str, list[float]] = {n: [] for n in plan.class_names}
    per_region: dict[str, list[float]] = {n: [] for n in plan.regions or {}}
    losses: list[float] = []
    preds: dict[str, np.ndarray] = {}
    probs: dict[str, np.ndarray] = {}
    try:
        for cid in case_ids:
            case = load_case(prep_dir, cid, mmap=True)
            logits = _predict_case(model, case.image, plan.spatial_dims, tile_size, tta)
            if probabilities:
                probs[cid] = softmax(logits).astype(np.float32, copy=False)
            ref = _reference(case, prep_dir)
            cls = np.argmax(logits, axis=0).astype(np.int16)
            preds[cid] = cls.astype(np.uint8 if plan.num_classes < 256 else np.int16)
            valid = ref >= 0
            for c, name in enumerate(plan.class_names):
                per_class[name].append(dice((cls == c) & valid, (ref == c) & valid))
            for name, members in (plan.regions or {}).items():
                per_region[name].append(
                    dice(np.isin(cls, members) & valid, np.isin(ref, members) & valid)
                )
            if loss_fn is not None and not loss_fn.needs_weights:
                with torch.no_grad():
                    lt = torch.from_numpy(logits[None])
                    tt = torch.from_numpy(ref[None, None].astype(np.int64))
                    losses.append(float(loss_fn(lt, tt)))
    finally:
        model.train(was_training)
    dice_mean = {k: float(np.mean(v)) for k, v in per_class.items()}
    return Validation(
        dice_mean,
        float(np.mean([dice_mean[n] for n in plan.class_names[1:]])),
        float(np.mean(losses)) if losses else None,
        preds,
        probs,
        {k: float(np.mean(v)) for k, v in per_region.items()},
    )


def postprocessing_decision(
    prep_dir: Path, plan: Plan, val: Validation, metric: str = "dice"
) -> dict[str, Any]:
    """``medseg.postprocess.decide_postprocessing`` on the validation predictions (class
    indices and, if kept, probabilities on the preprocessed grid; spacing in mm from each
    case's record)."""
    from medseg.postprocess import decide_postprocessing
    from medseg.preprocess.cache import load_case

    refs, spacings = [], []
    preds = val.predictions
    for cid in preds:
        case = load_case(prep_dir, cid, mmap=True)
        refs.append(_reference(case, prep_dir))
        grid = getattr(case.record, "grid", None)
        spacings.append(tuple(grid.spacing) if grid is not None else (1.0, 1.0, 1.0))
    probs = [val.probabilities[c] for c in preds] if val.probabilities else None
    return decide_postprocessing(
        [p.astype(np.int16) for p in preds.values()],
        refs,
        spacings,
        plan.num_classes,
        probabilities=probs,
        metric=metric,
        regions=plan.regions,
    )
