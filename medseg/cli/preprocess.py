"""``medseg preprocess``: fingerprint, plan and cache a data set."""

from __future__ import annotations

from pathlib import Path

import typer

from medseg.cli.app import app, console, help_text
from medseg.cli.cohort import log_option, scheduler_option, threads_option, workers_option


@app.command(
    help=help_text(
        "Fingerprint a data set, derive its plan and write every case, ready for training, "
        "into a cache folder.",
        "Steps: read each case (all channels and the label), record shapes, spacings, "
        "orientations, foreground intensity statistics and label counts (fingerprint.json); "
        "derive plan.json (target spacing, RAS orientation, per-channel normalisation, crop to "
        "the non-zero box, 2D or 3D U-Net with its depth, widths, training patch and inference "
        "tile sizes fitted to the median case and a memory budget), overridden by the "
        "pipeline's [plan] table; then reorient, crop, normalise and resample each case and "
        "write it under OUT/cases/<case_id>/ as memory-mappable .npy files.",
        "Reruns skip cases whose input files, plan and options did not change; an interrupted "
        "run resumes; --overwrite redoes everything. A case that fails (unreadable file, label "
        "values outside the manifest's labels, image and label grids that differ, NaN voxels) "
        "is listed at the end and the exit code is 1; the other cases are written.",
        "Cases run in this process, in --workers N local worker processes (one compute "
        "thread each unless --threads), or as tasks on a running Dask cluster (--scheduler "
        "tcp://HOST:8786; see docs/cohort.md), with identical bytes in the cache. A worker that "
        "dies loses only its running case, which is retried once. Every case event is also "
        "written to OUT/preprocess.log (or --log).",
        "OUT is checked for writing before any case is read and locked while preprocess "
        "writes it: a second preprocess on it is refused, naming the first. A case that cannot "
        "be written whole (disk full) leaves no files.",
        "[preprocess] options: workers, memory_budget_gb, fingerprint_samples, border_weights "
        '= {w0 = 10, sigma = 5, instances = "components" | "label"} (U-Net weight maps).',
        "Examples:\n\n  medseg preprocess --pipeline pipelines/brats2013.toml --workers 2\n"
        "  medseg preprocess --pipeline pipelines/brats2013.toml --scheduler tcp://10.0.0.5:8786",
    ),
)
def preprocess(
    manifest: Path | None = typer.Option(
        None, "--manifest", help="Manifest JSON (default: the pipeline's manifest)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Cache folder to write (default: the pipeline's prep_dir)."
    ),
    pipeline: Path | None = typer.Option(
        None, "--pipeline", help="Pipeline TOML with [plan] overrides and [preprocess] options."
    ),
    workers: int | None = workers_option("[preprocess] workers, else this process"),
    scheduler: str | None = scheduler_option(),
    threads: int | None = threads_option(),
    log: Path | None = log_option("OUT/preprocess.log"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every case."),
    data_root: Path | None = typer.Option(
        None, "--data-root", help="Folder the manifest's relative paths start from."
    ),
) -> None:
    from medseg.atomic import check_writable, check_writable_folder, folder_lock
    from medseg.cohort import CaseLog, Where
    from medseg.config import Pipeline, load_pipeline
    from medseg.errors import PlanError
    from medseg.manifest import load_manifest
    from medseg.preprocess.cohort import Options, preprocess_cohort, summary

    pipe = load_pipeline(pipeline) if pipeline is not None else Pipeline(name="cli")
    manifest = manifest or pipe.manifest
    out = out or pipe.prep_dir
    if manifest is None or out is None:
        raise PlanError(
            "give --manifest and --out, or a --pipeline that sets manifest and prep_dir"
        )
    where = f"{pipe.path} [preprocess]" if pipe.path else "[preprocess]"
    opts = Options.from_dict(pipe.preprocess, source=where)
    m = load_manifest(manifest, data_root)
    place = Where(
        workers=workers if workers is not None else opts.workers,
        scheduler=scheduler,
        threads=threads,
    )
    check_writable_folder(out)
    if log is not None:
        check_writable(log)
    # the lock covers the log too: a refused second writer must not touch the first one's
    lock = folder_lock(out, "medseg preprocess")
    with lock, CaseLog(console, log or out / "preprocess.log") as bar:
        bar.line(f"preprocess {len(m.cases)} case(s) of {manifest} in {place.describe()}")
        result = preprocess_cohort(
            m,
            out,
            plan_overrides=pipe.plan,
            options=opts,
            overwrite=overwrite,
            source=f"{pipe.path} [plan]" if pipe.path else "[plan]",
            report=bar.line,
            where=place,
            on_event=bar,
            lock_held=True,
        )
    s = summary(out)
    print(
        f"{out}: {len(result.done)} case(s) written, {len(result.skipped)} up to date; "
        f"plan {s['spatial_dims']}D, spacing {s['target_spacing']}, depth {s['depth']}, "
        f"patch {s['patch_output_size']}, tile {s['tile_output_size']}"
    )
