"""Shared fixtures: synthetic scans and the location of the real data."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medseg.volume import Grid, Volume

DATA = Path(os.environ.get("MEDSEG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real public data in ``../shared/data``.

    Where ``MEDSEG_DATA`` names it (CI does), missing data fails the tests that need it; a
    checkout without ``../shared`` and without the variable skips them."""
    if not DATA.is_dir():
        if os.environ.get("MEDSEG_DATA"):
            pytest.fail(f"MEDSEG_DATA={DATA} does not exist; the real-data tests need it")
        pytest.skip(f"real data not found at {DATA}")
    return DATA


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def oblique_grid() -> Grid:
    """A 3D grid with anisotropic spacing and an oblique, LPS-like direction."""
    t = np.deg2rad(17.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    direction = rot @ np.diag([-1.0, -1.0, 1.0])
    return Grid.from_spacing((23, 31, 11), (0.8, 0.7, 2.5), (12.0, -40.0, 7.5), direction)


@pytest.fixture
def image_volume(oblique_grid: Grid, rng: np.random.Generator) -> Volume:
    arr = rng.normal(100.0, 20.0, size=(1, *oblique_grid.shape)).astype(np.float32)
    return Volume(arr, oblique_grid, meta={"source": "synthetic"})


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML for {v!r}")


def write_pipeline_toml(path: Path, **tables: Any) -> Path:
    """Write a pipeline TOML: scalar keywords at the top (``name``, ``prep_dir``, ...), dict
    keywords as tables (``train={"steps": 5}`` -> ``[train]``)."""
    top = [f"{k} = {_toml_value(v)}" for k, v in tables.items() if not isinstance(v, dict)]
    body = [
        f"[{k}]\n" + "".join(f"{kk} = {_toml_value(vv)}\n" for kk, vv in v.items())
        for k, v in tables.items()
        if isinstance(v, dict)
    ]
    path.write_text("\n".join(top) + "\n" + "".join(body))
    return path


@pytest.fixture
def pipeline_toml(tmp_path: Path) -> Callable[..., Path]:
    """Factory for a pipeline TOML in ``tmp_path`` (see :func:`write_pipeline_toml`); the name
    defaults to "s"."""

    def make(prep: Path, **tables: Any) -> Path:
        return write_pipeline_toml(tmp_path / "p.toml", **{"name": "s", "prep_dir": prep, **tables})

    return make


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``medseg ARGV`` (``medseg.cli.main`` in this process)."""
    from medseg.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err
