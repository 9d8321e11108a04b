"""``medseg demo`` end to end (slow: it trains a network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.demo import run_demo
from medseg.io import read_volume
from medseg.metrics import dice


@pytest.mark.slow
def test_demo_runs_every_stage_and_learns(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "demo", cases=8, val=2, steps=200)
    summary = json.loads((tmp_path / "demo" / "report" / "summary.json").read_text())
    assert summary["n_evaluated"] == 2 and summary["n_failed"] == 0
    assert result.report.is_file() and "demo_007" in result.report.read_text()
    # one minute of training on two cores is far from converged, but well above chance
    assert result.mean_dice > 0.3
    # the DICOM copy of a validation case is segmented like its NIfTI original, on its grid
    a = read_volume(tmp_path / "demo" / "pred" / "demo_007.nii.gz", label=True)
    b = read_volume(tmp_path / "demo" / "demo_007_from_dicom.nii.gz", label=True)
    b = b.reoriented(a.orientation)  # the DICOM stack may run the other way along K
    assert a.grid.max_corner_distance(b.grid) < 1e-3
    for c in (1, 2):
        assert dice(a.array == c, b.array == c) > 0.95
