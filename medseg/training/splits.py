"""Which cached cases train and which validate: seeded k-fold splits saved once beside the
cache (``PREP/splits.json``), ``--fold all`` and ``--fold manifest`` (no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg import atomic
from medseg.config import Pipeline
from medseg.errors import PlanError

SPLITS_FILE = "splits.json"


def make_splits(case_ids: Sequence[str], n_folds: int = 5, seed: int = 12345) -> list[dict]:
    """Seeded k-fold split of sorted case ids: ``[{"train": [...], "val": [...]}, ...]``.

    ``n_folds`` shrinks to the number of cases when there are fewer.
    """
    ids = sorted(case_ids)
    k = min(n_folds, len(ids))
    if k < 2:
        return []
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = [sorted(ids[i] for i in order[f::k]) for f in range(k)]
    return [{"train": sorted(set(ids) - set(val)), "val": val} for val in folds]


def load_or_create_splits(
    prep_dir: Path, case_ids: Sequence[str], n_folds: int, seed: int, write: bool = True
) -> list[dict]:
    """The fold split saved once in ``PREP/splits.json`` (created on first use)."""
    path = Path(prep_dir) / SPLITS_FILE
    if path.is_file():
        import json

        try:
            splits = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PlanError(f"{path}: unreadable ({exc}); delete it to draw a new split") from exc
        known = {c for s in splits for c in s.get("val", [])}
        missing = sorted(set(case_ids) - known)
        if missing:
            raise PlanError(
                f"{path}: cases {missing[:5]} are in no fold (the cache changed); "
                "delete splits.json to draw a new split"
            )
        return list(splits)
    splits = make_splits(case_ids, n_folds, seed)
    if write:
        atomic.write_json(path, splits)
    return splits


def fold_cases(
    splits: list[dict], fold: int | str, case_ids: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Training and validation case ids of ``fold`` (``"all"``: everything, no validation)."""
    if str(fold) == "all":
        return sorted(case_ids), []
    if str(fold) == "manifest":
        raise PlanError("--fold manifest needs the pipeline's manifest; use train()")
    try:
        k = int(fold)
    except (TypeError, ValueError) as exc:
        raise PlanError(f"--fold {fold!r} must be an integer or 'all'") from exc
    if not splits:
        raise PlanError(
            f"--fold {k}: only {len(case_ids)} case(s) in the cache, too few for folds; "
            "use --fold all"
        )
    if not 0 <= k < len(splits):
        raise PlanError(f"--fold {k} out of range: the split has {len(splits)} folds (0..)")
    return list(splits[k]["train"]), list(splits[k]["val"])


def manifest_split(pipeline: Pipeline, case_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--fold manifest``: the manifest's own ``split`` field ("val"/"validation" validate,
    "test" cases are left out, everything else trains)."""
    from medseg.manifest import load_manifest

    if pipeline.manifest is None:
        raise PlanError(f"{pipeline.path}: --fold manifest needs a manifest in the pipeline")
    split = {c.case_id: (c.split or "train") for c in load_manifest(pipeline.manifest).cases}
    val = sorted(c for c in case_ids if split.get(c) in ("val", "validation"))
    train = sorted(
        c for c in case_ids if split.get(c, "train") not in ("val", "validation", "test")
    )
    if not val or not train:
        raise PlanError(
            f"{pipeline.manifest}: --fold manifest needs cases with split 'train' and 'val'"
        )
    return train, val


def list_cached_cases(prep_dir: Path) -> list[str]:
    """Case ids of a preprocessed folder, which must hold ``plan.json`` and at least one case."""
    from medseg.preprocess.cache import list_cases

    if not (prep_dir / "plan.json").is_file():
        raise PlanError(f"{prep_dir}: no plan.json; run medseg preprocess first (or pass --prep)")
    ids = list(list_cases(prep_dir))
    if not ids:
        raise PlanError(f"{prep_dir}: no cached cases; run medseg preprocess first")
    return ids
