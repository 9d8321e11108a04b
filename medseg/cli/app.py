"""The ``medseg`` typer application, its stderr console and the help-text helper.

Command modules register themselves on :data:`app`; :mod:`medseg.cli` imports them all.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from medseg import __version__

app = typer.Typer(
    name="medseg",
    help="Valid-convolution U-Net segmentation for medical scans: "
    "preprocess, train, infer (overlap-tile), evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: rich markup would swallow "[plan]"-like words and tag every flag
    # with a metavar such as <bool>
    rich_markup_mode=None,
)
# messages, paths and case ids are printed as they are: "[plan]" or "[T1]" is not markup
console = Console(stderr=True, markup=False)


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


def help_text(*paragraphs: str) -> str:
    """Man-page help text: paragraphs reflowed, examples (a paragraph that starts with
    ``medseg`` or holds line breaks) kept line by line (click's ``\\b`` marker)."""
    parts = [part.strip("\n") for p in paragraphs for part in p.split("\n\n")]
    return "\n\n".join(
        f"\b\n{part}" if part.lstrip().startswith("medseg ") or "\n" in part else part
        for part in parts
    )


def check_output_file(path: Path, overwrite: bool) -> None:
    """Refuse, before any computation, an output file that cannot be written: its folder
    missing or read-only, a folder in its place, or an existing file without --overwrite."""
    from medseg.atomic import check_writable
    from medseg.errors import WriteError

    if not path.parent.is_dir():
        raise WriteError(f"{path}: folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise WriteError(f"{path}: is a folder; give a file name such as pred.nii.gz")
    check_writable(path, overwrite=overwrite)
