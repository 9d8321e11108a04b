"""Postprocessing of segmentations and the validation-driven choice of which steps to apply.

Steps on class-index maps (any array dimension, spacing in mm per array axis):

- ``largest_component_foreground``: keep the largest connected component of all foreground
  classes together; everything else becomes background (class 0).
- ``largest_component``: per class, keep its largest connected component.
- ``remove_small``: per class, remove components smaller than ``min_volume_mm3``.
- ``fill_holes``: per class, turn background voxels enclosed by the class into the class.

Steps on the probability map of a two-class problem (they replace the argmax, so they come
first; ``medseg infer`` then keeps the probabilities of the case until they have run):

- ``threshold``: class 1 where its probability exceeds ``value`` instead of 0.5. Thin or faint
  structures (retinal vessels) are often best cut below 0.5; the cut is chosen on validation.
- ``watershed_split``: the objects of class 1 are seeded by the components of ``p > seed``
  (face-connected components under ``min_seed_mm3`` dropped) and flooded over ``1 - p`` until
  they meet; class 0 becomes the one-voxel watershed lines between them (objects are
  face-connected and never face neighbours of each other). For
  data where objects tile the image and only their separation matters, such as the cells of
  EM membrane stacks scored by the adapted Rand error (ISBI 2012, Arganda-Carreras et al.
  2015, Front. Neuroanat. 9:142); seeded watershed on a boundary map is the classic
  postprocessing of that challenge's entries (e.g. Beier et al. 2017, Nat. Methods 14:101).

Step on the probability map of a problem with nested regions (BraTS: whole tumour >= tumour
core >= enhancing tumour, as class-index lists, outer first):

- ``region_decode``: instead of the plain argmax, descend the regions: a voxel is inside a
  region when the summed probability of the region's classes exceeds 0.5 (of the classes
  still allowed at that voxel), and its class is the argmax among the classes the answers
  leave. The region masks are then the 0.5 cuts of the region probabilities the region Dice
  loss trains (``[train] region_dice``); the plain argmax can leave a voxel in the background
  while most of its probability is tumour, split among tumour classes. This is the softmax
  form of nnU-Net's reconstruction of BraTS labels from region outputs (Isensee et al. 2021,
  BrainLes 2020).

Like nnU-Net (Isensee et al. 2021, Nat. Methods 18:203), training decides which steps help:
:func:`decide_postprocessing` tries each on the validation predictions and keeps it only if
the validation score of the affected class improves and the mean over all classes does not
decrease. The score is the per-case Dice (``metric = "dice"``) or, for object separation,
``1 - adapted Rand error`` of the face-connected components of the class (``"rand"``). The
result is the content of ``postprocessing.json``::

    {"format": "medseg-postprocessing", "version": 2, "metric": "dice",
     "steps": [{"op": "largest_component", "classes": [1], "connectivity": "face"}, ...],
     "decisions": [{"op": ..., "classes": [...], "before": ..., "after": ...,
                    "applied": true, ...}, ...],
     "n_cases": 20}

``steps`` is what :func:`apply_postprocessing` (run by ``medseg infer``) executes in order;
``decisions`` records the validation numbers behind every step tried, applied or not.
Connectivity: ``"face"`` (6-neighbourhood in 3D, 4 in 2D) or ``"full"`` (26 / 8).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.errors import PlanError

FORMAT = "medseg-postprocessing"
VERSION = 2
CLASS_OPS = ("largest_component_foreground", "largest_component", "remove_small", "fill_holes")
PROBABILITY_OPS = ("threshold", "watershed_split", "region_decode")
OPS = CLASS_OPS + PROBABILITY_OPS
METRICS = ("dice", "rand")
#: Minimum component volumes tried by :func:`decide_postprocessing` (mm^3).
SMALL_VOLUMES_MM3 = (10.0, 100.0, 1000.0)
#: Probability cuts tried for ``threshold`` (0.5 is the argmax itself).
THRESHOLDS = (0.2, 0.3, 0.35, 0.4, 0.45, 0.55, 0.6, 0.65, 0.7, 0.8)
#: Seed probabilities and minimum seed sizes (mm^3) tried for ``watershed_split``.
SEED_THRESHOLDS = (0.5, 0.7, 0.85, 0.95)
SEED_VOLUMES_MM3 = (0.0, 20.0, 100.0)


def empty_config() -> dict[str, Any]:
    """A postprocessing config that changes nothing."""
    return {"format": FORMAT, "version": VERSION, "metric": "dice", "steps": [], "decisions": []}


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


def threshold(probability: np.ndarray, value: float) -> np.ndarray:
    """Mask of the voxels whose probability exceeds ``value`` (0 < value < 1)."""
    return np.asarray(probability) > value


def region_decode(probabilities: np.ndarray, regions: Sequence[Sequence[int]]) -> np.ndarray:
    """Class indices ``(*spatial)`` of ``probabilities`` ``(classes, *spatial)`` decoded through
    nested ``regions`` (class-index lists, outer first).

    At every voxel, for each region in turn: the region's classes stay allowed if their summed
    probability exceeds that of the other classes still allowed (for the outermost region
    with background outside it: the region probability exceeds 0.5), otherwise the other
    classes do. The class is the argmax among the classes left (ties: the lowest index). A
    voxel whose allowed set would become empty (regions that are not nested) keeps the plain
    argmax.
    """
    p = np.asarray(probabilities, dtype=np.float32)
    n = p.shape[0]
    allowed = np.ones(p.shape, bool)
    for r in regions:
        member = {int(c) for c in r}
        inside = np.zeros(p.shape[1:], np.float32)
        outside = np.zeros(p.shape[1:], np.float32)
        for c in range(n):
            (inside if c in member else outside)[allowed[c]] += p[c][allowed[c]]
        in_region = inside > outside
        for c in range(n):
            allowed[c] &= in_region if c in member else ~in_region
    empty = ~allowed.any(axis=0)
    allowed[:, empty] = True
    best = np.full(p.shape[1:], -1.0, np.float32)
    out = np.zeros(p.shape[1:], np.int64)
    for c in range(n):
        better = allowed[c] & (p[c] > best)
        out[better] = c
        best[better] = p[c][better]
    return out


def watershed_split(
    probability: np.ndarray,
    spacing_mm: Sequence[float],
    seed: float,
    min_seed_mm3: float = 0.0,
) -> np.ndarray:
    """Mask of the objects grown from the seeds ``probability > seed`` over ``1 - probability``
    until they meet: everything except the one-voxel watershed lines between them.

    Seeds are the face-connected components of the seed mask at least ``min_seed_mm3`` large.
    Flooding and lines use face connectivity, so voxels of two different objects are never
    face neighbours: labelling the mask never joins two seeds. (A one-voxel line cannot
    separate objects under full connectivity, which leaks diagonally.) No seed: all False.
    """
    from skimage.segmentation import watershed

    p = np.asarray(probability, dtype=np.float32)
    seeds = remove_small(p > seed, spacing_mm, min_seed_mm3, "face")
    markers, n = ndimage.label(seeds, structure=_structure(p.ndim, "face"))
    if n == 0:
        return np.zeros(p.shape, bool)
    basins = watershed(1.0 - p, markers=markers, connectivity=1, watershed_line=True)
    return basins > 0


def _check_step(step: dict[str, Any]) -> None:
    op = step.get("op")
    if op not in OPS:
        raise PlanError(f"postprocessing step {step!r}: op must be one of {', '.join(OPS)}")
    if op == "region_decode":
        regions = step.get("regions")
        if not (
            isinstance(regions, list)
            and regions
            and all(
                isinstance(r, list) and r and all(isinstance(c, int) and c >= 1 for c in r)
                for r in regions
            )
        ):
            raise PlanError(
                f"postprocessing step {step!r} needs 'regions': lists of classes >= 1, "
                "outer region first"
            )
        return
    if op != "largest_component_foreground" and not step.get("classes"):
        raise PlanError(f"postprocessing step {step!r} needs a non-empty 'classes' list")
    if op == "remove_small" and not float(step.get("min_volume_mm3", -1)) >= 0:
        raise PlanError(f"postprocessing step {step!r} needs 'min_volume_mm3' >= 0")
    if op in ("threshold", "watershed_split") and list(step["classes"]) != [1]:
        raise PlanError(f"postprocessing step {step!r}: {op} is for two-class maps, classes [1]")
    if op == "threshold" and not 0.0 < float(step.get("value", -1)) < 1.0:
        raise PlanError(f"postprocessing step {step!r} needs 0 < 'value' < 1")
    if op == "watershed_split" and not 0.0 <= float(step.get("seed", -1)) < 1.0:
        raise PlanError(f"postprocessing step {step!r} needs 0 <= 'seed' < 1")
    if op == "watershed_split" and step.get("connectivity", "face") != "face":
        raise PlanError(f"postprocessing step {step!r}: watershed lines are face-connected only")


def needs_probabilities(config: dict[str, Any] | None) -> bool:
    """Whether ``apply_postprocessing`` needs the class probabilities for this config."""
    steps = (config or {}).get("steps", [])
    return any(s.get("op") in PROBABILITY_OPS for s in steps)


def apply_step(
    classes: np.ndarray,
    spacing_mm: Sequence[float],
    step: dict[str, Any],
    probabilities: np.ndarray | None = None,
) -> np.ndarray:
    """Apply one step to a class-index map (returns a new array). ``probabilities``
    ``(classes, *classes.shape)`` are needed by the probability steps (two classes)."""
    _check_step(step)
    conn = str(step.get("connectivity", "face"))
    op = step["op"]
    if op == "region_decode":
        regions = step["regions"]
        top = max(int(c) for r in regions for c in r)
        if probabilities is None or probabilities.shape[1:] != classes.shape:
            got = None if probabilities is None else probabilities.shape
            raise PlanError(
                f"postprocessing step {op} needs the class probabilities (classes, "
                f"{', '.join(map(str, classes.shape))}), got {got}"
            )
        if top >= probabilities.shape[0]:
            raise PlanError(
                f"postprocessing step {step!r}: class {top} is not among the "
                f"{probabilities.shape[0]} classes of the model"
            )
        return region_decode(probabilities, regions).astype(classes.dtype)
    if op in PROBABILITY_OPS:
        if probabilities is None or probabilities.shape != (2, *classes.shape):
            got = None if probabilities is None else probabilities.shape
            raise PlanError(
                f"postprocessing step {op} needs the two class probabilities of shape "
                f"{(2, *classes.shape)}, got {got}"
            )
        p1 = probabilities[1]
        if op == "threshold":
            mask = threshold(p1, float(step["value"]))
        else:
            mask = watershed_split(
                p1, spacing_mm, float(step["seed"]), float(step.get("min_seed_mm3", 0.0))
            )
        return mask.astype(classes.dtype)
    out = classes.copy()
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
    classes: np.ndarray,
    spacing_mm: Sequence[float],
    config: dict[str, Any] | None,
    probabilities: np.ndarray | None = None,
) -> np.ndarray:
    """Run the ``steps`` of a ``postprocessing.json`` config on a class-index map.

    ``classes`` holds class indices (0 = background) on a grid of ``spacing_mm`` (one value per
    array axis, mm); ``probabilities`` ``(classes, *classes.shape)`` on the same grid are needed
    only when :func:`needs_probabilities` says so. ``None`` or an empty config returns the map
    unchanged.
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
        out = apply_step(out, spacing_mm, step, probabilities)
    return out


def _score_table(
    preds: Sequence[np.ndarray],
    refs: Sequence[np.ndarray],
    num_classes: int,
    metric: str,
    regions: Sequence[Sequence[int]] = (),
) -> np.ndarray:
    """Score per case, foreground class and region ``(cases, num_classes - 1 + len(regions))``,
    higher is better: Dice, or ``1 - adapted Rand error`` of the face-connected components.
    Reference voxels of -1 are ignored."""
    from medseg.metrics import adapted_rand_error, dice

    groups = [[c] for c in range(1, num_classes)] + [list(r) for r in regions]
    out = np.zeros((len(preds), len(groups)))
    for i, (p, r) in enumerate(zip(preds, refs, strict=True)):
        valid = r >= 0
        for j, g in enumerate(groups):
            pm, rm = np.isin(p, g) & valid, np.isin(r, g) & valid
            out[i, j] = dice(pm, rm) if metric == "dice" else 1.0 - adapted_rand_error(pm, rm)
    return out


def decide_postprocessing(
    preds: list[np.ndarray],
    refs: list[np.ndarray],
    spacings: Sequence[Sequence[float]],
    num_classes: int,
    connectivity: str = "face",
    *,
    probabilities: Sequence[np.ndarray] | None = None,
    metric: str = "dice",
    regions: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Choose the postprocessing steps that improve the validation score (nnU-Net's rule).

    ``preds``/``refs``: class-index maps per validation case (ref -1 = ignored voxel),
    ``spacings``: mm per array axis for each case, ``num_classes`` including background,
    ``probabilities``: optional ``(classes, *map.shape)`` per case (the same prediction before
    its argmax), ``metric``: ``"dice"`` or ``"rand"`` (see the module docstring), ``regions``:
    named class-index lists, outer first (scored as well; with probabilities of more than two
    classes ``region_decode`` is tried first and judged on the regions alone).
    Steps are tried greedily, each on the output of the steps kept so far. With probabilities
    of a two-class problem first the best ``threshold`` of :data:`THRESHOLDS` (and, for
    ``"rand"``, of ``watershed_split`` over :data:`SEED_THRESHOLDS` x :data:`SEED_VOLUMES_MM3`);
    then the joint foreground largest component, per class the largest component, the removal
    of small components (thresholds :data:`SMALL_VOLUMES_MM3` below the smallest reference
    component of that class, the best one) and hole filling. A step is kept when the mean
    score of its class(es) strictly improves and the mean over all classes does not decrease.
    Returns the ``postprocessing.json`` content.
    """
    if metric not in METRICS:
        raise PlanError(f"postprocessing metric {metric!r} must be one of {', '.join(METRICS)}")
    if not (len(preds) == len(refs) == len(spacings)):
        raise ValueError("preds, refs and spacings must have one entry per case")
    if probabilities is not None and len(probabilities) != len(preds):
        raise ValueError("probabilities must have one entry per case")
    _structure(2, connectivity)
    current = [np.asarray(p) for p in preds]
    probs = list(probabilities) if probabilities is not None else [None] * len(current)
    region_lists = [list(map(int, r)) for r in (regions or {}).values()]
    search = _Search(
        current, [np.asarray(r) for r in refs], spacings, probs, num_classes, metric, region_lists
    )
    have_probs = bool(current) and all(q is not None for q in probs)
    if num_classes > 2 and region_lists and have_probs:
        search.keep_best([{"op": "region_decode", "regions": region_lists}], [])
    if num_classes == 2 and have_probs:
        search.keep_best(_threshold_candidates(current, probs, metric), [1])
    fg_classes = list(range(1, num_classes))
    if fg_classes and current:
        _component_steps(search, fg_classes, connectivity)
    return {
        "format": FORMAT,
        "version": VERSION,
        "metric": metric,
        "steps": search.steps,
        "decisions": search.decisions,
        "n_cases": len(preds),
    }


class _Search:
    """The greedy state of :func:`decide_postprocessing`: the predictions with the steps kept
    so far, their score table, the steps and every decision made."""

    def __init__(
        self,
        current: list[np.ndarray],
        refs: list[np.ndarray],
        spacings: Sequence[Sequence[float]],
        probs: list[Any],
        num_classes: int,
        metric: str,
        region_lists: list[list[int]],
    ) -> None:
        self.current, self.refs, self.spacings, self.probs = current, refs, spacings, probs
        self.num_classes, self.metric, self.region_lists = num_classes, metric, region_lists
        self.base = self._table(current)
        n_fg = num_classes - 1
        self.region_cols = list(range(n_fg, n_fg + len(region_lists)))
        self.steps: list[dict[str, Any]] = []
        self.decisions: list[dict[str, Any]] = []

    def _table(self, preds: list[np.ndarray]) -> np.ndarray:
        return _score_table(preds, self.refs, self.num_classes, self.metric, self.region_lists)

    def trial(self, step: dict[str, Any], scored: list[int]) -> tuple | None:
        """Score ``step`` on the current predictions and record it as not applied (yet);
        return ``(score, step, decision, predictions, table)`` when it would be kept.
        ``scored``: the foreground classes it is judged on; empty: the regions."""
        cand = [
            apply_step(p, s, step, q)
            for p, s, q in zip(self.current, self.spacings, self.probs, strict=True)
        ]
        table, base = self._table(cand), self.base
        cols = [c - 1 for c in scored] if scored else self.region_cols
        before = float(base[:, cols].mean()) if len(base) else 0.0
        after = float(table[:, cols].mean()) if len(table) else 0.0
        all_before = float(base.mean()) if base.size else 0.0
        all_after = float(table.mean()) if table.size else 0.0
        decision = {
            **step,
            "before": before,
            "after": after,
            "mean_all_before": all_before,
            "mean_all_after": all_after,
            "applied": False,
        }
        self.decisions.append(decision)
        if after > before + 1e-12 and all_after >= all_before - 1e-12:
            return after, step, decision, cand, table
        return None

    def keep_best(self, candidates: list[dict[str, Any]], scored: list[int]) -> bool:
        """Try every candidate step; keep the best one that passes the rule (if any): later
        trials start from its predictions and score table. True when one was kept."""
        kept = [t for t in (self.trial(step, scored) for step in candidates) if t is not None]
        if kept:
            _, step, decision, cand, table = max(kept, key=lambda t: t[0])
            self.steps.append(step)
            decision["applied"] = True
            self.current, self.base = cand, table
        return bool(kept)


def _threshold_candidates(
    current: list[np.ndarray], probs: list[Any], metric: str
) -> list[dict[str, Any]]:
    """Two-class problems: every threshold of :data:`THRESHOLDS`, and for ``"rand"`` every
    watershed split of :data:`SEED_THRESHOLDS` x :data:`SEED_VOLUMES_MM3`."""
    for q, p in zip(probs, current, strict=True):
        if q is None or q.shape != (2, *p.shape):
            raise ValueError(f"probabilities of shape {(2, *p.shape)} expected")
    cands: list[dict[str, Any]] = [
        {"op": "threshold", "classes": [1], "value": t} for t in THRESHOLDS
    ]
    if metric == "rand":
        cands += [
            {"op": "watershed_split", "classes": [1], "seed": seed, "min_seed_mm3": vol}
            for seed in SEED_THRESHOLDS
            for vol in SEED_VOLUMES_MM3
        ]
    return cands


def _component_steps(search: _Search, fg_classes: list[int], connectivity: str) -> None:
    """Joint foreground largest component; per class the largest component, else the removal
    of small components below the smallest reference component; then hole filling."""
    search.keep_best(
        [{"op": "largest_component_foreground", "connectivity": connectivity}], fg_classes
    )
    for c in fg_classes:
        step: dict[str, Any] = {
            "op": "largest_component",
            "classes": [c],
            "connectivity": connectivity,
        }
        if search.keep_best([step], [c]):
            continue
        smallest = _smallest_component_mm3(search.refs, search.spacings, c, connectivity)
        small = [
            {
                "op": "remove_small",
                "classes": [c],
                "min_volume_mm3": vol,
                "connectivity": connectivity,
            }
            for vol in SMALL_VOLUMES_MM3
            if vol < smallest
        ]
        search.keep_best(small, [c])
    for c in fg_classes:
        search.keep_best([{"op": "fill_holes", "classes": [c], "connectivity": connectivity}], [c])


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
