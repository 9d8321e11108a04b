"""Evaluate a cohort: pair predictions with references, compute metrics in parallel, write
``metrics.csv`` (tidy), ``summary.json`` and ``report.html``.

Pairs come from two files, two folders matched by case id (the file name without its volume
suffix), or a manifest plus a prediction folder. With a manifest, a case's ``extras["fov"]``
file (non-zero = inside) restricts the evaluation to that field of view, and its first image
is drawn under the overlay contours. A case that cannot be evaluated (missing prediction,
different grid, non-integer label file, ...) becomes a failure: the others are still evaluated
and written, and :func:`evaluate_cohort` returns the failures for the caller to raise
``CohortError`` at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.atomic import write_json, write_text
from medseg.errors import GeometryError, MedsegError, ReadError
from medseg.io import VOLUME_SUFFIXES, split_suffix
from medseg.metrics import METRIC_NAMES, label_metrics
from medseg.volume import GRID_ATOL_MM, Grid, drop_singleton_k

DISTANCE_METRICS = ("hd", "hd95", "assd")


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
    for c in m.cases:
        if c.label is None or (split is not None and c.split != split):
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
class OverlaySlice:
    """What a case's overlay draws, cut from the arrays the evaluation read: the worst class
    ``name`` (lowest Dice) on slice ``k`` of the last axis (0 for 2D), reference and
    prediction masks ``(I, J)``, a float32 ``background`` ``(I, J)`` (the reference labels, or
    the first image once read: ``what``), the pixel ``aspect`` (J spacing / I spacing) and the
    reference ``grid`` an image must share to be drawn."""

    name: str
    k: int
    ref: np.ndarray
    pred: np.ndarray
    background: np.ndarray
    what: str
    aspect: float
    grid: Grid


@dataclass
class CaseResult:
    """Metrics of one case per class/region name, or why it failed."""

    case_id: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str | None = None
    spacing: tuple[float, ...] = ()
    diagonal_mm: float = 0.0
    #: per class: index along the last axis of the slice with the most disagreeing voxels
    worst_slice: dict[str, int] = field(default_factory=dict)
    #: label values forming each class/region name
    class_values: dict[str, list[int]] = field(default_factory=dict)
    #: the slice the report draws (None for failed cases)
    overlay: OverlaySlice | None = None


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
        for name, values in cls.items():
            err = np.isin(pred, values) != np.isin(ref, values)
            if fov is not None:
                err &= fov
            if err.ndim == 3:
                res.worst_slice[name] = int(np.argmax(err.sum(axis=(0, 1))))
            else:
                res.worst_slice[name] = 0
        res.overlay = _overlay_slice(res, pred, ref, sp, grid)
    except MedsegError as exc:
        res.error = str(exc)
        res.metrics = {}
        res.overlay = None
    return res


def _overlay_slice(
    res: CaseResult, pred: np.ndarray, ref: np.ndarray, sp: tuple[float, ...], grid: Grid
) -> OverlaySlice | None:
    """The worst class's worst slice of ``pred`` and ``ref`` (copies: the whole arrays are not
    kept), over the reference labels."""
    if not res.metrics:
        return None
    name = min(res.metrics, key=lambda n: res.metrics[n]["dice"])
    classes = res.class_values.get(name, [])
    k = res.worst_slice.get(name, 0)
    ref_s, pred_s = (ref[..., k], pred[..., k]) if ref.ndim == 3 else (ref, pred)
    return OverlaySlice(
        name,
        k,
        np.isin(ref_s, classes),
        np.isin(pred_s, classes),
        ref_s.astype(np.float32),
        "label",
        sp[1] / sp[0],
        grid,
    )


def overlay_with_image(overlay: OverlaySlice, image: Path | None) -> OverlaySlice:
    """``overlay`` drawn over slice ``k`` of ``image``'s first channel when that file shares
    the reference grid (within ``GRID_ATOL_MM``); else unchanged. Raises ``MedsegError`` or
    ``OSError`` when the image cannot be read."""
    from medseg.io import read_volume

    if image is None:
        return overlay
    img = read_volume(image)
    if not img.grid.allclose(overlay.grid, GRID_ATOL_MM):
        return overlay
    a = drop_singleton_k(img.array[0])
    bg = a[..., overlay.k] if a.ndim == 3 else a
    return dataclasses.replace(overlay, background=np.asarray(bg), what="image")


def report_overlays(
    ranked: list[CaseResult], pairs: dict[str, EvalPair], worst_n: int
) -> list[tuple[CaseResult, OverlaySlice | str]]:
    """The first ``worst_n`` evaluated cases of ``ranked`` with their overlay slice (over the
    pair's image where it has one), or why it is unavailable."""
    out: list[tuple[CaseResult, OverlaySlice | str]] = []
    for r in [r for r in ranked if r.error is None and r.overlay is not None][:worst_n]:
        assert r.overlay is not None
        try:
            out.append((r, overlay_with_image(r.overlay, pairs[r.case_id].image)))
        except (MedsegError, OSError) as exc:
            out.append((r, str(exc)))
    return out


# -- aggregation -------------------------------------------------------------------------------
def _both_empty_metrics(ndim: int) -> dict[str, float]:
    from medseg.metrics import all_metrics

    z = np.zeros((1,) * ndim, dtype=bool)
    return all_metrics(z, z, (1.0,) * ndim)


def fill_absent_classes(results: list[CaseResult]) -> list[str]:
    """Class names over all cases; a class absent from a case's pred and ref is both-empty."""
    names: list[str] = []
    for r in results:
        for n in r.metrics:
            if n not in names:
                names.append(n)
    for r in results:
        if r.error is None:
            for n in names:
                if n not in r.metrics:
                    r.metrics[n] = _both_empty_metrics(len(r.spacing))
    return names


def summarise(results: list[CaseResult], names: list[str]) -> dict[str, Any]:
    """Per class and metric: mean, std, median, IQR, min, max, n, empties and infinities."""
    ok = [r for r in results if r.error is None]
    inf_mm = max([r.diagonal_mm for r in ok], default=0.0)
    out: dict[str, Any] = {}
    for name in names:
        rows = [r.metrics[name] for r in ok if name in r.metrics]
        per: dict[str, Any] = {}
        n_empty_ref = sum(1 for m in rows if m["vol_ref_ml"] == 0)
        n_empty_pred = sum(1 for m in rows if m["vol_pred_ml"] == 0)
        metric_names = [k for k in METRIC_NAMES if any(k in m for m in rows)]
        for k in metric_names:
            vals = np.array([m[k] for m in rows if k in m], dtype=np.float64)
            fin = vals[np.isfinite(vals)]
            st: dict[str, Any] = {
                "n": int(vals.size),
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
        out[name] = per
    return out


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(float(v))


def metrics_csv(results: list[CaseResult], names: list[str]) -> str:
    """Tidy CSV: one row per case, class and metric (``inf`` written as ``inf``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", "class", "metric", "value"])
    for r in results:
        if r.error is not None:
            continue
        for name in names:
            for k, v in r.metrics.get(name, {}).items():
                w.writerow([r.case_id, name, k, _fmt(v)])
    return buf.getvalue()


def case_score(r: CaseResult) -> float:
    """Ranking key, worst first: failures, then the lowest mean Dice over classes."""
    if r.error is not None or not r.metrics:
        return -1.0
    return float(np.mean([m["dice"] for m in r.metrics.values()]))


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
        out = {n: [v] for v, n in sorted(names.items()) if v != 0}
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
) -> CohortResult:
    """Evaluate every pair and write ``metrics.csv``, ``summary.json``, ``report.html``.

    Failures do not stop the others; they are returned in ``CohortResult.failures`` and listed
    in the summary and report.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[CaseResult] = []
    args = [(p, classes, tolerance_mm, resample_pred, discover) for p in pairs]
    if workers > 1 and len(pairs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(pairs))) as pool:
            for i, r in enumerate(pool.map(_evaluate_star, args)):
                results.append(r)
                if progress:
                    progress(i + 1, len(pairs))
    else:
        for i, a in enumerate(args):
            results.append(_evaluate_star(a))
            if progress:
                progress(i + 1, len(pairs))
    names = fill_absent_classes(results)
    failures = {r.case_id: str(r.error) for r in results if r.error is not None}
    summary = {
        "title": title,
        "n_cases": len(results),
        "n_evaluated": len(results) - len(failures),
        "n_failed": len(failures),
        "failures": failures,
        "classes": {n: classes.get(n) for n in names} if classes else {n: None for n in names},
        "tolerance_mm": tolerance_mm,
        "settings": settings or {},
        "metrics": summarise(results, names),
    }
    write_text(out_dir / "metrics.csv", metrics_csv(results, names))
    write_json(out_dir / "summary.json", _json_safe(summary))
    from medseg.report.html import render_report

    ranked = sorted(results, key=case_score)
    overlays = report_overlays(ranked, {p.case_id: p for p in pairs}, worst_n)
    html = render_report(summary, ranked, names, overlays)
    write_text(out_dir / "report.html", html)
    return CohortResult(results, names, summary, failures)


def _evaluate_star(a: tuple[EvalPair, dict[str, list[int]], float, bool, bool]) -> CaseResult:
    return evaluate_pair(*a)


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
