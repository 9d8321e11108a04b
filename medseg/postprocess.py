"""Postprocessing of class-index maps and the validation-driven choice of which steps to apply.

Steps (any array dimension, spacing in mm per array axis):

- ``largest_component_foreground``: keep the largest connected component of all foreground
  classes together; everything else becomes background (class 0).
- ``largest_component``: per class, keep its largest connected component.
- ``remove_small``: per class, remove components smaller than ``min_volume_mm3``.
- ``fill_holes``: per class, turn background voxels enclosed by the class into the class.

Like nnU-Net (Isensee et al. 2021, Nat. Methods 18:203), training decides which steps help:
:func:`decide_postprocessing` tries each on the validation predictions and keeps it only if the
mean validation Dice of the affected class improves and the mean over all classes does not
decrease. The result is the content of ``postprocessing.json``::

    {"format": "medseg-postprocessing", "version": 1,
     "steps": [{"op": "largest_component", "classes": [1], "connectivity": "face"}, ...],
     "decisions": [{"op": ..., "classes": [...], "dice_before": ..., "dice_after": ...,
                    "applied": true, ...}, ...],
     "n_cases": 20, "metric": "dice"}

``steps`` is what :func:`apply_postprocessing` (run by ``medseg infer``) executes in order;
``decisions`` records the validation numbers behind every step tried, applied or not.
Connectivity: ``"face"`` (6-neighbourhood in 3D, 4 in 2D) or ``"full"`` (26 / 8).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.errors import PlanError

FORMAT = "medseg-postprocessing"
VERSION = 1
OPS = ("largest_component_foreground", "largest_component", "remove_small", "fill_holes")
#: Minimum component volumes tried by :func:`decide_postprocessing` (mm^3).
SMALL_VOLUMES_MM3 = (10.0, 100.0, 1000.0)


def empty_config() -> dict[str, Any]:
    """A postprocessing config that changes nothing."""
    return {"format": FORMAT, "version": VERSION, "steps": [], "decisions": []}


def _structure(ndim: int, connectivity: str) -> np.ndarray:
    if connectivity not in ("face", "full"):
        raise PlanError(f"postprocessing connectivity {connectivity!r} must be 'face' or 'full'")
    return ndimage.generate_binary_structure(ndim, 1 if connectivity == "face" else ndim)


def _components(mask: np.ndarray, connectivity: str) -> tuple[np.ndarray, np.ndarray]:
    """Component labels and the voxel count of each component (index 0 = background)."""
    lab, n = ndimage.label(mask, structure=_structure(mask.ndim, connectivity))
    return lab, np.bincount(lab.ravel(), minlength=n + 1)


def keep_largest(mask: np.ndarray, connectivity: str = "face") -> np.ndarray:
    """The largest connected component of a boolean mask (ties: the first in scan order)."""
    if not mask.any():
        return mask.copy()
    lab, sizes = _components(mask, connectivity)
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def remove_small(
    mask: np.ndarray, spacing_mm: Sequence[float], min_volume_mm3: float, connectivity: str = "face"
) -> np.ndarray:
    """The mask without components smaller than ``min_volume_mm3``."""
    if not mask.any():
        return mask.copy()
    lab, sizes = _components(mask, connectivity)
    keep = sizes * float(np.prod(spacing_mm)) >= min_volume_mm3
    keep[0] = False
    return keep[lab]


def fill_holes(mask: np.ndarray, connectivity: str = "face") -> np.ndarray:
    """The mask with enclosed cavities (not connected to the array border) filled."""
    return ndimage.binary_fill_holes(mask, structure=_structure(mask.ndim, connectivity))


def _check_step(step: dict[str, Any]) -> None:
    op = step.get("op")
    if op not in OPS:
        raise PlanError(f"postprocessing step {step!r}: op must be one of {', '.join(OPS)}")
    if op != "largest_component_foreground" and not step.get("classes"):
        raise PlanError(f"postprocessing step {step!r} needs a non-empty 'classes' list")
    if op == "remove_small" and not float(step.get("min_volume_mm3", -1)) >= 0:
        raise PlanError(f"postprocessing step {step!r} needs 'min_volume_mm3' >= 0")


def apply_step(
    classes: np.ndarray, spacing_mm: Sequence[float], step: dict[str, Any]
) -> np.ndarray:
    """Apply one step to a class-index map (returns a new array)."""
    _check_step(step)
    conn = str(step.get("connectivity", "face"))
    out = classes.copy()
    op = step["op"]
    if op == "largest_component_foreground":
        fg = classes > 0
        out[fg & ~keep_largest(fg, conn)] = 0
        return out
    for c in step["classes"]:
        m = classes == int(c)
        if op == "largest_component":
            out[m & ~keep_largest(m, conn)] = 0
        elif op == "remove_small":
            out[m & ~remove_small(m, spacing_mm, float(step["min_volume_mm3"]), conn)] = 0
        else:  # fill_holes: only background becomes the class, other classes stay
            out[fill_holes(m, conn) & (out == 0)] = int(c)
    return out


def apply_postprocessing(
    classes: np.ndarray, spacing_mm: Sequence[float], config: dict[str, Any] | None
) -> np.ndarray:
    """Run the ``steps`` of a ``postprocessing.json`` config on a class-index map.

    ``classes`` holds class indices (0 = background) on a grid of ``spacing_mm`` (one value per
    array axis, mm). ``None`` or an empty config returns the map unchanged.
    """
    if not config:
        return classes
    if config.get("format", FORMAT) != FORMAT or int(config.get("version", 0)) > VERSION:
        raise PlanError(
            f"postprocessing config format {config.get('format')!r} version "
            f"{config.get('version')!r} is not medseg-postprocessing <= {VERSION}; "
            "retrain or delete postprocessing.json"
        )
    if len(spacing_mm) != classes.ndim:
        raise PlanError(f"spacing {tuple(spacing_mm)} does not fit a {classes.ndim}D class map")
    out = classes
    for step in config.get("steps", []):
        out = apply_step(out, spacing_mm, step)
    return out


def _dice_table(
    preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], num_classes: int
) -> np.ndarray:
    """Dice per case and foreground class ``(cases, num_classes - 1)``; ref -1 is ignored."""
    from medseg.metrics import dice

    out = np.zeros((len(preds), max(num_classes - 1, 0)))
    for i, (p, r) in enumerate(zip(preds, refs, strict=True)):
        valid = r >= 0
        for c in range(1, num_classes):
            out[i, c - 1] = dice((p == c) & valid, (r == c) & valid)
    return out


def decide_postprocessing(
    preds: list[np.ndarray],
    refs: list[np.ndarray],
    spacings: Sequence[Sequence[float]],
    num_classes: int,
    connectivity: str = "face",
) -> dict[str, Any]:
    """Choose the postprocessing steps that improve validation Dice (nnU-Net's rule).

    ``preds``/``refs``: class-index maps per validation case (ref -1 = ignored voxel),
    ``spacings``: mm per array axis for each case, ``num_classes`` including background.
    Steps are tried greedily, each on the output of the steps kept so far: the joint
    foreground largest component, then per class the largest component, the removal of small
    components (thresholds :data:`SMALL_VOLUMES_MM3` below the smallest reference component of
    that class, the best one) and hole filling. A step is kept when the mean Dice of its
    class(es) strictly improves and the mean Dice over all classes does not decrease.
    Returns the ``postprocessing.json`` content.
    """
    if not (len(preds) == len(refs) == len(spacings)):
        raise ValueError("preds, refs and spacings must have one entry per case")
    _structure(2, connectivity)
    current = [np.asarray(p) for p in preds]
    refs = [np.asarray(r) for r in refs]
    base = _dice_table(current, refs, num_classes)
    steps: list[dict[str, Any]] = []
    decisions: list[dict[str, Any]] = []

    def trial(step: dict[str, Any], scored: list[int]) -> tuple[bool, list[np.ndarray], np.ndarray]:
        """Score ``step`` on the current predictions; record it as not applied (yet)."""
        cand = [apply_step(p, s, step) for p, s in zip(current, spacings, strict=True)]
        table = _dice_table(cand, refs, num_classes)
        before = float(base[:, [c - 1 for c in scored]].mean()) if len(base) else 0.0
        after = float(table[:, [c - 1 for c in scored]].mean()) if len(table) else 0.0
        all_before = float(base.mean()) if base.size else 0.0
        all_after = float(table.mean()) if table.size else 0.0
        ok = after > before + 1e-12 and all_after >= all_before - 1e-12
        decisions.append(
            {
                **step,
                "dice_before": before,
                "dice_after": after,
                "mean_dice_all_before": all_before,
                "mean_dice_all_after": all_after,
                "applied": False,
            }
        )
        return ok, cand, table

    def accept(
        step: dict[str, Any], decision: dict[str, Any], cand: list[np.ndarray], table: np.ndarray
    ) -> None:
        """Keep ``step``: later trials start from its predictions and Dice table."""
        nonlocal current, base
        steps.append(step)
        decision["applied"] = True
        current, base = cand, table

    fg_classes = list(range(1, num_classes))
    if fg_classes and current:
        step: dict[str, Any] = {"op": "largest_component_foreground", "connectivity": connectivity}
        ok, cand, table = trial(step, fg_classes)
        if ok:
            accept(step, decisions[-1], cand, table)
        for c in fg_classes:
            step = {"op": "largest_component", "classes": [c], "connectivity": connectivity}
            ok, cand, table = trial(step, [c])
            if ok:
                accept(step, decisions[-1], cand, table)
                continue
            smallest = _smallest_component_mm3(refs, spacings, c, connectivity)
            best: tuple[float, dict[str, Any], list[np.ndarray], np.ndarray] | None = None
            for vol in SMALL_VOLUMES_MM3:
                if vol >= smallest:
                    break
                step = {
                    "op": "remove_small",
                    "classes": [c],
                    "min_volume_mm3": vol,
                    "connectivity": connectivity,
                }
                ok, cand, table = trial(step, [c])
                if ok and (best is None or table[:, c - 1].mean() > best[0]):
                    best = (float(table[:, c - 1].mean()), decisions[-1], cand, table)
            if best is not None:
                accept({k: best[1][k] for k in step}, best[1], best[2], best[3])
        for c in fg_classes:
            step = {"op": "fill_holes", "classes": [c], "connectivity": connectivity}
            ok, cand, table = trial(step, [c])
            if ok:
                accept(step, decisions[-1], cand, table)
    return {
        "format": FORMAT,
        "version": VERSION,
        "steps": steps,
        "decisions": decisions,
        "n_cases": len(preds),
        "metric": "dice",
    }


def _smallest_component_mm3(
    refs: Sequence[np.ndarray], spacings: Sequence[Sequence[float]], c: int, connectivity: str
) -> float:
    """Volume (mm^3) of the smallest reference component of class ``c`` over all cases."""
    smallest = float("inf")
    for r, s in zip(refs, spacings, strict=True):
        m = r == c
        if m.any():
            _, sizes = _components(m, connectivity)
            smallest = min(smallest, float(sizes[1:].min()) * float(np.prod(s)))
    return smallest
