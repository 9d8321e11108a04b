"""``medseg demo``: the whole pipeline on the built-in phantom data set, end to end.

Generates the phantoms (``medseg.demo_data``), writes a pipeline TOML, then runs the same
commands a user runs, in-process: ``preprocess`` -> ``train`` -> ``infer`` (a cohort of NIfTI
files and one DICOM folder) -> ``evaluate``. Prints where the report is and the mean Dice.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from medseg import atomic
from medseg.errors import MedsegError

#: Network and patch for the demo: depth 2 keeps the valid-convolution margin at 20 voxels,
#: enough context for these phantoms and cheap on two CPU cores.
_PIPELINE = """\
name = "demo"
manifest = "{manifest}"
prep_dir = "{prep}"

[plan]
network = {{ depth = 2, base_channels = 16 }}
patch_output_size = [40, 40, 24]

[preprocess]
workers = 2

[train]
epochs = {epochs}
iterations_per_epoch = 25
batch_size = 2
optimizer = "adamw"
lr = 3e-3
val_every = 4
workers = 1
time_budget_minutes = {budget}
"""


@dataclass(frozen=True)
class DemoResult:
    report: Path
    mean_dice: float
    dicom_dice: float
    seconds: float


def _run(args: list[str]) -> None:
    from medseg.cli import app

    print("$ medseg " + " ".join(args), flush=True)
    app(args=args, standalone_mode=False)


def _mean_dice(summary: dict) -> float:
    """Mean over foreground classes of the per-class mean Dice in a ``summary.json``."""
    values = [
        float(stats["dice"]["mean"])
        for name, stats in summary["metrics"].items()
        if name != "background" and stats.get("dice", {}).get("mean") is not None
    ]
    if not values:
        raise MedsegError("demo: the evaluation summary holds no Dice values")
    return sum(values) / len(values)


def run_demo(
    out: Path, *, cases: int = 24, val: int = 6, budget_minutes: float = 5.0, seed: int = 0
) -> DemoResult:
    """Run the demo in ``out`` (created; an existing demo there is replaced step by step)."""
    from medseg.demo_data import make_case, write_dataset, write_dicom_series

    t0 = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    manifest = write_dataset(data, n_cases=cases, n_val=val, seed=seed)
    dicom_case = cases - 1  # a validation case, also written as a DICOM series
    image, label = make_case(seed, dicom_case)
    dicom_dir = data / "dicom" / f"demo_{dicom_case:03d}"
    write_dicom_series(image, dicom_dir, series_description="demo phantom")
    pipeline = out / "demo.toml"
    atomic.write_text(
        pipeline,
        _PIPELINE.format(
            manifest=manifest, prep=out / "prep", epochs=200, budget=float(budget_minutes)
        ),
    )
    run = out / "run"
    pred = out / "pred"
    pred.mkdir(exist_ok=True)
    _run(["preprocess", "--pipeline", str(pipeline)])
    _run(["train", "--pipeline", str(pipeline), "--out", str(run), "--fold", "manifest"])
    _run(
        ["infer", "--model", str(run), "--manifest", str(manifest), "--split", "val"]
        + ["--output", str(pred), "--overwrite"]
    )
    dicom_pred = out / f"demo_{dicom_case:03d}_from_dicom.nii.gz"
    _run(["infer", "--model", str(run), "--volume", str(dicom_dir), "--output", str(dicom_pred)])
    report = out / "report"
    _run(
        ["evaluate", "--manifest", str(manifest), "--split", "val", "--pred", str(pred)]
        + ["--out", str(report)]
    )
    dicom_report = out / "report_dicom"
    _run(
        ["evaluate", "--pred", str(dicom_pred)]
        + ["--ref", str(data / "labels" / f"demo_{dicom_case:03d}.nii.gz")]
        + ["--out", str(dicom_report)]
    )
    mean_dice = _mean_dice(json.loads((report / "summary.json").read_text()))
    dicom_dice = _mean_dice(json.loads((dicom_report / "summary.json").read_text()))
    return DemoResult(report / "report.html", mean_dice, dicom_dice, time.perf_counter() - t0)
