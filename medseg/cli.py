"""The ``medseg`` command line: preprocess, train, infer, evaluate, inspect, convert, manifest.

Every ``MedsegError`` is printed as one line on stderr with exit code 2; any other exception
is a bug and keeps its traceback. Heavy modules (torch) are imported inside the commands.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from medseg import __version__
from medseg.errors import CohortError, MedsegError

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
