"""``medseg preprocess`` over a whole manifest: fingerprint, plan, then every case into the cache.

Cases run as tasks through :func:`medseg.cohort.run_tasks`: in this process, in local worker
processes (``workers``) or on a Dask cluster, with identical results. Each finished case is
written atomically, so an interrupted run resumes where it stopped, and a rerun skips cases whose
inputs, plan and options are unchanged. The fingerprint aggregates cases in manifest order,
never in the order they finished. A case that fails (unreadable file, undeclared label values,
image/label grids that differ, NaN voxels) is reported at the end; the others finish and
``CohortError`` is raised.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from medseg.atomic import check_writable_folder, folder_lock
from medseg.cohort import CaseEvent, Where, run_tasks
from medseg.errors import CohortError, PlanError
from medseg.preprocess.fingerprint import (
    SAMPLES_PER_CASE,
    CaseFingerprint,
    Fingerprint,
    channel_stats,
    fingerprint_case,
)
from medseg.preprocess.plan import MEMORY_BUDGET_GB, Plan, make_plan

_OPTIONS = {"workers", "memory_budget_gb", "border_weights", "fingerprint_samples"}
_BORDER_KEYS = {"w0", "sigma", "instances", "class_balance"}


@dataclass(frozen=True)
class Options:
    """The pipeline TOML's ``[preprocess]`` section (``workers``: local worker processes,
    None runs the cases in this process)."""

    workers: int | None = None
    memory_budget_gb: float = MEMORY_BUDGET_GB
    border_weights: dict[str, Any] | None = None
    fingerprint_samples: int = SAMPLES_PER_CASE

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "[preprocess]") -> Options:
        unknown = sorted(set(d) - _OPTIONS)
        if unknown:
            raise PlanError(
                f"{source}: unknown [preprocess] keys {unknown}; allowed {sorted(_OPTIONS)}"
            )
        bw = d.get("border_weights")
        if bw is True:
            bw = {}
        if bw is False:
            bw = None
        if bw is not None:
            if not isinstance(bw, dict) or set(bw) - _BORDER_KEYS:
                raise PlanError(f"{source}: border_weights takes {sorted(_BORDER_KEYS)}")
            bw = {"w0": 10.0, "sigma": 5.0, "instances": "components", "class_balance": True, **bw}
            if bw["instances"] not in ("components", "label"):
                raise PlanError(f"{source}: border_weights.instances must be components or label")
        return cls(
            workers=int(d["workers"]) if "workers" in d else None,
            memory_budget_gb=float(d.get("memory_budget_gb", MEMORY_BUDGET_GB)),
            border_weights=bw,
            fingerprint_samples=int(d.get("fingerprint_samples", SAMPLES_PER_CASE)),
        )


@dataclass
class CohortResult:
    plan: Plan
    done: dict[str, float] = field(default_factory=dict)  # case -> seconds
    skipped: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)


def _read(case: Any, instances_from_label: bool = False):
    from medseg.io import read_volume

    images = [read_volume(p) for p in case.images]
    for v, p in zip(images, case.images, strict=True):
        v.meta.setdefault("source", str(p))
    label = None
    if case.label is not None:
        label = read_volume(case.label, label=True, reference=case.images[0])
        label.meta.setdefault("source", str(case.label))
    return images, label


def _case_files(case: Any) -> list[Path]:
    return [Path(p) for p in case.images] + ([Path(case.label)] if case.label else [])


def _fingerprint_job(case: Any, declared: list[int] | None, samples: int, binary: bool):
    images, label = _read(case)
    if label is not None and binary:
        label = label.with_array((label.array > 0).astype(np.uint8))
    fp, picked = fingerprint_case(case.case_id, images, label, declared=declared, samples=samples)
    return fp.to_json(), picked


def _preprocess_job(
    case: Any,
    plan_json: dict[str, Any],
    prep_dir: str,
    border: dict[str, Any] | None,
    digest: str,
    threads: int | None = None,
) -> float:
    from medseg.preprocess import cache
    from medseg.preprocess.pipeline import prepare_instances, preprocess_case
    from medseg.preprocess.weights import border_weights

    t0 = time.perf_counter()
    plan = Plan.from_json(plan_json)
    images, label = _read(case)
    inst_vol = None
    if label is not None and border is not None and border["instances"] == "label":
        inst_vol = label
        fg = np.where(label.array > 0, plan.label_values[1], plan.label_values[0])
        label = label.with_array(fg.astype(np.int32))
    prepared = preprocess_case(images, plan, label, threads=threads)
    lab = prepared.label.array if prepared.label is not None else None
    weights = locations = None
    if lab is not None:
        locations = cache.sample_locations(lab[0], plan.num_classes, case.case_id)
        if border is not None:
            inst = prepare_instances(inst_vol, prepared.record) if inst_vol is not None else None
            weights = border_weights(
                lab[0],
                inst,
                w0=border["w0"],
                sigma=border["sigma"],
                class_balance=bool(border.get("class_balance", True)),
            )[None]
    cache.write_case(
        prep_dir,
        case.case_id,
        image=prepared.image.array,
        label=lab,
        weights=weights,
        locations=locations,
        record=prepared.record,
        digest=digest,
    )
    return time.perf_counter() - t0


def preprocess_cohort(
    manifest: Any,
    prep_dir: str | Path,
    *,
    plan_overrides: dict[str, Any] | None = None,
    options: Options | None = None,
    overwrite: bool = False,
    source: str = "pipeline [plan]",
    report: Callable[[str], None] = print,
    where: Where | None = None,
    on_event: Callable[[CaseEvent], None] | None = None,
    lock_held: bool = False,
) -> CohortResult:
    """Fingerprint ``manifest``, write ``plan.json`` and every case under ``prep_dir``.

    ``where`` says where cases run (default: ``options.workers`` local processes, or this
    process); ``on_event`` gets every case's :class:`~medseg.cohort.CaseEvent` (a progress
    bar), ``report`` other lines (warnings, skipped count). Raises ``CohortError`` listing the
    failed cases at the end, after the others are written. ``prep_dir`` is checked for writing
    before any case is read and locked while it is written (``LockError`` names the holder),
    unless ``lock_held``: the caller holds that lock already (the command line, whose log
    lives in the folder).
    """
    prep = Path(prep_dir)
    check_writable_folder(prep)
    lock = contextlib.nullcontext() if lock_held else folder_lock(prep, "medseg preprocess")
    with lock:
        return _preprocess_locked(
            manifest, prep, plan_overrides, options or Options(), overwrite, source, report,
            where, on_event,
        )  # fmt: skip


def _preprocess_locked(
    manifest: Any,
    prep: Path,
    plan_overrides: dict[str, Any] | None,
    opts: Options,
    overwrite: bool,
    source: str,
    report: Callable[[str], None],
    where: Where | None,
    on_event: Callable[[CaseEvent], None] | None,
) -> CohortResult:
    where = where or Where(workers=opts.workers)
    cases = list(manifest.cases)
    fp, failures = _fingerprint(manifest, cases, opts, where, on_event)
    fp.save(prep / "fingerprint.json")
    for w in fp.warnings:
        report(f"warning: {w}")
    plan = make_plan(fp, plan_overrides, memory_budget_gb=opts.memory_budget_gb, source=source)
    plan.save(prep / "plan.json")
    result = CohortResult(plan=plan, failures=failures)

    from medseg.preprocess import cache

    settings = {"plan": plan.to_json(), "border_weights": opts.border_weights}
    todo = [c for c in cases if c.case_id not in failures]
    digests = {c.case_id: cache.input_hash(_case_files(c), settings) for c in todo}
    # one thread per worker when cases run side by side, unless the caller sets it
    threads = where.threads if where.threads is not None else (1 if where.parallel else None)
    job = partial(_case_job, plan_json=plan.to_json(), prep_dir=str(prep),
                  border=opts.border_weights, digests=digests, threads=threads)  # fmt: skip
    out = run_tasks(
        job,
        todo,
        key=_case_id,
        where=where,
        finished=None if overwrite else partial(_is_current, prep, digests),
        stage="preprocess",
        on_event=on_event,
    )
    result.skipped = out.skipped
    result.done = {k: float(v) for k, v in out.results.items()}
    failures.update(out.failures)
    if result.skipped:
        report(f"{len(result.skipped)} case(s) up to date, skipped")
    if failures:
        kept = len(result.done) + len(result.skipped)
        where_rest = f"the other {kept} are in {prep}" if kept else "no case was written"
        raise CohortError(f"{len(failures)} of {len(cases)} case(s) failed; {where_rest}", failures)
    return result


def _case_id(case: Any) -> str:
    return str(case.case_id)


def _is_current(prep: Path, digests: dict[str, str], case: Any) -> bool:
    from medseg.preprocess import cache

    return cache.is_current(prep, case.case_id, digests[case.case_id])


def _case_job(case: Any, *, digests: dict[str, str], **kw: Any) -> float:
    return _preprocess_job(case, digest=digests[case.case_id], **kw)


def _fingerprint(
    manifest: Any,
    cases: list[Any],
    opts: Options,
    where: Where,
    on_event: Callable[[CaseEvent], None] | None,
) -> tuple[Fingerprint, dict[str, str]]:
    """The data set fingerprint from every readable case, aggregated in manifest order."""
    declared = sorted(manifest.labels) if manifest.labels else None
    binary = bool(opts.border_weights and opts.border_weights["instances"] == "label")
    if binary:
        declared = None
    job = partial(_fingerprint_job, declared=declared, samples=opts.fingerprint_samples,
                  binary=binary)  # fmt: skip
    out = run_tasks(job, cases, key=_case_id, where=where, stage="fingerprint", on_event=on_event)
    ordered = [CaseFingerprint.from_json(out.results[c.case_id][0]) for c in cases
               if c.case_id in out.results]  # fmt: skip
    fp = Fingerprint(
        name=manifest.name,
        channels=list(manifest.channels),
        modalities=manifest.modalities,
        labels=(
            (manifest.labels if manifest.labels and len(manifest.labels) == 2 else None)
            or {0: "background", 1: "foreground"}
            if binary
            else manifest.labels
        ),
        regions=manifest.regions,
        cases=ordered,
        channel_stats=channel_stats(
            list(manifest.channels), [out.results[f.case_id][1] for f in ordered]
        ),
    )
    return fp, dict(out.failures)


def summary(prep_dir: str | Path) -> dict[str, Any]:
    """Plan headline of a cache (for printing)."""
    plan = json.loads((Path(prep_dir) / "plan.json").read_text())
    keys: Iterable[str] = (
        "spatial_dims",
        "target_spacing",
        "patch_output_size",
        "tile_output_size",
        "margin",
    )
    return {k: plan[k] for k in keys} | {"depth": plan["network"]["depth"]}
