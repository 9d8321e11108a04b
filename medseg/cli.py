"""The ``medseg`` command line: preprocess, train, infer, evaluate, inspect, convert, manifest.

Every ``MedsegError`` is printed as one line on stderr with exit code 2; any other exception
is a bug and keeps its traceback. Heavy modules (torch) are imported inside the commands.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from medseg import __version__
from medseg.errors import CohortError, MedsegError

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from rich.progress import Progress
    from rich.table import Table

    from medseg.inference.cohort import CaseInput
    from medseg.inference.model_folder import LoadedModel
    from medseg.inference.tiled import TileLayout
    from medseg.volume import Volume

app = typer.Typer(
    name="medseg",
    help="Valid-convolution U-Net segmentation for medical scans: "
    "preprocess, train, infer (overlap-tile), evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"medseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """medseg: U-Net segmentation of medical scans, from DICOM folder to review report."""


# Commands are registered by the modules below; each keeps its own options and help text.


# -- inspect, convert, manifest (io/manifest engineer) --------------------------------------


def _help(*paragraphs: str) -> str:
    """Man-page help text: paragraphs reflowed by rich, examples kept on their own lines."""
    return "\n\n".join(paragraphs)


def _volume_table(vol: Volume, title: str) -> Table:
    """Rich table describing a volume: geometry in mm, orientation, dtype, value range."""
    import numpy as np
    from rich.table import Table

    def fmt(xs: tuple[float, ...] | list[float]) -> str:
        return " x ".join(f"{x:.6g}" for x in xs)

    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("property", style="bold")
    t.add_column("value")
    t.add_row("format", str(vol.meta.get("format", "?")))
    t.add_row("shape (I, J, K)", f"{fmt(vol.shape)} voxels")
    t.add_row("channels", str(vol.channels))
    t.add_row("dtype", str(vol.array.dtype) + (" (label)" if vol.is_label else ""))
    t.add_row("spacing", f"{fmt(vol.spacing)} mm")
    t.add_row(
        "orientation", "".join(vol.orientation) + (" (oblique)" if vol.grid.is_oblique else "")
    )
    t.add_row("origin (RAS+)", f"({', '.join(f'{x:.6g}' for x in vol.origin)}) mm")
    if vol.grid.is_oblique:
        d = np.round(vol.direction, 4).tolist()
        t.add_row("direction columns", "; ".join(str(c) for c in zip(*d, strict=True)))
    for c in range(vol.channels):
        a = vol.array[c]
        finite = a[np.isfinite(a)] if np.issubdtype(a.dtype, np.floating) else a
        rng = f"{finite.min():.6g} .. {finite.max():.6g}" if finite.size else "no finite values"
        t.add_row(f"range channel {c}", rng)
    if vol.is_label or (np.issubdtype(vol.array.dtype, np.integer) and vol.channels == 1):
        values = np.unique(vol.array)
        if values.size <= 20:
            t.add_row("values", ", ".join(str(v) for v in values.tolist()))
    return t


def _series_table(path: Path, infos: list[Any]) -> Table:
    """Rich table of DICOM series (``medseg.io.dicom.SeriesInfo``), one row per series."""
    from rich.table import Table

    t = Table(title=f"{path}: {len(infos)} DICOM series", title_justify="left")
    for name in ("#", "modality", "description", "slices", "rows x cols", "spacing (mm)"):
        t.add_column(name)
    for name in ("orient.", "transfer syntax", "files", "series UID"):
        t.add_column(name, overflow="fold")
    for info in infos:
        sp = getattr(info, "spacing", None)
        files = getattr(info, "files", ())
        t.add_row(
            str(getattr(info, "index", "?")),
            str(getattr(info, "modality", "")),
            str(getattr(info, "description", "")),
            str(getattr(info, "slices", "?")),
            f"{getattr(info, 'rows', '?')} x {getattr(info, 'columns', '?')}",
            " x ".join(f"{x:.4g}" for x in sp) if sp else "unknown",
            str(getattr(info, "orientation", "")),
            str(getattr(info, "transfer_syntax", "")),
            str(len(files)),
            str(getattr(info, "uid", "")),
        )
    return t


@app.command(
    help=_help(
        "Describe a scan: shape, spacing (mm), orientation, origin, dtype and value range.",
        (
            "For a DICOM folder, list its series (modality, description, slice count, "
            "spacing); with --series, or when the folder holds one series, also describe that"
            " series as a volume. Geometry is reported in RAS+ millimetres whatever the "
            "file's own convention (LPS for DICOM and NRRD). Nothing is written."
        ),
        "Examples:",
        "medseg inspect brats/pat1/Flair.nii.gz",
        "medseg inspect study/dicom/ --series 2",
    ),
)
def inspect(
    path: Path = typer.Argument(
        ...,
        metavar="PATH",
        help="A scan file (.nii/.nii.gz, .nrrd, .mha, .png, .tif, .dcm) or a DICOM folder.",
    ),
    series: str = typer.Option(
        None,
        "--series",
        "-s",
        help="DICOM folders: the series to describe, by index or SeriesInstanceUID as listed.",
    ),
) -> None:
    """Describe a scan: shape, spacing (mm), orientation, origin, dtype and value range."""
    from rich.console import Console as _Console

    from medseg.errors import ReadError
    from medseg.io import read_volume, volume_format

    out = _Console()
    if not path.exists():
        raise ReadError(f"{path}: no such file or folder")
    if path.is_dir():
        if not any(path.iterdir()):
            raise ReadError(f"{path}: empty folder; give a scan file or a folder of DICOM files")
        import medseg.io.dicom as dicom

        list_series = getattr(dicom, "list_series", None)
        if list_series is None:
            raise ReadError(f"{path}: DICOM folders cannot be listed in this build")
        infos = list_series(path)
        out.print(_series_table(path, infos))
        if series is None and len(infos) != 1:
            return
        if series is None:
            # describing the only series is a courtesy: a series that needs options to read
            # (gantry tilt, uneven slices) is reported, not an error of `inspect`
            try:
                vol = read_volume(path)
            except MedsegError as exc:
                out.print(f"[yellow]not read as a volume:[/yellow] {exc}", highlight=False)
                return
            out.print(_volume_table(vol, f"{path}"))
            return
    elif volume_format(path) != "dicom" and series is not None:
        raise ReadError(f"{path}: --series applies to DICOM input only")
    vol = read_volume(path, series=series)
    out.print(_volume_table(vol, f"{path}"))


_WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".png", ".tif", ".tiff", ".bmp", ".gif")


@app.command(
    help=_help(
        "Convert a scan to NIfTI, NRRD, MetaImage or PNG, keeping its world geometry.",
        (
            "The output format follows the suffix of OUTPUT. Geometry (voxel size in mm, "
            "orientation, origin) is carried over exactly; PNG cannot store it and keeps the "
            "pixel layout only. OUTPUT's folder must exist; an existing OUTPUT is refused "
            "unless --overwrite. The file appears complete or not at all (written beside the "
            "target, then renamed)."
        ),
        (
            "DICOM-SEG and RTSTRUCT: a label map on the grid of a DICOM series becomes a "
            "Segmentation (OUTPUT ending .dcm, or --format dicom-seg) or an RT Structure Set "
            "(--format rtstruct) of that series (--reference). A DICOM-SEG INPUT is read as a "
            "label map of segment numbers; an RTSTRUCT INPUT needs --reference."
        ),
        "Examples:",
        "medseg convert study/dicom/ ct.nii.gz --series 1",
        "medseg convert case1/label.nrrd case1_label.nii.gz --label",
        "medseg convert label.nii.gz seg.dcm --reference study/dicom/",
        "medseg convert label.nii.gz rt.dcm --reference study/dicom/ --format rtstruct",
        "medseg convert rt.dcm label.nii.gz --reference study/dicom/",
    ),
)
def convert(
    input: Path = typer.Argument(
        ..., metavar="INPUT", help="Scan to read: any format `medseg inspect` reads."
    ),
    output: Path = typer.Argument(
        ...,
        metavar="OUTPUT",
        help="File to write: .nii.gz/.nii, .nrrd, .mha, or .png/.tif for 2D (K = 1).",
    ),
    series: str = typer.Option(
        None, "--series", "-s", help="DICOM folders: series index or SeriesInstanceUID."
    ),
    label: bool = typer.Option(
        False,
        "--label",
        help="Treat the input as a label map: integer values required, stored in the smallest "
        "integer type that holds them.",
    ),
    allow_nonuniform: bool = typer.Option(
        False,
        "--allow-nonuniform",
        help="DICOM: accept slices with uneven spacing (otherwise refused).",
    ),
    correct_tilt: bool = typer.Option(
        False,
        "--correct-tilt",
        help="DICOM: accept a CT series acquired with gantry tilt (see README, DICOM).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    reference: Path = typer.Option(
        None,
        "--reference",
        help="DICOM series folder a DICOM-SEG/RTSTRUCT is written for or read onto "
        "(--series picks one of its series).",
    ),
    fmt: str = typer.Option(
        None,
        "--format",
        help="Output format: dicom-seg or rtstruct (default: dicom-seg for a .dcm OUTPUT).",
    ),
) -> None:
    """Convert a scan to NIfTI, NRRD, MetaImage or PNG, keeping its world geometry."""
    from medseg.errors import WriteError
    from medseg.io import read_volume, write_volume

    if fmt is not None or output.name.lower().endswith(".dcm"):
        _convert_to_dicom(input, output, reference, series, fmt or "dicom-seg", overwrite)
        return
    if not output.name.lower().endswith(_WRITE_SUFFIXES):
        raise WriteError(
            f"{output}: cannot write this suffix; use .nii.gz, .nii, .nrrd, .mha, .png or .tif"
        )
    if not output.parent.is_dir():
        raise WriteError(f"{output}: folder {output.parent} does not exist; create it first")
    if output.exists() and not overwrite:
        raise WriteError(f"{output}: already exists; pass --overwrite to replace it")
    options = {}
    if allow_nonuniform:
        options["allow_nonuniform"] = True
    if correct_tilt:
        options["correct_tilt"] = True
    vol = read_volume(input, series=series, label=label, reference=reference, **options)
    write_volume(vol, output)
    sp = " x ".join(f"{s:.4g}" for s in vol.spacing)
    print(
        f"wrote {output}: {vol.channels} channel(s), {' x '.join(map(str, vol.shape))} voxels, "
        f"{sp} mm, {''.join(vol.orientation)}"
    )


manifest_app = typer.Typer(
    help="Create and check data set manifests (JSON lists of cases: images, label, split).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(manifest_app, name="manifest")


def _write_manifest(obj: dict[str, Any], out: Path, overwrite: bool) -> None:
    from medseg.atomic import write_json
    from medseg.errors import ManifestError
    from medseg.manifest import parse_manifest

    if out.exists() and not overwrite:
        raise ManifestError(f"{out}: already exists; pass --overwrite to replace it")
    m = parse_manifest(obj, out)  # structural check before anything is written
    write_json(out, obj)
    splits = {s: len(m.split(s)) for s in sorted({c.split or "none" for c in m.cases})}
    print(
        f"wrote {out}: {len(m.cases)} cases, channels {', '.join(m.channels)}, "
        f"splits {splits}, data root {m.data_root}"
    )


_OUT = typer.Option(..., "--out", "-o", help="Manifest JSON to write (refused if it exists).")
_OVERWRITE = typer.Option(False, "--overwrite", help="Replace --out if it exists.")
_VAL = typer.Option(
    0.2,
    "--val-fraction",
    help="Fraction of cases (the last ones by sorted case id) marked split 'val'; 0 = none.",
)


@manifest_app.command(
    "import-msd",
    help=_help(
        "Manifest from a Medical Segmentation Decathlon dataset.json.",
        (
            "Each 'training' entry becomes a case with ONE image file: the MSD 4D NIfTI, "
            "whose 4th axis holds the channels in the order of the 'modality' keys (0, 1, "
            "...). Labels keep the dataset.json value -> name map. Paths are stored relative "
            "to the task folder, which is recorded as the manifest's data_root."
        ),
        "Example:",
        "medseg manifest import-msd Task01_BrainTumour/dataset.json --out brain.json",
    ),
)
def manifest_import_msd(
    dataset_json: Path = typer.Argument(..., help="The Decathlon task's dataset.json."),
    out: Path = _OUT,
    name: str = typer.Option(None, "--name", help="Data set name (default: from dataset.json)."),
    val_fraction: float = _VAL,
    overwrite: bool = _OVERWRITE,
) -> None:
    """Manifest from a Medical Segmentation Decathlon dataset.json."""
    from medseg.manifest import import_msd

    _write_manifest(import_msd(dataset_json, val_fraction=val_fraction, name=name), out, overwrite)


@manifest_app.command(
    "import-nnunet",
    help=_help(
        (
            "Manifest from an nnU-Net raw folder: imagesTr/CASE_0000.nii.gz ..., "
            "labelsTr/CASE.nii.gz."
        ),
        (
            "Files CASE_XXXX are the channels of CASE in order XXXX. Channel names and labels"
            " come from dataset.json (channel_names, labels) when present; label lists become"
            " regions."
        ),
        "Example:",
        "medseg manifest import-nnunet nnUNet_raw/Dataset004_Hippocampus --out hippo.json",
    ),
)
def manifest_import_nnunet(
    raw_dir: Path = typer.Argument(
        ..., help="nnU-Net raw data set folder holding imagesTr/ and labelsTr/."
    ),
    out: Path = _OUT,
    name: str = typer.Option(None, "--name", help="Data set name (default: folder name)."),
    val_fraction: float = _VAL,
    overwrite: bool = _OVERWRITE,
) -> None:
    """Manifest from an nnU-Net raw folder: imagesTr/CASE_0000.nii.gz ..., labelsTr/CASE.nii.gz."""
    from medseg.manifest import import_nnunet

    _write_manifest(import_nnunet(raw_dir, val_fraction=val_fraction, name=name), out, overwrite)


@manifest_app.command(
    "import-folders",
    help=_help(
        "Manifest pairing two folders by file name without suffix (case1.png <-> case1.png).",
        (
            "Every image needs a label of the same name and vice versa; unmatched files are "
            "listed as an error. Paths are stored relative to the folders' common parent (the"
            " data_root)."
        ),
        "Example:",
        "medseg manifest import-folders nuclei/images nuclei/labels --out nuclei.json",
    ),
)
def manifest_import_folders(
    images: Path = typer.Argument(..., help="Folder of image files, one case per file."),
    labels: Path = typer.Argument(..., help="Folder of label maps with the same names."),
    out: Path = _OUT,
    name: str = typer.Option(None, "--name", help="Data set name (default: parent folder name)."),
    channels: str = typer.Option(
        None,
        "--channels",
        help="Comma-separated channel names, e.g. R,G,B (default: from the first image).",
    ),
    val_fraction: float = _VAL,
    overwrite: bool = _OVERWRITE,
) -> None:
    """Manifest pairing two folders by file name without suffix (case1.png <-> case1.png)."""
    from medseg.manifest import import_folders

    names = [c.strip() for c in channels.split(",")] if channels else None
    obj = import_folders(images, labels, name=name, channels=names, val_fraction=val_fraction)
    _write_manifest(obj, out, overwrite)


@manifest_app.command(
    "check",
    help=_help(
        "Check a manifest: every file exists and reads, checksums match, grids agree.",
        "All problems are collected and reported together (exit code 2); nothing is written.",
        "Example:",
        "medseg manifest check data_manifests/brats2013.json --data-root /data",
    ),
)
def manifest_check(
    manifest: Path = typer.Argument(..., help="Manifest JSON to check."),
    data_root: Path = typer.Option(
        None,
        "--data-root",
        help="Folder the manifest's paths are relative to (default: the manifest's data_root, "
        "then $MEDSEG_DATA, then ../shared/data beside the repository).",
    ),
    grids: bool = typer.Option(
        True,
        "--grids/--no-grids",
        help="Read every file to check readability, channel count and that image, label and "
        "extras grids agree within 0.001 mm (--no-grids: existence and sha256 only).",
    ),
) -> None:
    """Check a manifest: every file exists and reads, checksums match, grids agree."""
    from rich.progress import Progress

    from medseg.manifest import load_manifest

    m = load_manifest(manifest, data_root)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"checking {m.name}", total=len(m.cases))
        m.validate(
            check_grids=grids, progress=lambda done, total, cid: bar.update(task, completed=done)
        )
    print(f"{manifest}: {len(m.cases)} cases OK (data root {m.data_root})")


# -- preprocess (preprocess engineer) ---------------------------------------------------------


def _convert_to_dicom(
    input: Path, output: Path, reference: Path | None, series: str | None, fmt: str, overwrite: bool
) -> None:
    """``medseg convert LABEL OUT.dcm --reference DIR``: a DICOM-SEG or RTSTRUCT of a series."""
    import warnings

    from medseg.errors import WriteError
    from medseg.io import read_volume

    if fmt not in ("dicom-seg", "rtstruct"):
        raise WriteError(f"--format {fmt}: use dicom-seg or rtstruct (or a .nii.gz OUTPUT)")
    if reference is None:
        raise WriteError(
            f"{output}: a {fmt} object references its image series; pass --reference DICOM_DIR"
        )
    if not output.parent.is_dir():
        raise WriteError(f"{output}: folder {output.parent} does not exist; create it first")
    if output.exists() and not overwrite:
        raise WriteError(f"{output}: already exists; pass --overwrite to replace it")
    label = read_volume(input, label=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if fmt == "rtstruct":
            from medseg.io.rtstruct import write_rtstruct

            write_rtstruct(label, reference, output, series=series)
        else:
            from medseg.io.dicom_seg import write_dicom_seg

            write_dicom_seg(label, reference, output, series=series)
    from medseg.io.dicom_source import MedsegDicomWarning

    for w in caught:
        if issubclass(w.category, MedsegDicomWarning):
            console.print(f"warning: {w.message}", highlight=False, soft_wrap=True)
    print(f"wrote {output}: {fmt} of {reference}, {' x '.join(map(str, label.shape))} voxels")


@app.command(
    help=_help(
        "Fingerprint a data set, derive its plan and write every case, ready for training, "
        "into a cache folder.",
        "Steps: read each case (all channels and the label), record shapes, spacings, "
        "orientations, foreground intensity statistics and label counts (fingerprint.json); "
        "derive plan.json (target spacing, RAS orientation, per-channel normalisation, crop to "
        "the non-zero box, 2D or 3D U-Net with its depth, widths, training patch and inference "
        "tile sizes fitted to the median case and a memory budget), overridden by the "
        "pipeline's \\[plan] table; then reorient, crop, normalise and resample each case and "
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
        "\\[preprocess] options: workers, memory_budget_gb, fingerprint_samples, border_weights "
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
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        help="Local worker processes (default: \\[preprocess] workers, else this process).",
    ),
    scheduler: str | None = typer.Option(
        None, "--scheduler", help="Run cases on this Dask scheduler (tcp://HOST:PORT)."
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="Compute threads per worker (default 1 with workers)."
    ),
    log: Path | None = typer.Option(
        None, "--log", help="Progress log file (default: OUT/preprocess.log)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every case."),
    data_root: Path | None = typer.Option(
        None, "--data-root", help="Folder the manifest's relative paths start from."
    ),
) -> None:
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
    out.mkdir(parents=True, exist_ok=True)
    with CaseLog(console, log or out / "preprocess.log") as bar:
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
        )
    s = summary(out)
    print(
        f"{out}: {len(result.done)} case(s) written, {len(result.skipped)} up to date; "
        f"plan {s['spatial_dims']}D, spacing {s['target_spacing']}, depth {s['depth']}, "
        f"patch {s['patch_output_size']}, tile {s['tile_output_size']}"
    )


# -- train (training engineer) ----------------------------------------------------------------


@app.command(
    help=_help(
        "Train a valid-convolution U-Net on a preprocessed cache (run [bold]medseg preprocess"
        "[/bold] first).",
        "Patches are drawn from the cache with foreground oversampling and augmented (elastic "
        "deformation, rotation, scaling, mirroring, intensity); the loss and optimiser come "
        "from the pipeline's \\[train] table. Every val_every epochs the validation cases of "
        "the fold are segmented whole, by the same overlap-tile inference as [bold]medseg "
        "infer[/bold], and scored by Dice per class.",
        "The run folder receives plan.json, pipeline.toml, model.pt (weights only; the best "
        'validation epoch unless \\[train] select = "last"), checkpoint_last.pt, '
        "checkpoint_best.pt, train_log.csv, training.json, train_summary.json and "
        "postprocessing.json. All writes are atomic and the folder is locked while training "
        "writes it (a second train on it is refused). A run resumed with --resume after any "
        "stop (a kill, the time cap) ends with the weights of an uninterrupted run.",
        "Length: \\[train] steps, else epochs x iterations_per_epoch optimiser steps; the "
        "learning rate follows the step, never the clock. --time-budget only caps the wall "
        "clock: a run it stops says 'stopped by the time budget at step N of M'.",
        "Folds: a seeded 5-fold split is saved once as splits.json in the preprocessed folder; "
        "--fold all trains on every case without validation; --fold manifest uses the "
        "manifest's own train/val split.",
        "Several processes: torchrun --nproc_per_node=N -m medseg.cli train ... "
        "(DistributedDataParallel; gloo on CPU, nccl on CUDA).",
        "Example:\n\n  medseg train --pipeline pipelines/isbi2012.toml --out runs/isbi2012",
    ),
)
def train(
    pipeline: Path = typer.Option(..., "--pipeline", help="Pipeline TOML (pipelines/X.toml)."),
    out: Path = typer.Option(..., "--out", help="Run folder to create (or resume)."),
    fold: str | None = typer.Option(
        None,
        "--fold",
        help="Fold index 0..4 of splits.json, 'all' (no validation) or 'manifest' (the "
        "manifest's own train/val split). Default: [train] fold, else 0.",
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", min=1, help="Total epochs (overrides \\[train] epochs and steps)."
    ),
    steps: int | None = typer.Option(
        None, "--steps", min=1, help="Total optimiser steps (overrides \\[train] steps, epochs)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from checkpoint_last.pt."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    deterministic: bool = typer.Option(
        False, "--deterministic", help="Deterministic kernels (slower; exact resume)."
    ),
    prep: Path | None = typer.Option(
        None, "--prep", help="Preprocessed folder (default: the pipeline's prep_dir)."
    ),
    workers: int | None = typer.Option(
        None, "--workers", min=0, help="DataLoader worker processes (overrides [train])."
    ),
    time_budget: float | None = typer.Option(
        None,
        "--time-budget",
        help="Optional cap, in minutes, on this invocation (overrides \\[train] "
        "time_budget_minutes); it stops training early, never changes the schedule.",
    ),
) -> None:
    from medseg import heap
    from medseg.config import check_plan_overrides, load_pipeline
    from medseg.training import train as run_training

    pipe = load_pipeline(pipeline)
    check_plan_overrides(pipe, prep if prep is not None else pipe.prep_dir)
    overrides: dict[str, Any] = {}
    if workers is not None:
        overrides["workers"] = workers
    if time_budget is not None:
        overrides["time_budget_minutes"] = time_budget
    # steps repeat the same allocations: keep freed activations in the heap (medseg.heap;
    # measured 0.99 -> 0.64 s per BraTS-sized 3D step); DataLoader workers forked inside the
    # run inherit it. Process-wide, so the command opts in, not the library.
    with heap.kept_freed_memory(_trains_on_cpu(device)):
        result = run_training(
            pipe,
            out,
            fold=fold,
            epochs=epochs,
            steps=steps,
            resume=resume,
            device=device,
            deterministic=deterministic,
            prep_dir=prep,
            overrides=overrides,
            log=lambda msg: console.print(msg, highlight=False),
        )
    if result.rank == 0:  # under torchrun only rank 0 reports
        print(result.message)


def _trains_on_cpu(device: str) -> bool:
    """Whether ``--device`` resolves to the CPU (a device it cannot resolve: False, and
    training refuses it with its own message)."""
    from medseg.runtime import resolve_device

    try:
        return resolve_device(device).type == "cpu"
    except MedsegError:
        return False


# -- infer (model engineer) -------------------------------------------------------------------


def _parse_tile_size(text: str | None) -> int | tuple[int, ...] | None:
    import re

    from medseg.errors import ModelError

    if text is None:
        return None
    parts = [p for p in re.split(r"[,x ]+", text.strip()) if p]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ModelError(f"--tile-size {text!r}: expected voxels, e.g. 96 or 96,96,64")
    return int(parts[0]) if len(parts) == 1 else tuple(int(p) for p in parts)


@app.command(
    help=_help(
        "Segment scans with a trained model folder; write labels on each scan's own grid.",
        "The model folder (a training run) holds plan.json, model.pt (tensors only, loaded "
        "with weights_only=True; a checkpoint holding pickled code is refused) and optionally "
        "postprocessing.json. Each case gets the plan's preprocessing, exact overlap-tile "
        "inference (tiles on the 2^depth lattice, mirrored at the border, each voxel written "
        "once), is put back onto the scan's own grid (one nearest-neighbour resample), "
        "postprocessed, and written with the data set's own label values and the input's "
        "affine and shape.",
        "Input: --volume once per channel in the plan's channel order (NIfTI, DICOM folder, "
        "NRRD/MHA, PNG/TIFF) with --output a file; or --input-dir DIR (nnU-Net names "
        "CASE_0000.nii.gz, CASE_0001.nii.gz per channel, else one file or DICOM folder per "
        "case) or --manifest M.json with --output a folder. Cohorts skip cases whose output "
        "exists (unless --overwrite), split with --shard i/n, finish the good cases and list "
        "the failed ones (exit 1).",
        "Memory: the tile size is the largest whose forward pass fits --max-memory (default "
        "half the available memory; on CUDA also at most 80% of free GPU memory); "
        "--tile-size forces it. Labels are streamed tile by tile into one integer array "
        "(memory-mapped to a temporary file when large); probabilities are kept only with "
        "--save-probabilities (written as NAME_probabilities.nii.gz).",
        "Examples:\n\n"
        "  medseg infer --volume scan.nii.gz --model runs/ct --output pred.nii.gz\n\n"
        "  medseg infer --volume flair.nii.gz --volume t1c.nii.gz --model runs/brats "
        "--output pred.nii.gz --tta flip\n\n"
        "  medseg infer --input-dir imagesTs --model runs/ct --output preds --shard 0/4",
    ),
)
def infer(
    volume: list[Path] | None = typer.Option(
        None, "--volume", "-v", help="Scan of one channel (repeat per channel, plan order)."
    ),
    model: Path = typer.Option(..., "--model", "-m", help="Model folder (training run)."),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Label file (single case) or folder (cohorts)."
    ),
    input_dir: Path | None = typer.Option(
        None, "--input-dir", help="Folder of cases (nnU-Net CASE_0000 names or one per case)."
    ),
    manifest: Path | None = typer.Option(None, "--manifest", help="Manifest JSON of cases."),
    data_root: Path | None = typer.Option(
        None, "--data-root", help="Root for the manifest's relative paths."
    ),
    split: str | None = typer.Option(
        None, "--split", help="Manifest: only cases of this split (e.g. test)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo cases whose output exists."),
    shard: str | None = typer.Option(
        None, "--shard", help="i/n: this process takes every n-th case from i (0-based)."
    ),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    tile_size: str | None = typer.Option(
        None, "--tile-size", help="Force the output tile size in voxels: 96 or 96,96,64."
    ),
    max_memory: str | None = typer.Option(
        None,
        "--max-memory",
        help="Memory budget for tiles and outputs, e.g. 4G (default: half of available).",
    ),
    tta: str | None = typer.Option(
        None,
        "--tta",
        help="none, or flip: average over mirrored axes (default: the model folder's "
        "pipeline.toml [infer] tta, else none).",
    ),
    save_probabilities: bool = typer.Option(
        False, "--save-probabilities", help="Also write class probabilities (float32)."
    ),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="auto (bf16/float16 autocast on CUDA, float32 on the CPU), float32, or bf16: "
        "convolutions in bf16 on a CPU with AMX or AVX512-BF16 (faster; labels may differ "
        "where classes are nearly tied).",
    ),
    series: str | None = typer.Option(
        None, "--series", help="DICOM inputs: the series to read (index or UID)."
    ),
    suffix: str | None = typer.Option(
        None, "--suffix", help="Cohort output suffix (default: the input's, .nii.gz for DICOM)."
    ),
) -> None:
    from medseg.errors import ReadError
    from medseg.runtime import parse_bytes

    modes = [
        m
        for m, v in (("--volume", volume), ("--input-dir", input_dir), ("--manifest", manifest))
        if v
    ]
    if len(modes) != 1:
        raise ReadError("give exactly one of --volume, --input-dir or --manifest")
    tta_axes = _infer_tta(model, tta)
    kw: dict[str, Any] = {
        "tile_size": _parse_tile_size(tile_size),
        "max_memory": None if max_memory is None else parse_bytes(max_memory),
        "tta": tta_axes,
        "save_probabilities": save_probabilities,
        "precision": precision,
    }
    _check_infer_paths(volume, output)
    loaded, heap_kw = _load_for_infer(model, device, precision)
    kw.update(heap_kw)
    if volume:
        _infer_one(volume, series, loaded, output, kw)
        return
    cases = _infer_cases(input_dir, manifest, data_root, split, loaded.plan.in_channels)
    _infer_cohort(cases, shard, loaded, output, overwrite, suffix, series, kw)


def _infer_tta(model: Path, tta: str | None) -> str | None:
    """``--tta``, by default the model folder's ``pipeline.toml`` ``[infer] tta`` (the pipeline
    it was trained with may ask for mirror TTA), else none; None for no TTA."""
    from medseg.errors import ReadError

    if tta is None:
        from medseg.config import load_pipeline

        run_toml = model / "pipeline.toml"
        tta = "none"
        if run_toml.is_file():
            tta = str(load_pipeline(run_toml).infer.get("tta", "none"))
    if tta not in ("none", "flip"):
        raise ReadError(f"--tta {tta!r}: expected none or flip")
    return None if tta == "none" else tta


def _check_infer_paths(volume: list[Path] | None, output: Path) -> None:
    """One-line errors before anything runs: inputs that do not exist, an output file in a
    missing folder or named as a folder, an output folder that does not exist."""
    from medseg.errors import ReadError, WriteError

    if volume:
        if not output.parent.is_dir():
            raise WriteError(f"{output}: folder {output.parent} does not exist; create it first")
        if output.is_dir():
            raise WriteError(f"{output}: is a folder; give a file name such as pred.nii.gz")
        for v in volume:
            if not v.exists():
                raise ReadError(f"{v}: no such file or folder")
    elif not output.is_dir():
        raise WriteError(f"{output}: output folder does not exist; create it first")


def _load_for_infer(model: Path, device: str, precision: str) -> tuple[LoadedModel, dict[str, Any]]:
    """The model folder on its device, and the allocator settings its cases run with.

    The allocator is process-wide state, so the command sets it, not the library: freed
    memory goes back to the system (:func:`medseg.heap.return_freed_memory`), and where a
    kept heap was measured faster (:func:`medseg.runtime.kept_heap_pays`) the tiles are
    planned for it and each case's tiles run inside one (:func:`_kept_heap_for`)."""
    from medseg import heap
    from medseg.inference.model_folder import load_model
    from medseg.runtime import check_precision, kept_heap_pays, resolve_device

    dev = resolve_device(device)
    check_precision(precision, dev)
    loaded = load_model(model, dev)
    heap.return_freed_memory()
    return loaded, {"keep_heap": kept_heap_pays(dev), "tile_scope": _kept_heap_for}


def _kept_heap_for(layout: TileLayout) -> AbstractContextManager[None]:
    """Freed activations kept in the heap while a case's tiles run, where ``layout`` was
    planned for it; afterwards the heap is given back (:func:`medseg.heap.kept_freed_memory`)."""
    from medseg import heap

    return heap.kept_freed_memory(layout.keep_heap)


def _infer_progress() -> Progress:
    """The tile and case bars, drawn on terminals only; logs and pipes get the summary lines."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    return Progress(*columns, TimeElapsedColumn(), console=console, disable=not console.is_terminal)


def _infer_one(
    volume: list[Path], series: str | None, loaded: LoadedModel, output: Path, kw: dict[str, Any]
) -> None:
    """Segment the one case of ``--volume`` into ``output``; print the files written."""
    from medseg.inference.case import check_channels, predict_case
    from medseg.inference.cohort import read_case, write_prediction

    # read and check before any progress output, so errors stay one line
    images = read_case(volume, series)
    check_channels(images, loaded.plan)
    with _infer_progress() as bar:
        tiles = bar.add_task("tiles", total=None)
        pred = predict_case(
            images,
            loaded,
            progress=lambda done, total: bar.update(tiles, completed=done, total=total),
            **kw,
        )
        written = write_prediction(pred, output)
    for p in written:
        print(p)


def _infer_cases(
    input_dir: Path | None,
    manifest: Path | None,
    data_root: Path | None,
    split: str | None,
    n_channels: int,
) -> list[CaseInput]:
    """The cases of ``--input-dir`` or of ``--manifest`` (only ``--split`` when given)."""
    from medseg.inference.cohort import CaseInput, discover_cases

    if input_dir is not None:
        return discover_cases(input_dir, n_channels)
    from medseg.manifest import load_manifest

    assert manifest is not None
    m = load_manifest(manifest, data_root)
    return [
        CaseInput(c.case_id, list(c.images)) for c in m.cases if split is None or c.split == split
    ]


def _infer_cohort(
    cases: list[CaseInput],
    shard: str | None,
    loaded: LoadedModel,
    output: Path,
    overwrite: bool,
    suffix: str | None,
    series: str | None,
    kw: dict[str, Any],
) -> None:
    """Segment this ``--shard`` of ``cases`` into the folder ``output``; print the counts."""
    from medseg.inference.cohort import run_cohort, select_shard

    cases = select_shard(cases, shard)
    with _infer_progress() as bar:
        tiles = bar.add_task("tiles", total=None)
        task = bar.add_task("cases", total=len(cases))
        status = run_cohort(
            cases,
            loaded,
            output,
            overwrite=overwrite,
            suffix=suffix,
            series=series,
            on_case=lambda _cid, _st: bar.advance(task),
            progress=lambda done, total: bar.update(tiles, completed=done, total=total),
            **kw,
        )
    done = sum(s == "done" for s in status.values())
    print(f"{output}: {done} cases written, {len(status) - done} skipped (already done)")


# -- evaluate (evaluate engineer) -------------------------------------------------------------


@app.command(
    help=_help(
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
        "Examples:\n\n  medseg evaluate --pred out/preds --ref data/labelsTs --out reports/run1\n\n"
        "  medseg evaluate --manifest data_manifests/brats.json --pred out/preds "
        "--out reports/brats --regions 'whole=1,2,3;core=1,3;enhancing=3'",
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
    workers: int | None = typer.Option(
        None, "--workers", min=1, help="Worker processes (default: CPUs, at most 8)."
    ),
    worst: int = typer.Option(6, "--worst", min=0, help="Overlay pictures of this many cases."),
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from medseg.errors import ReadError
    from medseg.report.evaluate import (
        default_workers,
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
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("evaluate", total=len(pairs))
        result = evaluate_cohort(
            pairs,
            out,
            classes,
            tolerance_mm=tolerance_mm,
            resample_pred=resample_pred,
            workers=workers or default_workers(),
            progress=lambda done, total: bar.update(task, completed=done),
            title=title,
            settings=settings,
            worst_n=worst,
            discover=labels is None and not m_labels,
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


@app.command(
    help=_help(
        "Run the whole pipeline on a built-in synthetic data set: 24 phantoms (anisotropic, "
        "varied orientation, NIfTI, one case also as a DICOM series) are generated, then "
        "preprocess, train, infer and evaluate run exactly as the commands above.",
        "Prints the mean validation Dice and where the HTML report is. About 5-10 minutes on "
        "two CPU cores. Example: medseg demo --out demo_out",
    )
)
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for data, run and report."),
    steps: int = typer.Option(
        800, "--steps", min=1, help="Training steps (the recipe: the same on every machine)."
    ),
    budget_minutes: float | None = typer.Option(
        None,
        "--budget-minutes",
        min=0.2,
        help="Optional cap on the training wall clock, in minutes (stops early, says so).",
    ),
) -> None:
    from medseg.demo import run_demo

    result = run_demo(out, steps=steps, budget_minutes=budget_minutes)
    print(
        f"demo finished in {result.seconds / 60:.1f} min: mean Dice {result.mean_dice:.3f} on "
        f"the held-out cases, {result.dicom_dice:.3f} on the DICOM case"
    )
    print(f"report: {result.report}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turn user errors into one line and exit code 2."""
    try:
        app(args=argv)  # standalone mode: usage errors print and exit by themselves
    except CohortError as exc:
        for case, why in exc.failures.items():
            print(f"  failed: {case}: {why}", file=sys.stderr)
        print(f"medseg: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except MedsegError as exc:
        print(f"medseg: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
