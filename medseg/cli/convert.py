"""``medseg convert``: a scan to another format, or a label map to DICOM-SEG / RTSTRUCT."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import typer

from medseg.cli.app import app, check_output_file, console, help_text
from medseg.cli.dicom import allow_nonuniform_option, correct_tilt_option, reader_options

#: Coded concepts per label value (:func:`medseg.config.dicom_codes`).
Codes = Mapping[Any, Mapping[str, Sequence[str]]]

_WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".png", ".tif", ".tiff", ".bmp", ".gif")


@app.command(
    help=help_text(
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
        "medseg convert label.nii.gz seg.dcm --reference study/dicom/ --pipeline p.toml",
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
    allow_nonuniform: bool = allow_nonuniform_option(),
    correct_tilt: bool = correct_tilt_option(),
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
    pipeline: Path | None = typer.Option(
        None,
        "--pipeline",
        help="DICOM-SEG/RTSTRUCT: coded concepts per label value from this TOML's "
        "[infer.dicom_codes] (default: generic codes).",
    ),
) -> None:
    """Convert a scan to NIfTI, NRRD, MetaImage or PNG, keeping its world geometry."""
    from medseg.errors import WriteError
    from medseg.io import read_volume, write_volume

    if fmt is not None or output.name.lower().endswith(".dcm"):
        codes = _codes(pipeline)
        _convert_to_dicom(input, output, reference, series, fmt or "dicom-seg", overwrite, codes)
        return
    if not output.is_dir() and not output.name.lower().endswith(_WRITE_SUFFIXES):
        raise WriteError(
            f"{output}: cannot write this suffix; use .nii.gz, .nii, .nrrd, .mha, .png or .tif"
        )
    check_output_file(output, overwrite)
    options = reader_options(allow_nonuniform, correct_tilt)
    vol = read_volume(input, series=series, label=label, reference=reference, **options)
    write_volume(vol, output)
    sp = " x ".join(f"{s:.4g}" for s in vol.spacing)
    print(
        f"wrote {output}: {vol.channels} channel(s), {' x '.join(map(str, vol.shape))} voxels, "
        f"{sp} mm, {''.join(vol.orientation)}"
    )


def _codes(pipeline: Path | None) -> Codes:
    """``--pipeline``'s ``[infer.dicom_codes]`` (checked when the TOML is read), else none."""
    from medseg.config import dicom_codes, load_pipeline

    return {} if pipeline is None else dicom_codes(load_pipeline(pipeline).infer, pipeline)


def _convert_to_dicom(
    input: Path,
    output: Path,
    reference: Path | None,
    series: str | None,
    fmt: str,
    overwrite: bool,
    codes: Codes,
) -> None:
    """``medseg convert LABEL OUT.dcm --reference DIR``: a DICOM-SEG or RTSTRUCT of a series."""
    from medseg.errors import WriteError
    from medseg.io import read_volume
    from medseg.io.dicom_source import reported_dicom_warnings

    if fmt not in ("dicom-seg", "rtstruct"):
        raise WriteError(f"--format {fmt}: use dicom-seg or rtstruct (or a .nii.gz OUTPUT)")
    if reference is None:
        raise WriteError(
            f"{output}: a {fmt} object references its image series; pass --reference DICOM_DIR"
        )
    check_output_file(output, overwrite)
    label = read_volume(input, label=True)

    def warn(message: str) -> None:
        console.print(f"medseg: warning: {message}", highlight=False, soft_wrap=True)

    with reported_dicom_warnings(warn):
        if fmt == "rtstruct":
            from medseg.io.rtstruct import write_rtstruct

            write_rtstruct(label, reference, output, series=series, codes=codes)
        else:
            from medseg.io.dicom_seg import write_dicom_seg

            write_dicom_seg(label, reference, output, series=series, codes=codes)
    print(f"wrote {output}: {fmt} of {reference}, {' x '.join(map(str, label.shape))} voxels")
