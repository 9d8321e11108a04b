"""``medseg evaluate``: metrics and a review report for predictions against references."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from medseg.cli.app import app, console, help_text
from medseg.cli.cohort import log_option, scheduler_option, threads_option, workers_option
from medseg.errors import CohortError

if TYPE_CHECKING:
    from medseg.cohort import CaseEvent, CaseLog


@app.command(
    help=help_text(
        "Compare predicted label maps with reference label maps and write a review-ready report "
        "folder: metrics.csv (tidy: one row per case, class and metric), summary.json (per "
        "class: mean, std, median, IQR, min, max, n, empty and infinite counts) and "
        "report.html (self-contained: headline table, box/strip plots, per-case table worst "
        "first, contour overlays of the worst cases).",
        "Inputs: --pred and --ref as two files, or two folders whose files are matched by case "
        "id (the file name without .nii.gz/.nii/.nrrd/.mha/.png/...), or --manifest with "
        "--pred as a folder of predictions named <case_id>.nii.gz (manifest label names and "
        "regions are used, the first image is drawn under the overlays, and a case's extras "
        "'fov' file restricts the evaluation to its non-zero voxels).",
        "Metrics per class (label value) or region (union of values): Dice, IoU, precision, "
        "recall, HD, HD95, ASSD (boundary distances as MONAI), NSD at --tolerance-mm (as "
        "DeepMind surface-distance), reference/predicted volume and difference in mL. One "
        "mask empty: Dice 0, distances inf (counted apart in the summary). A class with no "
        "voxel in either map of a case is absent from it: no metrics (NaN, 'absent'), counted "
        "in n_absent and left out of the statistics; one absent from every case is named in a "
        "warning.",
        "Classes: every label the manifest or --labels names, label 0 included where named; "
        "without either, the non-zero label values found (0 = background).",
        "Each pair must share its grid (corner voxel centres within 0.01 mm); otherwise the case "
        "fails with the difference in mm, or --resample-pred resamples the prediction "
        "(nearest neighbour) onto the reference grid. Failed cases (missing prediction, grid "
        "mismatch, non-integer label file) are listed in the report and summary, the others "
        "are evaluated, and the exit code is 1. The output folder is checked for writing before "
        "any case is read and locked while the command runs; the three files are written "
        "together (a full disk leaves none of them, or the previous ones).",
        "Each case's metrics are a task: in this process, in --workers N local worker "
        "processes (one compute thread each unless --threads), or on a running Dask cluster "
        "(--scheduler tcp://HOST:8786; see docs/cohort.md); the three files are assembled "
        "here, byte-identical wherever the cases ran. A worker that dies loses only its "
        "running case, which is retried once. Every case event is also written to "
        "OUT/evaluate.log (or --log).",
        "Examples:\n\n  medseg evaluate --pred out/preds --ref data/labelsTs --out reports/run1\n\n"
        "  medseg evaluate --manifest data_manifests/brats.json --pred out/preds "
        "--out reports/brats --regions 'whole=1,2,3;core=1,3;enhancing=3'\n\n"
        "  medseg evaluate --pred out/preds --ref data/labelsTs --out reports/run1 --workers 2",
    ),
)
def evaluate(
    pred: Path = typer.Option(..., "--pred", help="Prediction file or folder."),
    ref: Path | None = typer.Option(
        None, "--ref", help="Reference file or folder (or use --manifest)."
    ),
    out: Path = typer.Option(..., "--out", help="Report folder to write (created if missing)."),
    manifest: Path | None = typer.Option(
        None, "--manifest", help="Manifest JSON naming the references (instead of --ref)."
    ),
    data_root: Path | None = typer.Option(
        None, "--data-root", help="Folder the manifest's relative paths start from."
    ),
    split: str | None = typer.Option(
        None, "--split", help="Only the manifest cases of this split (e.g. val, test)."
    ),
    labels: str | None = typer.Option(
        None,
        "--labels",
        help="Classes to evaluate: label values '1,2' or manifest label names 'liver,tumour' "
        "(default: the manifest's labels, 0 included where named, else every non-zero value "
        "found).",
    ),
    regions: str | None = typer.Option(
        None, "--regions", help="Extra regions as unions of values: 'whole=1,2,3;core=1,3'."
    ),
    tolerance_mm: float = typer.Option(2.0, "--tolerance-mm", min=0.0, help="NSD tolerance in mm."),
    resample_pred: bool = typer.Option(
        False, "--resample-pred", help="Resample predictions onto the reference grid (nearest)."
    ),
    worst: int = typer.Option(6, "--worst", min=0, help="Overlay pictures of this many cases."),
    workers: int | None = workers_option(),
    scheduler: str | None = scheduler_option(),
    threads: int | None = threads_option(),
    log: Path | None = log_option("OUT/evaluate.log"),
) -> None:
    from medseg.atomic import check_writable, check_writable_folder
    from medseg.cohort import CaseLog, Where
    from medseg.errors import ReadError
    from medseg.report.evaluate import (
        evaluate_cohort,
        pairs_from_manifest,
        pairs_from_paths,
        parse_classes,
    )

    if (ref is None) == (manifest is None):
        raise ReadError("give exactly one of --ref and --manifest")
    m_labels = m_regions = None
    if manifest is not None:
        pairs, m = pairs_from_manifest(manifest, pred, data_root, split)
        m_labels, m_regions, title = m.labels, m.regions, f"medseg evaluation: {m.name}"
    else:
        assert ref is not None
        pairs = pairs_from_paths(pred, ref)
        title = f"medseg evaluation: {pred} vs {ref}"
    classes = parse_classes(labels, regions, m_labels, m_regions)
    settings = {
        "pred": str(pred),
        "ref": str(ref or manifest),
        "resample_pred": resample_pred,
        "labels": labels,
        "regions": regions,
    }
    place = Where(workers=workers, scheduler=scheduler, threads=threads)
    check_writable_folder(out)  # before the log goes there
    if log is not None:
        check_writable(log)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    header = f"evaluate {len(pairs)} case(s) in {place.describe()}"
    log = log or out / "evaluate.log"
    with _removed_on_failure(out, created, log), CaseLog(console, log) as bar:
        result = evaluate_cohort(
            pairs,
            out,
            classes,
            tolerance_mm=tolerance_mm,
            resample_pred=resample_pred,
            title=title,
            settings=settings,
            worst_n=worst,
            discover=labels is None and not m_labels,
            where=place,
            # the log starts with the first case, once the folder is locked for this command
            on_event=partial(_log_event, bar, header),
        )
    print(
        f"{out}: {len(pairs) - len(result.failures)} of {len(pairs)} cases evaluated; "
        "metrics.csv, summary.json, report.html written"
    )
    for name in result.names:
        st = result.summary["metrics"][name]["dice"]
        mean = "n/a" if st["mean"] is None else f"{st['mean']:.4f}"
        absent = f", absent from {st['n_absent']}" if st["n_absent"] else ""
        print(f"  {name}: mean Dice {mean} (n={st['n']}{absent})")
    for name in result.summary["absent_everywhere"]:
        print(
            f"medseg: warning: class {name!r} (label values "
            f"{result.summary['classes'].get(name)}) is absent from every evaluated prediction "
            "and reference; it has no metrics (not Dice 1): check --labels or the manifest",
            file=sys.stderr,
        )
    if result.failures:
        raise CohortError(
            f"{len(result.failures)} of {len(pairs)} case(s) failed; see {out / 'report.html'}",
            result.failures,
        )


@contextlib.contextmanager
def _removed_on_failure(folder: Path, created: bool, log: Path) -> Iterator[None]:
    """Remove ``folder``, made by this command, with the log this run wrote in it, when the
    command fails before its report is written (a full disk leaves no folder holding a lone
    log); a folder that existed before is left as it was, the report files untouched."""
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                if log.parent.resolve() == folder.resolve():
                    log.unlink(missing_ok=True)
                folder.rmdir()  # only when nothing else is in it
        raise


def _log_event(bar: CaseLog, header: str, event: CaseEvent) -> None:
    """``event`` on the bar and in the log, after ``header`` for the first one."""
    if event.done == 1 and event.status != "retry":
        bar.line(header, show=None)
    bar(event)
