"""Fixtures of the training tests: the synthetic cache of :mod:`tests.training.synthetic`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.synthetic import write_synthetic_cache


@pytest.fixture
def prep(tmp_path: Path) -> Path:
    """A preprocessed folder holding five synthetic 2D cases with border weight maps."""
    p = tmp_path / "prep"
    write_synthetic_cache(p)
    return p
