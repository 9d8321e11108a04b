"""The ``medseg`` command line: one module per command, each registering itself on the app.

Every ``MedsegError`` is printed as one line on stderr with exit code 2; any other exception
is a bug and keeps its traceback. Heavy modules (torch) are imported inside the commands.
"""

from __future__ import annotations

import sys

from medseg.cli import (  # noqa: F401  (each module registers its command)
    convert,
    demo,
    evaluate,
    export,
    infer,
    inspect,
    manifest,
    preprocess,
    train,
)
from medseg.cli.app import app, console
from medseg.errors import CohortError, MedsegError

__all__ = ["app", "console", "main"]


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
