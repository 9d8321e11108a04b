"""Evaluate a cohort: pair predictions with references, compute each case's metrics as a task
(:func:`medseg.cohort.run_tasks`: in this process, local worker processes or a Dask cluster),
then write ``metrics.csv`` (tidy), ``summary.json`` and ``report.html`` once, here, from the
results in the pairs' order: the same bytes wherever the cases ran.

Pairs come from two files, two folders matched by case id (the file name without its volume
suffix), or a manifest plus a prediction folder. With a manifest, a case's ``extras["fov"]``
file (non-zero = inside) restricts the evaluation to that field of view, and its first image
is drawn under the overlay contours. A case that cannot be evaluated (missing prediction,
different grid, non-integer label file, an unexpected error such as ``MemoryError``, a worker
process that died) becomes a failure: the others are still evaluated and written, and
:func:`evaluate_cohort` returns the failures for the caller to raise ``CohortError`` at the end.

Absent classes: a class with no voxel in either the prediction or the reference of a case
(inside its field of view) is *absent* from that case. Agreement on nothing measures nothing,
so its overlap and distance metrics are NaN (volumes 0), it is counted in ``n_absent`` and left
out of every statistic and of the case's mean Dice (:data:`ABSENT_RULE`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from medseg.atomic import atomic_path, check_writable_folder, folder_lock
from medseg.cohort import CaseEvent, Where, run_tasks
from medseg.errors import GeometryError, MedsegError, ReadError
from medseg.io import VOLUME_SUFFIXES, split_suffix
from medseg.metrics import METRIC_NAMES, label_metrics
from medseg.report.views import View, cut, views_of
from medseg.volume import GRID_ATOL_MM, Grid, drop_singleton_k

DISTANCE_METRICS = ("hd", "hd95", "assd")
#: Metrics that say how well two masks agree; undefined (NaN) for a class absent from a case.
AGREEMENT_METRICS = ("dice", "iou", "precision", "recall", "hd", "hd95", "assd", "nsd")
#: The rule for classes absent from a case, as the report and summary state it.
ABSENT_RULE = (
    "A class with no voxel in either the prediction or the reference of a case is absent from "
    "that case: its metrics are not defined (NaN, shown as 'absent'), it is counted in n_absent "
    "and left out of every statistic and of the case's mean Dice, never scored as Dice 1."
)
OUTPUT_NAMES = ("metrics.csv", "summary.json", "report.html")


def case_id_of(path: Path) -> str:
    """File name without its volume suffix (``case_001.nii.gz`` -> ``case_001``)."""
    return split_suffix(path)[0]


@dataclass(frozen=True)
class EvalPair:
    """One case to evaluate: prediction and reference files (+ optional image and FOV mask)."""

    case_id: str
    pred: Path | None
    ref: Path | None
    image: Path | None = None
    fov: Path | None = None


def _volume_files(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if any(p.name.lower().endswith(s) for s in VOLUME_SUFFIXES):
            out[case_id_of(p)] = p
    return out


def pairs_from_paths(pred: Path, ref: Path) -> list[EvalPair]:
    """Pairs of two files, or of two folders matched by case id (unmatched ones included)."""
    if not ref.exists():
        raise ReadError(f"{ref}: reference file or folder does not exist")
    if not pred.exists():
        raise ReadError(f"{pred}: prediction file or folder does not exist")
    if ref.is_file() and pred.is_file():
        return [EvalPair(case_id_of(ref), pred, ref)]
    if ref.is_dir() != pred.is_dir():
        raise ReadError(f"--pred {pred} and --ref {ref} must both be files or both be folders")
    preds, refs = _volume_files(pred), _volume_files(ref)
    if not refs:
        raise ReadError(f"{ref}: no volume files (.nii.gz, .nrrd, .png, ...) in this folder")
    ids = sorted(set(refs) | set(preds))
    return [EvalPair(i, preds.get(i), refs.get(i)) for i in ids]


def pairs_from_manifest(
    manifest_path: Path, pred: Path, data_root: Path | None = None, split: str | None = None
) -> tuple[list[EvalPair], Any]:
    """Pairs for the labelled cases of a manifest (optionally one split) and the manifest."""
    from medseg.manifest import load_manifest

    m = load_manifest(manifest_path, data_root)
    if not pred.is_dir():
        raise ReadError(f"{pred}: with --manifest, --pred must be a folder of predictions")
    preds = _volume_files(pred)
    pairs = []
    for c in m.cases_of_split(split):
        if c.label is None:
            continue
        pairs.append(
            EvalPair(
                c.case_id,
                preds.get(c.case_id),
                c.label,
                c.images[0] if c.images else None,
                c.extras.get("fov"),
            )
        )
    if not pairs:
        raise ReadError(f"{manifest_path}: no labelled cases to evaluate (split {split!r})")
    return pairs, m


@dataclass(frozen=True)
class ViewSlice:
    """One picture of a case's overlay (``medseg.report.views``): reference and prediction
    masks and a float32 ``background``, all ``(rows, columns)`` with row 0 at the top."""

    view: View
    ref: np.ndarray
    pred: np.ndarray
    background: np.ndarray


@dataclass(frozen=True)
class Overlay:
    """What a case's overlay draws, cut from the arrays the evaluation read: the worst class
    ``name`` (lowest Dice) in the ``views`` that hold the most disagreeing voxels, over the
    reference labels or the first image once read (``what``), and the reference ``grid`` an
    image must share to be drawn."""

    name: str
    views: tuple[ViewSlice, ...]
    what: str
    grid: Grid


@dataclass
class CaseResult:
    """Metrics of one case per class/region name, or why it failed."""

    case_id: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str | None = None
    spacing: tuple[float, ...] = ()
    diagonal_mm: float = 0.0
    #: label values forming each class/region name
    class_values: dict[str, list[int]] = field(default_factory=dict)
    #: classes with no voxel in either map of this case (metrics NaN, see ``ABSENT_RULE``)
    absent: list[str] = field(default_factory=list)
    #: the pictures the report draws (None for failed cases)
    overlay: Overlay | None = None


def _read_label(path: Path) -> Any:
    from medseg.io import read_volume

    return read_volume(path, label=True)


def load_pair(
    pair: EvalPair, resample_pred: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple[float, ...], Any]:
    """Read and check one pair: ``(pred, ref, fov, spacing_mm, ref_grid)``, arrays (I,J[,K])."""
    if pair.ref is None:
        raise ReadError(f"{pair.case_id}: prediction {pair.pred} has no reference file")
    if pair.pred is None:
        raise ReadError(f"{pair.case_id}: no prediction file for reference {pair.ref}")
    ref = _read_label(pair.ref)
    pred = _read_label(pair.pred)
    if not pred.grid.allclose(ref.grid, GRID_ATOL_MM):
        # Same voxels in another axis order (e.g. a DICOM stack read bottom-up): a lossless
        # permutation/flip, not a resampling.
        reordered = pred.reoriented(ref.grid.orientation)
        if reordered.grid.allclose(ref.grid, GRID_ATOL_MM):
            pred = reordered
    if not pred.grid.allclose(ref.grid, GRID_ATOL_MM):
        if resample_pred:
            from medseg.resample import resample

            pred = resample(pred, ref.grid, order=0)
        else:
            try:
                ref.grid.check_same(pred.grid, GRID_ATOL_MM, f"{pair.case_id}: {pair.pred}")
            except GeometryError as exc:
                raise GeometryError(
                    f"{exc} from reference {pair.ref}; use --resample-pred to resample the "
                    "prediction onto the reference grid"
                ) from None
    fov = None
    if pair.fov is not None:
        f = _read_label(pair.fov)
        ref.grid.check_same(f.grid, GRID_ATOL_MM, f"{pair.case_id}: FOV mask {pair.fov}")
        fov = drop_singleton_k(f.array[0] != 0)
    spacing = ref.grid.spacing
    sp = spacing[:2] if ref.grid.shape[2] == 1 else spacing
    return drop_singleton_k(pred.array[0]), drop_singleton_k(ref.array[0]), fov, sp, ref.grid


def evaluate_pair(
    pair: EvalPair,
    classes: dict[str, list[int]],
    tolerance_mm: float,
    resample_pred: bool,
    discover: bool = False,
) -> CaseResult:
    """All metrics of one case (never raises for bad input: the error goes in the result).

    ``discover``: also evaluate every non-zero label value found in the pair (named by its
    value), before the given ``classes`` (e.g. regions). Empty ``classes`` implies it.
    """
    res = CaseResult(pair.case_id)
    try:
        pred, ref, fov, sp, grid = load_pair(pair, resample_pred)
        res.spacing = tuple(float(s) for s in sp)
        ext = (np.asarray(grid.shape) - 1) * np.asarray(grid.spacing)
        res.diagonal_mm = float(np.linalg.norm(ext))
        cls = dict(classes)
        if discover or not classes:
            found = np.union1d(np.unique(pred), np.unique(ref))
            cls = {str(v): [int(v)] for v in found if v != 0 and str(v) not in cls} | cls
        res.metrics = label_metrics(pred, ref, sp, cls, tolerance_mm, fov)
        res.class_values = {k: list(v) for k, v in cls.items()}
        for name, m in res.metrics.items():
            if m["vol_ref_ml"] == 0 and m["vol_pred_ml"] == 0:
                res.metrics[name] = absent_metrics(len(sp))
                res.absent.append(name)
        res.overlay = _overlay(res, pred, ref, fov, grid)
    except Exception as exc:  # one case's failure, whatever it is, must not stop the cohort
        res.error = failure_cause(exc)
        res.metrics = {}
        res.absent = []
        res.overlay = None
    return res


def failure_cause(exc: BaseException) -> str:
    """One line for a case's failure: a ``MedsegError``'s own message, else the exception's
    type and message (an unexpected error such as ``MemoryError`` or a bug)."""
    if isinstance(exc, MedsegError):
        return str(exc)
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"unexpected {type(exc).__name__}" + (f": {msg}" if msg else "")


def _overlay(
    res: CaseResult,
    pred: np.ndarray,
    ref: np.ndarray,
    fov: np.ndarray | None,
    grid: Grid,
) -> Overlay | None:
    """The worst scored class in the views with the most disagreeing voxels, over the
    reference labels (copies: the whole arrays are not kept)."""
    scored = {n: m["dice"] for n, m in res.metrics.items() if n not in res.absent}
    if not scored:
        return None
    name = min(scored, key=lambda n: scored[n])
    values = res.class_values.get(name, [])
    r, p = np.isin(ref, values), np.isin(pred, values)
    if fov is not None:
        r &= fov
        p &= fov
    bg = ref.astype(np.float32)
    slices = tuple(
        ViewSlice(v, cut(r, grid, v).copy(), cut(p, grid, v).copy(), cut(bg, grid, v).copy())
        for v in views_of(grid, r != p, r | p)
    )
    return Overlay(name, slices, "label", grid)


def overlay_with_image(overlay: Overlay, image: Path | None) -> Overlay:
    """``overlay`` drawn over the same views of ``image``'s first channel when that file
    shares the reference grid (within ``GRID_ATOL_MM``); else unchanged. Raises
    ``MedsegError`` or ``OSError`` when the image cannot be read."""
    from medseg.io import read_volume

    if image is None:
        return overlay
    img = read_volume(image)
    if not img.grid.allclose(overlay.grid, GRID_ATOL_MM):
        return overlay
    a = drop_singleton_k(img.array[0])
    views = tuple(
        dataclasses.replace(v, background=np.asarray(cut(a, overlay.grid, v.view)))
        for v in overlay.views
    )
    return dataclasses.replace(overlay, views=views, what="image")


def report_overlays(
    ranked: list[CaseResult], pairs: dict[str, EvalPair], worst_n: int
) -> list[tuple[CaseResult, Overlay | str]]:
    """The first ``worst_n`` evaluated cases of ``ranked`` with their overlay (over the
    pair's image where it has one), or why it is unavailable."""
    out: list[tuple[CaseResult, Overlay | str]] = []
    for r in [r for r in ranked if r.error is None and r.overlay is not None][:worst_n]:
        assert r.overlay is not None
        try:
            out.append((r, overlay_with_image(r.overlay, pairs[r.case_id].image)))
        except (MedsegError, OSError) as exc:
            out.append((r, str(exc)))
    return out


# -- aggregation -------------------------------------------------------------------------------
def absent_metrics(ndim: int) -> dict[str, float]:
    """Metrics of a class absent from a case: agreement undefined (NaN), volumes 0 mL."""
    out = dict.fromkeys(AGREEMENT_METRICS, math.nan)
    if ndim not in (2, 3):
        del out["nsd"]  # as all_metrics: NSD exists for 2D and 3D only
    return out | {"vol_ref_ml": 0.0, "vol_pred_ml": 0.0, "vol_diff_ml": 0.0}


def fill_absent_classes(results: list[CaseResult]) -> list[str]:
    """Class names over all cases; a class a case did not score (a value found only in other
    cases) is absent from it."""
    names: list[str] = []
    for r in results:
        for n in r.metrics:
            if n not in names:
                names.append(n)
    for r in results:
        if r.error is None:
            for n in names:
                if n not in r.metrics:
                    r.metrics[n] = absent_metrics(len(r.spacing))
                    r.absent.append(n)
    return names


def summarise(results: list[CaseResult], names: list[str]) -> dict[str, Any]:
    """Per class and metric: mean, std, median, IQR, min, max, n, empties, infinities and
    ``n_absent`` (cases without the class, left out of the statistics: ``ABSENT_RULE``)."""
    ok = [r for r in results if r.error is None]
    inf_mm = max([r.diagonal_mm for r in ok], default=0.0)
    out: dict[str, Any] = {}
    for name in names:
        n_absent = sum(1 for r in ok if name in r.absent)
        rows = [r.metrics[name] for r in ok if name in r.metrics and name not in r.absent]
        per: dict[str, Any] = {}
        n_empty_ref = sum(1 for m in rows if m["vol_ref_ml"] == 0)
        n_empty_pred = sum(1 for m in rows if m["vol_pred_ml"] == 0)
        metric_names = [k for k in METRIC_NAMES if any(k in m for m in rows)]
        for k in metric_names:
            vals = np.array([m[k] for m in rows if k in m], dtype=np.float64)
            fin = vals[np.isfinite(vals)]
            st: dict[str, Any] = {
                "n": int(vals.size),
                "n_absent": n_absent,
                "n_empty_ref": n_empty_ref,
                "n_empty_pred": n_empty_pred,
                "n_inf": int(np.count_nonzero(np.isinf(vals))),
            }
            if fin.size:
                q25, med, q75 = np.percentile(fin, [25, 50, 75])
                st |= {
                    "mean": float(fin.mean()),
                    "std": float(fin.std()),
                    "median": float(med),
                    "iqr": float(q75 - q25),
                    "q25": float(q25),
                    "q75": float(q75),
                    "min": float(fin.min()),
                    "max": float(fin.max()),
                }
            else:
                st |= dict.fromkeys(("mean", "std", "median", "iqr", "q25", "q75", "min", "max"))
            if k in DISTANCE_METRICS and st["n_inf"]:
                # stated worst case: the largest scan diagonal of the cohort
                st["inf_replaced_by_mm"] = inf_mm
                st["mean_inf_replaced"] = float(np.where(np.isinf(vals), inf_mm, vals).mean())
            st["note"] = "statistics over finite values; n_inf cases counted apart"
            per[k] = st
        out[name] = per or {"dice": _no_stats(n_absent)}
    return out


def _no_stats(n_absent: int) -> dict[str, Any]:
    """The Dice entry of a class absent from every evaluated case: no value to summarise."""
    st: dict[str, Any] = {"n": 0, "n_absent": n_absent, "n_empty_ref": 0, "n_empty_pred": 0}
    st |= {"n_inf": 0} | dict.fromkeys(("mean", "std", "median", "iqr", "q25", "q75", "min", "max"))
    return st | {"note": "absent from every evaluated case: nothing to score"}


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(float(v))


def metrics_csv(results: list[CaseResult], names: list[str]) -> str:
    """Tidy CSV: one row per case, class and metric (``inf`` written as ``inf``); the
    ``absent`` column is ``true`` for a class absent from the case (its values ``nan``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", "class", "metric", "value", "absent"])
    for r in results:
        if r.error is not None:
            continue
        for name in names:
            absent = "true" if name in r.absent else "false"
            for k, v in r.metrics.get(name, {}).items():
                w.writerow([r.case_id, name, k, _fmt(v), absent])
    return buf.getvalue()


def case_score(r: CaseResult) -> float:
    """Ranking key, worst first: failures, then the lowest mean Dice over the classes present
    (1 when every class is absent: nothing disagrees)."""
    if r.error is not None or not r.metrics:
        return -1.0
    dice = [m["dice"] for n, m in r.metrics.items() if n not in r.absent]
    return float(np.mean(dice)) if dice else 1.0


@dataclass
class CohortResult:
    results: list[CaseResult]
    names: list[str]
    summary: dict[str, Any]
    failures: dict[str, str]


def parse_classes(
    labels: str | None,
    regions: str | None,
    manifest_labels: dict[int, str] | None,
    manifest_regions: dict[str, list[int]] | None,
) -> dict[str, list[int]]:
    """``--labels 1,2`` or ``liver,tumour`` and ``--regions whole=1,2,3;core=1,3`` -> names."""
    out: dict[str, list[int]] = {}
    names = dict(manifest_labels or {})
    by_name = {v: k for k, v in names.items()}
    if labels:
        for tok in [t.strip() for t in labels.split(",") if t.strip()]:
            if tok.lstrip("-").isdigit():
                v = int(tok)
                out[names.get(v, str(v))] = [v]
            elif tok in by_name:
                out[tok] = [by_name[tok]]
            else:
                raise ReadError(
                    f"--labels: {tok!r} is neither a label value nor a label name "
                    f"({', '.join(map(str, by_name)) or 'no names known without --manifest'})"
                )
    elif names:
        out = {n: [v] for v, n in sorted(names.items())}
    regs = dict(manifest_regions or {})
    if regions:
        for part in [p.strip() for p in regions.split(";") if p.strip()]:
            name, _, vals = part.partition("=")
            try:
                regs[name.strip()] = [int(v) for v in vals.split(",") if v.strip()]
            except ValueError:
                raise ReadError(
                    f"--regions: {part!r} must look like NAME=1,2,3 (regions separated by ;)"
                ) from None
            if not name.strip() or not regs[name.strip()]:
                raise ReadError(f"--regions: {part!r} must look like NAME=1,2,3")
    for rname, rvals in regs.items():
        out[rname if rname not in out else f"region:{rname}"] = list(rvals)
    return out


def evaluate_cohort(
    pairs: Sequence[EvalPair],
    out_dir: Path,
    classes: dict[str, list[int]],
    tolerance_mm: float = 2.0,
    resample_pred: bool = False,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    title: str = "medseg evaluation",
    settings: dict[str, Any] | None = None,
    worst_n: int = 6,
    discover: bool = False,
    where: Where | None = None,
    on_event: Callable[[CaseEvent], None] | None = None,
    evaluate: Callable[..., CaseResult] | None = None,
) -> CohortResult:
    """Evaluate every pair and write ``metrics.csv``, ``summary.json``, ``report.html``.

    Cases run where ``where`` says (default: ``workers`` local processes when more than one,
    else this process); ``on_event`` gets each case's :class:`~medseg.cohort.CaseEvent`,
    ``progress`` ``(done, total)``. ``evaluate`` replaces :func:`evaluate_pair` (a
    module-level function taking the same arguments).

    ``out_dir`` is checked for writing before any case is read and locked
    (``medseg.atomic.folder_lock``) until the three files are written, together: a failure
    while writing (disk full) leaves none of them, or the previous ones. Failures of cases do
    not stop the others; they are returned in ``CohortResult.failures`` and listed in the
    summary and report.
    """
    check_writable_folder(out_dir)
    if where is None:
        where = Where(workers=workers) if workers > 1 and len(pairs) > 1 else Where()
    with folder_lock(out_dir, "medseg evaluate"):
        job = partial(evaluate or evaluate_pair, classes=classes, tolerance_mm=tolerance_mm,
                      resample_pred=resample_pred, discover=discover)  # fmt: skip
        results = _run_cases(pairs, job, where, _events(progress, on_event))
        names = fill_absent_classes(results)
        failures = {r.case_id: str(r.error) for r in results if r.error is not None}
        summary = _summary(results, names, classes, discover, title, tolerance_mm, settings)
        from medseg.report.html import render_report

        ranked = sorted(results, key=case_score)
        overlays = report_overlays(ranked, {p.case_id: p for p in pairs}, worst_n)
        texts = (
            metrics_csv(results, names),
            json.dumps(_json_safe(summary), indent=2, default=str) + "\n",
            render_report(summary, ranked, names, overlays),
        )
        _write_together(out_dir, dict(zip(OUTPUT_NAMES, texts, strict=True)))
    return CohortResult(results, names, summary, failures)


def _summary(
    results: list[CaseResult],
    names: list[str],
    classes: dict[str, list[int]],
    discover: bool,
    title: str,
    tolerance_mm: float,
    settings: dict[str, Any] | None,
) -> dict[str, Any]:
    """The content of ``summary.json`` (non-finite floats still as floats)."""
    ok = [r for r in results if r.error is None]
    failures = {r.case_id: str(r.error) for r in results if r.error is not None}
    values: dict[str, list[int] | None] = {n: classes.get(n) for n in names}
    for r in ok:
        for n, v in r.class_values.items():
            values[n] = values.get(n) or v
    absent_everywhere = [n for n in names if ok and all(n in r.absent for r in ok)]
    return {
        "title": title,
        "n_cases": len(results),
        "n_evaluated": len(ok),
        "n_failed": len(failures),
        "failures": failures,
        "classes": values,
        "classes_rule": classes_rule(discover, bool(classes)),
        "absent_rule": ABSENT_RULE,
        "absent_everywhere": absent_everywhere,
        "tolerance_mm": tolerance_mm,
        "settings": settings or {},
        "metrics": summarise(results, names),
    }


def classes_rule(discover: bool, named: bool) -> str:
    """Which classes were scored, in one sentence for the summary and report."""
    if discover:
        found = (
            "every non-zero label value found in the predictions or references (no --labels "
            "and no manifest labels given); label value 0 is background and not scored"
        )
        return f"Classes scored: {found}" + (", plus the regions given." if named else ".")
    return (
        "Classes scored: the labels named by --labels or the manifest (label value 0 "
        "included where it is named) and the regions given."
    )


def _pair_id(pair: EvalPair) -> str:
    return pair.case_id


def _events(
    progress: Callable[[int, int], None] | None, on_event: Callable[[CaseEvent], None] | None
) -> Callable[[CaseEvent], None]:
    def tell(event: CaseEvent) -> None:
        if progress is not None and event.status != "retry":
            progress(event.done, event.total)
        if on_event is not None:
            on_event(event)

    return tell


def _run_cases(
    pairs: Sequence[EvalPair],
    job: Callable[[EvalPair], CaseResult],
    where: Where,
    on_event: Callable[[CaseEvent], None],
) -> list[CaseResult]:
    """``job(pair)`` of every pair as a task, results in the pairs' order. A case whose
    worker process dies (killed, out of memory) runs once more elsewhere; if it dies again,
    or fails outside ``job``'s own handling, it becomes a failed :class:`CaseResult`."""
    out = run_tasks(job, pairs, key=_pair_id, where=where, stage="evaluate", on_event=on_event)
    results = []
    for p in pairs:
        if p.case_id in out.results:
            results.append(out.results[p.case_id])
        else:
            results.append(CaseResult(p.case_id, error=out.failures[p.case_id]))
    return results


def _write_together(out_dir: Path, texts: dict[str, str]) -> None:
    """Write every ``name: text`` to temporaries in ``out_dir`` first and rename them into
    place only once all are written: a failure (disk full) leaves none of the new files, and
    the previous ones untouched."""
    with contextlib.ExitStack() as stack:
        tmps = {name: stack.enter_context(atomic_path(out_dir / name)) for name in texts}
        for name, text in texts.items():
            tmps[name].write_bytes(text.encode("utf-8"))


def _json_safe(obj: Any) -> Any:
    """Replace non-finite floats by strings ("inf"), which JSON cannot hold."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def default_workers() -> int:
    """Worker processes when ``--workers`` is not given: the CPUs, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))
