"""Cohort evaluation core: pairing, summaries, tidy CSV, self-contained HTML."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg import metrics as M
from medseg.report.evaluate import (
    OUTPUT_NAMES,
    CaseResult,
    case_id_of,
    evaluate_cohort,
    metrics_csv,
    pairs_from_paths,
    parse_classes,
    summarise,
)
from tests.test_cohort import dask_cluster as dask_cluster  # the shared fixture


def _save(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 2.0), dtype=np.int16) -> Path:
    nib.save(nib.Nifti1Image(arr.astype(dtype), np.diag([*spacing, 1.0])), path)
    return path


def _labels(shift: int) -> np.ndarray:
    a = np.zeros((16, 16, 6), np.int16)
    a[3 + shift : 10 + shift, 3:10, 1:5] = 1
    a[11:14, 11:14, 2:4] = 2
    return a


def test_case_id_strips_volume_suffixes():
    assert case_id_of(Path("a/case_01.nii.gz")) == "case_01"
    assert case_id_of(Path("x.NRRD")) == "x" and case_id_of(Path("img.v2.png")) == "img.v2"


def test_pairs_from_folders_keep_unmatched_cases(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    _save(tmp_path / "r" / "a.nii.gz", _labels(0))
    _save(tmp_path / "r" / "b.nii.gz", _labels(0))
    _save(tmp_path / "p" / "a.nii.gz", _labels(0))
    pairs = {p.case_id: p for p in pairs_from_paths(tmp_path / "p", tmp_path / "r")}
    assert set(pairs) == {"a", "b"} and pairs["b"].pred is None


def test_summary_counts_empties_and_infinities_apart():
    def res(cid, pred, ref):
        return CaseResult(
            cid, {"c": M.all_metrics(pred, ref, (1.0, 1.0))}, spacing=(1.0, 1.0), diagonal_mm=10.0
        )

    m = np.zeros((8, 8), bool)
    m[2:5, 2:5] = True
    z = np.zeros_like(m)
    results = [res("same", m, m), res("missed", z, m), res("none", z, z)]
    s = summarise(results, ["c"])["c"]
    assert s["dice"]["n"] == 3 and s["dice"]["mean"] == pytest.approx(2 / 3)
    assert s["hd95"]["n_inf"] == 1 and s["hd95"]["max"] == 0.0
    assert s["hd95"]["n_empty_ref"] == 1 and s["hd95"]["n_empty_pred"] == 2
    assert s["hd95"]["inf_replaced_by_mm"] == 10.0
    assert s["hd95"]["mean_inf_replaced"] == pytest.approx(10.0 / 3)
    rows = list(csv.DictReader(io.StringIO(metrics_csv(results, ["c"]))))
    assert len(rows) == 3 * len(M.METRIC_NAMES)
    assert {r["value"] for r in rows if r["case_id"] == "missed" and r["metric"] == "hd"} == {"inf"}
    assert all(not math.isnan(float(r["value"])) for r in rows)


def test_parse_classes_from_values_names_and_regions():
    names = {0: "background", 1: "necrosis", 2: "edema", 3: "enhancing"}
    assert parse_classes("1,3", None, names, None) == {"necrosis": [1], "enhancing": [3]}
    assert parse_classes("edema", None, names, None) == {"edema": [2]}
    c = parse_classes(None, "whole=1,2,3;core=1,3", names, None)
    assert c["whole"] == [1, 2, 3] and c["core"] == [1, 3] and c["edema"] == [2]
    assert parse_classes("2", None, None, None) == {"2": [2]}


def test_cohort_writes_csv_summary_and_html_with_every_case(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    for i in range(3):
        _save(tmp_path / "r" / f"c{i}.nii.gz", _labels(0))
        _save(tmp_path / "p" / f"c{i}.nii.gz", _labels(i))
    _save(tmp_path / "r" / "lost.nii.gz", _labels(0))  # no prediction
    pairs = pairs_from_paths(tmp_path / "p", tmp_path / "r")
    out = tmp_path / "rep"
    res = evaluate_cohort(pairs, out, {"1": [1], "2": [2]}, workers=1)
    assert set(res.failures) == {"lost"} and "no prediction" in res.failures["lost"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_failed"] == 1 and summary["n_evaluated"] == 3
    # class 2 is identical everywhere, class 1 shifted by 0, 1, 2 voxels along I (1 mm)
    assert summary["metrics"]["2"]["dice"]["mean"] == 1.0
    assert summary["metrics"]["1"]["hd"]["max"] == pytest.approx(2.0)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    c2 = [r for r in rows if r["case_id"] == "c2" and r["class"] == "1" and r["metric"] == "dice"]
    assert float(c2[0]["value"]) == pytest.approx(2 * 5 * 7 * 4 / (2 * 7 * 7 * 4))
    html = (out / "report.html").read_text()
    for cid in ("c0", "c1", "c2", "lost"):
        assert cid in html
    assert "data:image/png;base64," in html and 'src="http' not in html
    # worst first: the failure, then c2 (largest shift), c0 (perfect) last
    order = [html.index(f">{c}<") for c in ("lost", "c2", "c1", "c0")]
    assert order == sorted(order)


def test_report_bytes_are_the_same_wherever_the_cases_ran(tmp_path, dask_cluster):
    """Sequential, one and two local worker processes and a Dask cluster: byte-identical
    metrics.csv, summary.json and report.html (results assembled in the pairs' order)."""
    from medseg.cohort import Where

    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    for i in range(5):
        _save(tmp_path / "r" / f"c{i}.nii.gz", _labels(0))
        _save(tmp_path / "p" / f"c{i}.nii.gz", _labels(i % 3))
    pairs = pairs_from_paths(tmp_path / "p", tmp_path / "r")
    places = {"seq": Where(), "w1": Where(workers=1), "w2": Where(workers=2),
              "dask": Where(scheduler=dask_cluster)}  # fmt: skip
    outputs = {}
    for name, where in places.items():
        res = evaluate_cohort(pairs, tmp_path / name, {"1": [1], "2": [2]}, where=where)
        assert not res.failures
        outputs[name] = {n: (tmp_path / name / n).read_bytes() for n in OUTPUT_NAMES}
    for name in ("w1", "w2", "dask"):
        assert outputs[name] == outputs["seq"], name
    # independent reference: case c1's class 1 is shifted by one voxel of 1 mm along I
    rows = list(csv.DictReader(io.StringIO(outputs["dask"]["metrics.csv"].decode())))
    dice = [r for r in rows if (r["case_id"], r["class"], r["metric"]) == ("c1", "1", "dice")]
    assert float(dice[0]["value"]) == pytest.approx(M.dice(_labels(1) == 1, _labels(0) == 1))


CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None
)


@pytest.mark.skipif(CHROMIUM is None, reason="headless chromium not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    for i in range(2):
        _save(tmp_path / "r" / f"case{i}.nii.gz", _labels(0))
        _save(tmp_path / "p" / f"case{i}.nii.gz", _labels(i))
    pairs = pairs_from_paths(tmp_path / "p", tmp_path / "r")
    evaluate_cohort(pairs, tmp_path / "rep", {"1": [1]}, workers=1)
    assert CHROMIUM is not None and shutil.which(CHROMIUM)
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
            (tmp_path / "rep" / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert "case0" in dom and "case1" in dom and "Per case" in dom


BRATS_CLASSES = (
    "background",
    "necrosis",
    "oedema",
    "non-enhancing tumour",
    "enhancing tumour",
    "whole",
    "core",
)


def test_box_plot_class_labels_do_not_overlap():
    """Seven BraTS classes, some with infinite values counted in their label."""
    from medseg.report.plots import box_strip_figure

    values = {n: [0.5, 0.7, float("inf")] if i % 2 else [0.9] for i, n in enumerate(BRATS_CLASSES)}
    plt, fig = box_strip_figure(values, "hd95", "mm")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].get_xticklabels()]
    plt.close(fig)
    assert len(boxes) == 7
    for a, b in zip(boxes, boxes[1:], strict=False):
        assert not a.overlaps(b), (a, b)


def test_wide_per_case_table_shows_one_dice_per_class_and_folds_the_rest():
    from medseg.report.html import render_report

    rng = np.random.default_rng(0)
    m = rng.random((9, 9)) > 0.5
    results = [
        CaseResult(
            f"case{i}",
            {n: M.all_metrics(m, np.roll(m, i, 0), (1.0, 1.0)) for n in BRATS_CLASSES},
            spacing=(1.0, 1.0),
        )
        for i in range(3)
    ]
    names = list(BRATS_CLASSES)
    summary = {
        "title": "t",
        "n_cases": 3,
        "n_evaluated": 3,
        "failures": {},
        "tolerance_mm": 2.0,
        "metrics": summarise(results, names),
    }
    html = render_report(summary, results, names, [])
    per_case = html[html.index("<h2>Per case") :]
    main, details = per_case.split("<details>", 1)
    header = main[main.index("<tr>") : main.index("</tr>")]
    assert header.count("<th") == 2 + len(names)  # case, mean Dice, one Dice per class
    assert 'class="scroll"' in main and "position:sticky" in html
    assert "HD95" in details and "NSD" in details and "HD95" not in header
