"""The ``medseg`` typer application, its stderr console and the help-text helper.

Command modules register themselves on :data:`app`; :mod:`medseg.cli` imports them all.
"""

from __future__ import annotations

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


def help_text(*paragraphs: str) -> str:
    """Man-page help text: paragraphs reflowed by rich, examples kept on their own lines."""
    return "\n\n".join(paragraphs)
