"""What a prediction is written as: a label image (NIfTI, NRRD, ...), a DICOM Segmentation or
an RT Structure Set of the input series, and, on request, its structure statistics.

Formats: ``nifti`` and ``nrrd`` write the label map (and ``--save-probabilities``) on the
scan's own grid; ``dicom-seg`` writes a Segmentation of the input DICOM series, one segment
per nonzero label value of the model, named by the plan's class names and coded by the
pipeline's ``[infer.dicom_codes]`` (:func:`medseg.config.dicom_codes`), BINARY, or
FRACTIONAL from the class probabilities on the scan's grid; ``rtstruct`` writes one ROI per
label value. Both DICOM objects need the input to be a DICOM series (they reference its
images); RTSTRUCT also needs single-frame images. :func:`check_case_input` says so before
any tile runs. In a cohort, case ``C`` is written as ``C.nii.gz`` / ``C.nrrd`` /
``C_seg.dcm`` / ``C_rtstruct.dcm``; statistics go to ``<stem>_stats.json`` beside each
prediction and, for a cohort, to one ``stats.csv`` (:func:`write_cohort_stats`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError, RTStructError, WriteError
from medseg.inference.case import CasePrediction
from medseg.preprocess.plan import Plan
from medseg.volume import Volume

FORMATS = ("nifti", "nrrd", "dicom-seg", "rtstruct")
DICOM_FORMATS = ("dicom-seg", "rtstruct")
#: Cohort file name of case ``C``: ``C`` + this suffix.
COHORT_SUFFIX = {
    "nifti": ".nii.gz",
    "nrrd": ".nrrd",
    "dicom-seg": "_seg.dcm",
    "rtstruct": "_rtstruct.dcm",
}
#: The cohort's statistics table, in the output folder.
STATS_CSV = "stats.csv"


@dataclass(frozen=True)
class OutputSpec:
    """How predictions are written: ``format`` (one of :data:`FORMATS`; None: from the
    output's suffix), FRACTIONAL DICOM-SEG, statistics, and coded concepts per label value
    (``[infer.dicom_codes]``). Probabilities a prediction carries are written beside label
    images (``--save-probabilities``); DICOM outputs carry them as FRACTIONAL segments."""

    format: str | None = None
    fractional: bool = False
    stats: bool = False
    codes: Mapping[Any, Mapping[str, Sequence[str]]] = field(default_factory=dict)

    @property
    def needs_probabilities(self) -> bool:
        """Whether the prediction must keep class probabilities on the scan's grid."""
        return self.fractional and self.format == "dicom-seg"


def resolve_format(output: Path, fmt: str | None, *, cohort: bool = False) -> str | None:
    """The format of ``--format`` (checked) or, for one output file, of its suffix: ``.dcm``
    is ``dicom-seg``, ``.nrrd`` ``nrrd``, NIfTI names ``nifti``; None for other image suffixes
    (written as their suffix says) and for cohorts without ``--format``."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise WriteError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
        if not cohort:
            _check_suffix(output, fmt)
        return fmt
    if cohort:
        return None
    name = output.name.lower()
    if name.endswith(".dcm"):
        return "dicom-seg"
    if name.endswith(".nrrd"):
        return "nrrd"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    return None


def _check_suffix(output: Path, fmt: str) -> None:
    name = output.name.lower()
    wanted = {"nifti": (".nii", ".nii.gz"), "nrrd": (".nrrd",)}.get(fmt)
    if wanted is not None and not name.endswith(wanted):
        raise WriteError(f"{output}: --format {fmt} writes {' or '.join(wanted)} files")
    if wanted is None and name.endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".png")):
        raise WriteError(f"{output}: --format {fmt} writes a DICOM file; name it .dcm")


def case_output(output_dir: Path, case_id: str, fmt: str | None, default_suffix: str) -> Path:
    """Where a cohort writes case ``case_id`` (:data:`COHORT_SUFFIX`, else ``default_suffix``)."""
    return output_dir / f"{case_id}{COHORT_SUFFIX.get(fmt or '', default_suffix)}"


def check_case_input(
    paths: Sequence[Path], fmt: str | None, series: str | int | None = None
) -> None:
    """Before any tile runs: a DICOM output needs a DICOM series as the case's (first)
    input, and RTSTRUCT one of single-frame images."""
    if fmt not in DICOM_FORMATS:
        return
    from medseg.io import volume_format

    first = Path(paths[0])
    if volume_format(first) != "dicom":
        raise WriteError(
            f"{first}: --format {fmt} needs a DICOM series as input (the object references "
            "its images); give the DICOM folder, or write --format nifti"
        )
    if fmt == "rtstruct":
        from medseg.io.dicom import read_geometry

        geometry = read_geometry(first, series=series)
        if geometry.enhanced or geometry.mosaic:
            kind = "an enhanced multi-frame" if geometry.enhanced else "a mosaic"
            raise RTStructError(
                f"{first}: {kind} series; RTSTRUCT contours need single-frame images, write "
                "a DICOM-SEG instead (--format dicom-seg)"
            )


def segment_names(plan: Plan) -> dict[int, str]:
    """Nonzero label value -> class name, in the plan's order."""
    return {
        int(v): str(n)
        for v, n in zip(plan.label_values, plan.class_names, strict=False)
        if int(v) != 0
    }


def fractional_maps(pred: CasePrediction, plan: Plan, values: Sequence[int]) -> np.ndarray:
    """``(S, I, J, K)`` probability of each label value in ``values`` on the scan's grid."""
    if pred.probabilities is None:
        raise MedsegError("FRACTIONAL output needs the prediction's probabilities")
    index = {int(v): c for c, v in enumerate(plan.label_values)}
    probs = np.asarray(pred.probabilities.array, dtype=np.float32)
    return np.clip(np.stack([probs[index[v]] for v in values]), 0.0, 1.0)


def probabilities_path(output: Path) -> Path:
    """Where ``--save-probabilities`` writes: ``<stem>_probabilities.nii.gz`` beside the labels."""
    from medseg.io import split_suffix

    stem, _ = split_suffix(output)
    return output.with_name(f"{stem}_probabilities.nii.gz")


def write_prediction(pred: CasePrediction, output: Path) -> list[Path]:
    """Write labels (and probabilities when present) atomically; returns the paths written."""
    from medseg.io import write_volume

    if not output.parent.is_dir():
        raise WriteError(f"{output}: folder {output.parent} does not exist; create it first")
    written = []
    if pred.probabilities is not None:
        pp = probabilities_path(output)
        write_volume(pred.probabilities, pp)
        written.append(pp)
    write_volume(pred.labels, output)
    written.append(output)
    return written


def write_outputs(
    pred: CasePrediction,
    images: Sequence[Volume],
    paths: Sequence[Path],
    output: Path,
    plan: Plan,
    spec: OutputSpec,
    *,
    series: str | int | None = None,
) -> list[Path]:
    """Write ``pred`` (of the case read from ``paths`` into ``images``) to ``output`` as
    ``spec`` says; returns the paths written, the prediction last but for its statistics."""
    if not output.parent.is_dir():
        raise WriteError(f"{output}: folder {output.parent} does not exist; create it first")
    fmt = spec.format
    if fmt not in DICOM_FORMATS:
        written = write_prediction(pred, output)
    else:
        written = [_write_dicom(pred, Path(paths[0]), output, plan, spec, series)]
    if spec.stats:
        written.append(write_stats(pred.labels, images, output, plan))
    return written


def _write_dicom(
    pred: CasePrediction,
    reference: Path,
    output: Path,
    plan: Plan,
    spec: OutputSpec,
    series: str | int | None,
) -> Path:
    names = segment_names(plan)
    labels = pred.labels
    if spec.format == "rtstruct":
        from medseg.io.rtstruct import write_rtstruct

        return write_rtstruct(labels, reference, output, names, series=series, codes=spec.codes)
    from medseg.io.dicom_seg import write_dicom_seg

    fractional = fractional_maps(pred, plan, sorted(names)) if spec.fractional else None
    return write_dicom_seg(
        labels, reference, output, names, series=series, codes=spec.codes, fractional=fractional
    )


def write_stats(labels: Volume, images: Sequence[Volume], output: Path, plan: Plan) -> Path:
    """``<stem>_stats.json`` beside ``output``: per model label, :mod:`medseg.report.stats`."""
    from medseg.atomic import write_json
    from medseg.report.stats import stats_json, stats_path, structure_stats

    names = segment_names(plan)
    stats = structure_stats(
        labels,
        images,
        names=names,
        values=sorted(names),
        channel_names=[c.name for c in plan.channels],
    )
    path = stats_path(output)
    write_json(path, stats_json(stats, prediction=output.name))
    return path


def write_cohort_stats(output_dir: Path, outputs: Mapping[str, Path]) -> Path | None:
    """One ``stats.csv`` in ``output_dir`` from the stats JSON of every case written
    (``case_id -> prediction path``; cases without one are left out). None if there are none."""
    from medseg.atomic import write_text
    from medseg.report.stats import csv_text, rows_from_json, stats_path

    rows: list[dict[str, Any]] = []
    for case_id, out in outputs.items():
        path = stats_path(out)
        if path.is_file():
            rows.extend(rows_from_json(case_id, json.loads(path.read_text(encoding="utf-8"))))
    if not rows:
        return None
    target = output_dir / STATS_CSV
    write_text(target, csv_text(rows))
    return target
