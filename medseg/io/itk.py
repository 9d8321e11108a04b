"""Placeholder: the itk reader/writer is being written (issue 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medseg.errors import ReadError, WriteError
from medseg.volume import Volume


def read(path: Path, **options: Any) -> Volume:
    raise ReadError(f"{path}: reading itk is not available yet")


def write(volume: Volume, path: Path) -> None:
    raise WriteError(f"{path}: writing itk is not available yet")
