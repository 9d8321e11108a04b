"""``medseg preprocess`` over a whole manifest: fingerprint, plan, then every case into the cache.

Cases run in worker processes (``workers``); each finished case is written atomically, so an
interrupted run resumes where it stopped, and a rerun skips cases whose inputs, plan and options
are unchanged. A case that fails (unreadable file, undeclared label values, image/label grids
that differ, NaN voxels) is reported at the end; the others finish and ``CohortError`` is raised.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
    """The pipeline TOML's ``[preprocess]`` section."""

    workers: int = 1
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
            workers=int(d.get("workers", 1)),
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


def _describe(exc: BaseException) -> str:
    from medseg.errors import MedsegError

    return str(exc) if isinstance(exc, MedsegError) else f"{type(exc).__name__}: {exc}"


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


def _run(
    jobs: list[tuple[str, Callable[..., Any], tuple[Any, ...]]],
    workers: int,
    on_done: Callable[[str, Any, BaseException | None], None],
) -> None:
    """Run ``(key, fn, args)`` jobs in ``workers`` processes (in-process when 1)."""
    if workers <= 1:
        for key, fn, args in jobs:
            try:
                res = fn(*args)
            except Exception as exc:  # noqa: BLE001 - a cohort finishes the other cases
                on_done(key, None, exc)
            else:
                on_done(key, res, None)
        return
    with ProcessPoolExecutor(workers) as pool:
        futures: dict[Future[Any], str] = {pool.submit(fn, *args): key for key, fn, args in jobs}

        for fut in as_completed(futures):
            error = fut.exception()
            on_done(futures[fut], None if error else fut.result(), error)


def preprocess_cohort(
    manifest: Any,
    prep_dir: str | Path,
    *,
    plan_overrides: dict[str, Any] | None = None,
    options: Options | None = None,
    overwrite: bool = False,
    source: str = "pipeline [plan]",
    report: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] | None = None,
) -> CohortResult:
    """Fingerprint ``manifest``, write ``plan.json`` and every case under ``prep_dir``.

    ``report`` gets one line per finished case (with its seconds); ``progress(stage, done,
    total)`` drives a progress bar. Raises ``CohortError`` listing failed cases at the end.
    """
    opts = options or Options()
    prep = Path(prep_dir)
    (prep / "cases").mkdir(parents=True, exist_ok=True)
    declared = sorted(manifest.labels) if manifest.labels else None
    binary = bool(opts.border_weights and opts.border_weights["instances"] == "label")
    if binary:
        declared = None
    cases = list(manifest.cases)
    failures: dict[str, str] = {}
    case_fps: dict[str, CaseFingerprint] = {}
    samples: dict[str, list[np.ndarray]] = {}

    fp_jobs = [
        (c.case_id, _fingerprint_job, (c, declared, opts.fingerprint_samples, binary))
        for c in cases
    ]

    def fp_done(key: str, res: Any, exc: BaseException | None) -> None:
        if exc is not None:
            failures[key] = _describe(exc)
        else:
            case_fps[key] = CaseFingerprint.from_json(res[0])
            samples[key] = res[1]
        if progress:
            progress("fingerprint", len(case_fps) + len(failures), len(cases))

    _run(fp_jobs, opts.workers, fp_done)
    ordered = [case_fps[c.case_id] for c in cases if c.case_id in case_fps]
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
        channel_stats=channel_stats(list(manifest.channels), [samples[c.case_id] for c in ordered]),
    )
    fp.save(prep / "fingerprint.json")
    for w in fp.warnings:
        report(f"warning: {w}")
    plan = make_plan(fp, plan_overrides, memory_budget_gb=opts.memory_budget_gb, source=source)
    plan.save(prep / "plan.json")
    result = CohortResult(plan=plan, failures=failures)

    from medseg.preprocess import cache

    settings = {"plan": plan.to_json(), "border_weights": opts.border_weights}
    threads = 1 if opts.workers > 1 else None
    jobs = []
    for c in cases:
        if c.case_id in failures:
            continue
        digest = cache.input_hash(_case_files(c), settings)
        if not overwrite and cache.is_current(prep, c.case_id, digest):
            result.skipped.append(c.case_id)
            continue
        jobs.append(
            (
                c.case_id,
                _preprocess_job,
                # one thread per worker process when several run side by side
                (c, plan.to_json(), str(prep), opts.border_weights, digest, threads),
            )
        )
    total = len(jobs)
    if result.skipped:
        report(f"{len(result.skipped)} case(s) up to date, skipped")

    def done(key: str, res: Any, exc: BaseException | None) -> None:
        if exc is not None:
            failures[key] = _describe(exc)
            report(f"{key}: FAILED")
        else:
            result.done[key] = float(res)
            report(f"{key}: {res:.2f} s")
        if progress:
            progress("preprocess", len(result.done) + len(failures) - len(fp_failed), total)

    fp_failed = set(failures)
    _run(jobs, opts.workers, done)
    if failures:
        raise CohortError(
            f"{len(failures)} of {len(cases)} case(s) failed; the others are in {prep}", failures
        )
    return result


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
