"""``medseg demo``: the whole pipeline on the built-in phantom data set, end to end.

Generates the phantoms (``medseg.demo_data``), writes a pipeline TOML, then runs the steps of
the commands a user runs, through the library functions those commands call: ``preprocess``
-> ``train`` -> ``infer`` (a cohort of NIfTI files and one DICOM folder) -> ``evaluate``.
Prints each step as its command line, and returns where the report is and the mean Dice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
steps = {steps}
iterations_per_epoch = 25
batch_size = 2
optimizer = "adamw"
lr = 3e-3
val_every = 4
workers = 1
{cap}"""


@dataclass(frozen=True)
class DemoResult:
    report: Path
    mean_dice: float
    dicom_dice: float
    seconds: float


# -- training and inference entry points ------------------------------------------------------
# The only lines that name where training and inference live; imported lazily (torch).


def _train_fn() -> Any:
    from medseg.training import train

    return train


def _inference_fns() -> tuple[Any, Any, Any]:
    from medseg.inference.cohort import CaseInput, InferSettings, run_cohort

    return CaseInput, InferSettings, run_cohort


# -- the steps, each what its command does ------------------------------------------------------


def _step(line: str) -> None:
    print(f"$ medseg {line}", flush=True)


def _preprocess(pipeline: Path) -> None:
    from medseg.config import load_pipeline
    from medseg.manifest import load_manifest
    from medseg.preprocess.cohort import Options, preprocess_cohort, summary

    _step(f"preprocess --pipeline {pipeline}")
    pipe = load_pipeline(pipeline)
    assert pipe.manifest is not None and pipe.prep_dir is not None
    opts = Options.from_dict(pipe.preprocess, source=f"{pipe.path} [preprocess]")
    result = preprocess_cohort(
        load_manifest(pipe.manifest),
        pipe.prep_dir,
        plan_overrides=pipe.plan,
        options=opts,
        source=f"{pipe.path} [plan]",
    )
    s = summary(pipe.prep_dir)
    print(
        f"{pipe.prep_dir}: {len(result.done)} case(s) written, {len(result.skipped)} up to "
        f"date; plan {s['spatial_dims']}D, spacing {s['target_spacing']}, depth {s['depth']}, "
        f"patch {s['patch_output_size']}, tile {s['tile_output_size']}"
    )


def _train(pipeline: Path, run: Path) -> None:
    from medseg.config import load_pipeline

    _step(f"train --pipeline {pipeline} --out {run} --fold manifest")
    result = _train_fn()(
        load_pipeline(pipeline), run, fold="manifest", device="auto", deterministic=False, log=print
    )
    best = "n/a" if result.best_dice is None else f"{result.best_dice:.4f}"
    print(
        f"{run}: {result.epochs_done} epochs, {result.steps_done} steps, "
        f"best validation Dice {best}"
    )


def _infer(run: Path, cases: list[tuple[str, list[Path]]], output: Path, what: str) -> None:
    """Segment ``(case_id, channel files)`` cases into ``output/<case_id>.nii.gz`` (overwritten)."""
    case_input, settings, run_cohort = _inference_fns()
    _step(f"infer --model {run} {what} --output {output}")
    outcome = run_cohort(
        [case_input(cid, scans) for cid, scans in cases], settings(run), output, overwrite=True
    )
    print(f"{output}: {len(outcome.done)} cases written")


def _evaluate(
    pairs: list[Any], out: Path, title: str, classes: dict[str, list[int]], pred: Path, ref: Path
) -> float:
    """Evaluate ``pairs`` into ``out`` (as ``medseg evaluate``); the mean foreground Dice."""
    from medseg.errors import CohortError
    from medseg.report.evaluate import default_workers, evaluate_cohort

    result = evaluate_cohort(
        pairs,
        out,
        classes,
        workers=default_workers(),
        title=title,
        settings={
            "pred": str(pred),
            "ref": str(ref),
            "resample_pred": False,
            "labels": None,
            "regions": None,
        },
        discover=not classes,
    )
    print(f"{out}: {len(pairs) - len(result.failures)} of {len(pairs)} cases evaluated")
    if result.failures:
        raise CohortError(f"{len(result.failures)} case(s) failed; see {out}", result.failures)
    return _mean_dice(result.summary)


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


#: Training steps of the demo: the recipe is steps, so every machine trains the same model.
DEMO_STEPS = 800


def run_demo(
    out: Path,
    *,
    cases: int = 24,
    val: int = 6,
    steps: int = DEMO_STEPS,
    budget_minutes: float | None = None,
    seed: int = 0,
) -> DemoResult:
    """Run the demo in ``out`` (created; an existing demo there is replaced step by step).

    ``steps`` optimiser steps of training; ``budget_minutes`` optionally caps its wall clock
    (a capped run says so and trains fewer steps)."""
    from medseg.demo_data import make_case, write_dataset, write_dicom_series
    from medseg.manifest import load_manifest
    from medseg.report.evaluate import pairs_from_manifest, pairs_from_paths, parse_classes

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
            manifest=manifest,
            prep=out / "prep",
            steps=int(steps),
            cap="" if budget_minutes is None else f"time_budget_minutes = {budget_minutes}\n",
        ),
    )
    run, pred, report = out / "run", out / "pred", out / "report"
    pred.mkdir(exist_ok=True)
    _preprocess(pipeline)
    _train(pipeline, run)
    m = load_manifest(manifest)
    val_cases = [c for c in m.cases if c.split == "val"]
    _infer(run, [(c.case_id, list(c.images)) for c in val_cases], pred, f"--manifest {manifest}")
    dicom_id = f"demo_{dicom_case:03d}_from_dicom"
    _infer(run, [(dicom_id, [dicom_dir])], out, f"--volume {dicom_dir}")
    _step(f"evaluate --manifest {manifest} --split val --pred {pred} --out {report}")
    pairs, m = pairs_from_manifest(manifest, pred, None, "val")
    classes = parse_classes(None, None, m.labels, m.regions)
    mean_dice = _evaluate(pairs, report, f"medseg evaluation: {m.name}", classes, pred, manifest)
    dicom_pred = out / f"{dicom_id}.nii.gz"
    ref = data / "labels" / f"demo_{dicom_case:03d}.nii.gz"
    _step(f"evaluate --pred {dicom_pred} --ref {ref} --out {out / 'report_dicom'}")
    title = f"medseg evaluation: {dicom_pred} vs {ref}"
    dicom_pairs = pairs_from_paths(dicom_pred, ref)
    dicom_dice = _evaluate(dicom_pairs, out / "report_dicom", title, {}, dicom_pred, ref)
    return DemoResult(report / "report.html", mean_dice, dicom_dice, time.perf_counter() - t0)
