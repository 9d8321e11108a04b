"""``medseg inspect``: describe a scan or the series of a DICOM folder; writes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from medseg.cli.app import app, console, help_text
from medseg.cli.dicom import allow_nonuniform_option, correct_tilt_option, reader_options
from medseg.cli.tables import series_table, volume_table
from medseg.errors import MedsegError

if TYPE_CHECKING:
    from rich.console import Console

    from medseg.volume import Volume


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
    allow_nonuniform: bool = allow_nonuniform_option(),
    correct_tilt: bool = correct_tilt_option(),
) -> None:
    """Describe a scan: shape, spacing (mm), orientation, origin, dtype and value range."""
    from rich.console import Console as _Console

    from medseg.errors import ReadError
    from medseg.io import read_volume, volume_format

    out = _Console(markup=False)  # a series description "[T1]" stays as it is
    options = reader_options(allow_nonuniform, correct_tilt)
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
                vol = read_volume(path, **options)
            except MedsegError as exc:
                out.print(f"not read as a volume: {exc}", highlight=False)
                return
            _describe(out, vol, path)
            return
    elif volume_format(path) != "dicom" and (series is not None or options):
        raise ReadError(f"{path}: --series and the DICOM options apply to DICOM input only")
    _describe(out, read_volume(path, series=series, **options), path)


def _describe(out: Console, vol: Volume, path: Path) -> None:
    """The volume's table, and a warning line on stderr for NaN or infinite voxels (which
    preprocess refuses and which would otherwise hide in the finite value range)."""
    from medseg.volume import describe_nonfinite

    out.print(volume_table(vol, f"{path}"))
    bad = describe_nonfinite(vol.array)
    if bad:
        console.print(
            f"medseg: warning: {path}: {bad}; preprocess refuses such a scan (fix or mask it)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
