"""``medseg infer``: segment one scan or a cohort with a trained model folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from medseg.cli.app import app, console, help_text

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from rich.progress import Progress

    from medseg.inference.cohort import CaseInput
    from medseg.inference.model_folder import LoadedModel
    from medseg.inference.tiled import TileLayout


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
    help=help_text(
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
