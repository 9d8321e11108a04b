"""Options shared by the cohort commands (preprocess, infer, evaluate): where their cases run
and where their progress log goes. See docs/cohort.md."""

from __future__ import annotations

from typing import Any

import typer


def workers_option(default: str = "this process") -> Any:
    """``--workers N``: local worker processes."""
    return typer.Option(
        None, "--workers", min=1, help=f"Local worker processes (default: {default})."
    )


def scheduler_option() -> Any:
    """``--scheduler ADDRESS``: a running Dask scheduler."""
    return typer.Option(
        None, "--scheduler", help="Run cases on this Dask scheduler (tcp://HOST:PORT)."
    )


def threads_option() -> Any:
    """``--threads T``: compute threads of each worker process."""
    return typer.Option(
        None, "--threads", min=1, help="Compute threads per worker (default 1 with workers)."
    )


def log_option(default: str) -> Any:
    """``--log PATH``: the progress log file."""
    return typer.Option(None, "--log", help=f"Progress log file (default: {default}).")
