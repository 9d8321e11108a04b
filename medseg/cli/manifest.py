"""``medseg manifest``: import data set manifests and check them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from medseg.cli.app import app, check_output_file, console, help_text

manifest_app = typer.Typer(
    help="Create and check data set manifests (JSON lists of cases: images, label, split).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(manifest_app, name="manifest")


def _write_manifest(obj: dict[str, Any], out: Path) -> None:
    from medseg.atomic import write_json
    from medseg.manifest import parse_manifest

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
    help=help_text(
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

    check_output_file(out, overwrite)
    _write_manifest(import_msd(dataset_json, val_fraction=val_fraction, name=name), out)


@manifest_app.command(
    "import-nnunet",
    help=help_text(
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

    check_output_file(out, overwrite)
    _write_manifest(import_nnunet(raw_dir, val_fraction=val_fraction, name=name), out)


@manifest_app.command(
    "import-folders",
    help=help_text(
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

    check_output_file(out, overwrite)
    names = [c.strip() for c in channels.split(",")] if channels else None
    obj = import_folders(images, labels, name=name, channels=names, val_fraction=val_fraction)
    _write_manifest(obj, out)


@manifest_app.command(
    "check",
    help=help_text(
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
