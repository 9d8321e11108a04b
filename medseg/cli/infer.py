"""``medseg infer``: segment one scan or a cohort with a trained model folder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from medseg.cli.app import app, check_output_file, console, help_text
from medseg.cli.cohort import log_option, scheduler_option, threads_option, workers_option
from medseg.cli.dicom import allow_nonuniform_option, correct_tilt_option

if TYPE_CHECKING:
    from rich.progress import Progress

    from medseg.cohort import Where
    from medseg.inference.cohort import CaseInput, InferSettings
    from medseg.inference.model_folder import LoadedModel
    from medseg.inference.outputs import OutputSpec


def _parse_tile_size(text: str | None) -> int | tuple[int, ...] | None:
    import re

    from medseg.errors import ModelError

    if text is None:
        return None
    parts = [p for p in re.split(r"[,x ]+", text.strip()) if p]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ModelError(f"--tile-size {text!r}: expected voxels, e.g. 96 or 96,96,64")
    return int(parts[0]) if len(parts) == 1 else tuple(int(p) for p in parts)


_FORMAT = typer.Option(
    None,
    "--format",
    help="nifti, nrrd, dicom-seg or rtstruct (default: from --output's suffix, .dcm = "
    "dicom-seg; cohorts: the input's). DICOM outputs need DICOM series as inputs.",
)
_FRACTIONAL = typer.Option(
    False, "--fractional", help="DICOM-SEG: FRACTIONAL segments from the class probabilities."
)
_STATS = typer.Option(
    False,
    "--stats",
    help="Also write NAME_stats.json (per label: voxels, mL, RAS+ box and centroid in mm, "
    "channel mean/sd); a cohort also stats.csv.",
)
_ENGINE = typer.Option(
    "torch", "--engine", help="torch, or onnxruntime (CPU; runs the model folder's model.onnx)."
)
_ONNX = typer.Option(
    None, "--onnx", help="--engine onnxruntime: the exported graph (default MODEL/model.onnx)."
)


@app.command(
    help=help_text(
        "Segment scans with a trained model folder; write labels on each scan's own grid.",
        "The model folder (a training run) holds plan.json, model.pt (tensors only, loaded "
        "with weights_only=True; a checkpoint holding pickled code is refused) and optionally "
        "postprocessing.json. Each case gets the plan's preprocessing, exact overlap-tile "
        "inference (tiles on the 2^depth lattice, mirrored at the border, each voxel written "
        "once), is put back onto the scan's own grid, postprocessed, and written with the "
        "data set's own label values and the input's affine and shape.",
        "Back onto the scan's grid: where the plan only reoriented and cropped the scan, the "
        "class of each voxel is copied back exactly; where it resampled, each voxel takes the "
        "class of highest probability after linear resampling of the class probabilities "
        "(evaluated near class boundaries only; elsewhere all neighbours agree). Voxels "
        "outside the crop are background.",
        "Input: --volume once per channel in the plan's channel order (NIfTI, DICOM folder, "
        "NRRD/MHA, PNG/TIFF) with --output a file; or --input-dir DIR (nnU-Net names "
        "CASE_0000.nii.gz, CASE_0001.nii.gz per channel, else one file or DICOM folder per "
        "case) or --manifest M.json with --output a folder. Cohorts skip cases whose output "
        "exists (unless --overwrite), split with --shard i/n, finish the good cases and list "
        "the failed ones (exit 1). A single --output file that exists is refused unless "
        "--overwrite. Outputs are checked for writing, and --tile-size, --max-memory and "
        "--split against the model and manifest, before any case is read.",
        "Cohort cases run in this process, in --workers N local worker processes (one compute "
        "thread each unless --threads; each loads the model once), or as tasks on a running "
        "Dask cluster (--scheduler tcp://HOST:8786; see docs/cohort.md), with identical bytes "
        "written. A case is finished, and skipped on a rerun, when its label file exists, is "
        "newer than the model folder's files and the case's inputs, and has its probabilities "
        "where asked for. A worker that dies loses only its running case, which is retried "
        "once. Every case event is also written to OUTPUT/infer.log (or --log).",
        "Memory: the tile size is the largest whose forward pass fits --max-memory (default "
        "half the available memory; on CUDA also at most 80% of free GPU memory); "
        "--tile-size forces it. Labels are streamed tile by tile into one integer array "
        "(memory-mapped to a temporary file when large); probabilities are kept only with "
        "--save-probabilities (written as NAME_probabilities.nii.gz).",
        "Outputs: a label image (NIfTI, NRRD, ...), or of a DICOM input a DICOM-SEG (.dcm "
        "output or --format dicom-seg; --fractional for probabilities) or an RT Structure Set "
        "(--format rtstruct) referencing its images; cohort cases are CASE_seg.dcm / "
        "CASE_rtstruct.dcm. --stats adds structure statistics. --engine onnxruntime runs the "
        "graph of medseg export.",
        "Examples:\n\n"
        "  medseg infer --volume scan.nii.gz --model runs/ct --output pred.nii.gz\n\n"
        "  medseg infer --volume flair.nii.gz --volume t1c.nii.gz --model runs/brats "
        "--output pred.nii.gz --tta flip\n\n"
        "  medseg infer --input-dir imagesTs --model runs/ct --output preds --shard 0/4\n\n"
        "  medseg infer --input-dir imagesTs --model runs/ct --output preds --workers 2\n\n"
        "  medseg infer --volume study/dicom/ --model runs/ct --output result.dcm --stats",
    ),
)
def infer(
    volume: list[Path] | None = typer.Option(
        None,
        "--volume",
        "-v",
        metavar="<path>",
        help="Scan of one channel (repeat per channel, plan order).",
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
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --output file; cohorts: redo done cases."
    ),
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
    workers: int | None = workers_option(),
    scheduler: str | None = scheduler_option(),
    threads: int | None = threads_option(),
    log: Path | None = log_option("OUTPUT/infer.log"),
    allow_nonuniform: bool = allow_nonuniform_option(),
    correct_tilt: bool = correct_tilt_option(),
    fmt: str | None = _FORMAT,
    fractional: bool = _FRACTIONAL,
    stats: bool = _STATS,
    engine: str = _ENGINE,
    onnx: Path | None = _ONNX,
) -> None:
    from medseg.errors import ReadError
    from medseg.inference.cohort import select_shard
    from medseg.runtime import parse_bytes

    _check_one_input(volume, input_dir, manifest)
    from medseg.atomic import check_writable
    from medseg.cohort import Where, set_threads
    from medseg.inference.cohort import InferSettings, cohort_plan

    settings = InferSettings(
        model=model,
        device=device,
        precision=precision,
        tile_size=_parse_tile_size(tile_size),
        max_memory=None if max_memory is None else parse_bytes(max_memory),
        tta=_infer_tta(model, tta),
        save_probabilities=save_probabilities,
        series=series,
        suffix=suffix,
        allow_nonuniform=allow_nonuniform,
        correct_tilt=correct_tilt,
        outputs=_output_spec(model, output, fmt, fractional, stats, save_probabilities, volume),
        **_engine(engine, onnx, device, precision),
    )
    _check_infer_paths(volume, output, overwrite)
    if log is not None:
        check_writable(log)
    _warn_if_cut_short(model)
    if volume:
        if workers is not None or scheduler is not None:
            raise ReadError("--workers and --scheduler run cohorts: use --input-dir or --manifest")
        if threads is not None:
            set_threads(threads)
        _infer_one(volume, settings, *_load_one(volume, settings), output)
        return
    place = Where(workers=workers, scheduler=scheduler, threads=threads)
    plan = cohort_plan(settings, place)
    cases = select_shard(
        _infer_cases(input_dir, manifest, data_root, split, plan.in_channels), shard
    )
    default_log = f"infer-{shard.replace('/', 'of').strip()}.log" if shard else "infer.log"
    _infer_cohort(cases, settings, place, output, overwrite, log or output / default_log)


def _check_one_input(volume: Any, input_dir: Path | None, manifest: Path | None) -> None:
    """Exactly one of ``--volume``, ``--input-dir`` and ``--manifest``."""
    from medseg.errors import ReadError

    given = [v for v in (volume, input_dir, manifest) if v]
    if len(given) != 1:
        raise ReadError("give exactly one of --volume, --input-dir or --manifest")


def _load_one(volume: list[Path], settings: InferSettings) -> tuple[LoadedModel, dict[str, Any]]:
    """The model of a single case, checked with the case's input, ``--tile-size`` and
    ``--max-memory`` before any tile runs; its network run by ``--engine``."""
    from medseg.inference.cohort import load_for_infer
    from medseg.inference.engine import with_engine
    from medseg.inference.outputs import check_case_input
    from medseg.inference.tiled import check_tiling

    check_case_input(volume, settings.outputs.format, settings.series)
    loaded, heap_kw = load_for_infer(settings.model, settings.device, settings.precision)
    loaded = with_engine(loaded, settings.engine, onnx_path=settings.onnx)
    spatial_dims = loaded.plan.spatial_dims
    check_tiling(loaded.model, spatial_dims, settings.tile_size, settings.max_memory)
    return loaded, heap_kw


def _output_spec(
    model: Path,
    output: Path,
    fmt: str | None,
    fractional: bool,
    stats: bool,
    save_probabilities: bool,
    volume: list[Path] | None,
) -> OutputSpec:
    """What each case is written as: ``--format`` (or the output file's suffix), FRACTIONAL,
    statistics, probabilities, and the coded concepts of the model folder's
    ``pipeline.toml`` ``[infer.dicom_codes]``."""
    from medseg.config import dicom_codes, load_pipeline
    from medseg.errors import WriteError
    from medseg.inference.outputs import DICOM_FORMATS, OutputSpec, resolve_format

    resolved = resolve_format(output, fmt, cohort=not volume)
    if fractional and resolved != "dicom-seg":
        raise WriteError(
            "--fractional writes a FRACTIONAL DICOM-SEG: name the output .dcm or pass "
            "--format dicom-seg"
        )
    if save_probabilities and resolved in DICOM_FORMATS:
        raise WriteError(
            f"--save-probabilities writes NIfTI beside label images; a {resolved} output "
            "carries probabilities as --fractional (DICOM-SEG)"
        )
    run_toml = model / "pipeline.toml"
    codes = dicom_codes(load_pipeline(run_toml).infer, run_toml) if run_toml.is_file() else {}
    return OutputSpec(resolved, fractional, stats, codes)


def _engine(engine: str, onnx: Path | None, device: str, precision: str) -> dict[str, Any]:
    """``--engine`` (checked: onnxruntime runs the float32 graph, here on the CPU only) and
    ``--onnx``."""
    from medseg.errors import ModelError
    from medseg.inference.engine import ENGINES

    if engine not in ENGINES:
        raise ModelError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "onnxruntime" and device not in ("cpu", "auto"):
        raise ModelError(f"--engine onnxruntime runs on the CPU; drop --device {device}")
    if engine == "onnxruntime" and precision not in ("auto", "float32"):
        raise ModelError(
            f"--engine onnxruntime runs the float32 graph; drop --precision {precision}"
        )
    # resolved: cohort workers (a Dask cluster) may run in another folder
    return {"engine": engine, "onnx": None if onnx is None else onnx.resolve()}


def _warn(message: str) -> None:
    console.print(f"medseg: warning: {message}", highlight=False, soft_wrap=True)


def _warn_if_cut_short(model: Path) -> None:
    """One warning line when the model folder's training stopped before its recipe's steps
    (the time cap, a kill): such a model is not the one the pipeline describes."""
    from medseg.runinfo import early_stop_warning

    warning = early_stop_warning(model)
    if warning is not None:
        console.print(f"medseg: warning: {warning}", highlight=False, soft_wrap=True)


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


def _check_infer_paths(volume: list[Path] | None, output: Path, overwrite: bool) -> None:
    """One-line errors before anything runs: inputs that do not exist, an output file that
    cannot be written (missing or read-only folder, a folder in its place, an existing file
    without --overwrite), an output folder that does not exist or is read-only."""
    from medseg.atomic import check_writable_folder
    from medseg.errors import ReadError, WriteError

    if volume:
        check_output_file(output, overwrite)
        for v in volume:
            if not v.exists():
                raise ReadError(f"{v}: no such file or folder")
    elif output.exists() and not output.is_dir():
        raise WriteError(f"{output}: is a file; cohorts write into a folder, give one")
    elif not output.is_dir():
        raise WriteError(f"{output}: output folder does not exist; create it first")
    else:
        check_writable_folder(output)


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
    volume: list[Path],
    settings: InferSettings,
    loaded: LoadedModel,
    heap_kw: dict[str, Any],
    output: Path,
) -> None:
    """Segment the one case of ``--volume`` into ``output``; print the files written."""
    from medseg.inference.case import check_channels, predict_case
    from medseg.inference.cohort import read_case
    from medseg.inference.outputs import write_outputs
    from medseg.io.dicom_source import reported_dicom_warnings

    # read and check before any progress output, so errors stay one line
    images = read_case(volume, settings.series, **settings.dicom_options())
    check_channels(images, loaded.plan)
    with _infer_progress() as bar:
        tiles = bar.add_task("tiles", total=None)
        pred = predict_case(
            images,
            loaded,
            progress=lambda done, total: bar.update(tiles, completed=done, total=total),
            **settings.predict_kw(),
            **heap_kw,
        )
        with reported_dicom_warnings(_warn):
            written = write_outputs(
                pred, images, volume, output, loaded.plan, settings.outputs, series=settings.series
            )
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
    return [CaseInput(c.case_id, list(c.images)) for c in m.cases_of_split(split)]


def _infer_cohort(
    cases: list[CaseInput],
    settings: InferSettings,
    place: Where,
    output: Path,
    overwrite: bool,
    log: Path,
) -> None:
    """Segment ``cases`` into the folder ``output`` where ``place`` says; one bar over the
    cases with the workers' count, each case event also a line in ``log``; print the counts."""
    from medseg.cohort import CaseLog
    from medseg.inference.cohort import run_cohort
    from medseg.io.dicom_source import reported_dicom_warnings

    stats = _cohort_stats(cases, settings, output)
    with reported_dicom_warnings(_warn), stats, CaseLog(console, log) as bar:
        bar.line(f"infer {len(cases)} case(s) with {settings.model} in {place.describe()}")
        outcome = run_cohort(cases, settings, output, overwrite=overwrite, where=place,
                             on_event=bar)  # fmt: skip
    print(
        f"{output}: {len(outcome.done)} cases written, {len(outcome.skipped)} skipped "
        "(already done)"
    )


@contextmanager
def _cohort_stats(cases: list[CaseInput], settings: InferSettings, output: Path) -> Iterator[None]:
    """With ``--stats``, after the cohort (finished or not): ``stats.csv`` from the stats of
    every case written, and its path printed."""
    try:
        yield
    finally:
        if settings.outputs.stats:
            from medseg.inference.outputs import write_cohort_stats

            outs = {c.case_id: settings.output(output, c) for c in cases}
            table = write_cohort_stats(output, outs)
            if table is not None:
                print(table)
