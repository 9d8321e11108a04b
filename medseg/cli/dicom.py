"""The DICOM reader's options, shared by every command that reads a series named on its
command line (``inspect``, ``convert``, ``infer``: :data:`medseg.io.dicom.OPTION_COMMANDS`)."""

from __future__ import annotations

from typing import Any

import typer


def allow_nonuniform_option() -> Any:
    """``--allow-nonuniform``: read a series with missing slices or uneven gaps."""
    return typer.Option(
        False,
        "--allow-nonuniform",
        help="DICOM: accept slices with uneven spacing (resampled linearly to the median "
        "spacing; otherwise refused).",
    )


def correct_tilt_option() -> Any:
    """``--correct-tilt``: read a CT series acquired with gantry tilt."""
    return typer.Option(
        False,
        "--correct-tilt",
        help="DICOM: accept a CT series acquired with gantry tilt (a sheared affine of the "
        "true geometry, no resampling).",
    )


def reader_options(allow_nonuniform: bool, correct_tilt: bool) -> dict[str, Any]:
    """The keyword arguments of :func:`medseg.io.read_volume` for the options given."""
    named = {"allow_nonuniform": allow_nonuniform, "correct_tilt": correct_tilt}
    return {k: True for k, v in named.items() if v}
