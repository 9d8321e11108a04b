"""``medseg inspect``: describe a scan or the series of a DICOM folder; writes nothing."""

from __future__ import annotations

from pathlib import Path

import typer

from medseg.cli.app import app, help_text
from medseg.cli.tables import series_table, volume_table
from medseg.errors import MedsegError


@app.command(
    help=help_text(
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
        out.print(series_table(path, infos))
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
            out.print(volume_table(vol, f"{path}"))
            return
    elif volume_format(path) != "dicom" and series is not None:
        raise ReadError(f"{path}: --series applies to DICOM input only")
    vol = read_volume(path, series=series)
    out.print(volume_table(vol, f"{path}"))
