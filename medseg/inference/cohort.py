"""Cohorts: find the cases of a folder, take a shard of them, read each case's files,
segment every case and write its labels (and probabilities) beside the others.

A bad case never stops a cohort: the others are finished and the failures listed at the end.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.cohort import describe_error
from medseg.errors import CohortError, MedsegError, ReadError, WriteError
from medseg.inference.case import CasePrediction, predict_case
from medseg.inference.model_folder import LoadedModel
from medseg.io import split_suffix
from medseg.volume import Volume

_WRITABLE = (".nii.gz", ".nii", ".nrrd", ".mha", ".png")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def output_suffix(first_input: Path, suffix: str | None = None) -> str:
    """Output file suffix: ``suffix`` if given, else the input's when writable (2D images
    become ``.png``, DICOM ``.nii.gz``)."""
    if suffix:
        return suffix if suffix.startswith(".") else "." + suffix
    _, s = split_suffix(first_input)
    s = s.lower()
    if s in _WRITABLE:
        return s
    if s in (".tif", ".tiff", ".gif", ".jpg", ".jpeg", ".bmp"):
        return ".png"
    return ".nii.gz"


def probabilities_path(output: Path) -> Path:
    """Where ``--save-probabilities`` writes: ``<stem>_probabilities.nii.gz`` beside the labels."""
    stem, _ = split_suffix(output)
    return output.with_name(f"{stem}_probabilities.nii.gz")


@dataclass(frozen=True)
class CaseInput:
    """One case: its id (the output file's stem) and one image file per channel, plan order."""

    case_id: str
    images: list[Path]


def discover_cases(input_dir: Path, n_channels: int) -> list[CaseInput]:
    """Cases in a folder: nnU-Net style ``CASE_0000.ext``, ``CASE_0001.ext`` ... (one file per
    channel), else one file (or DICOM sub-folder) per case. Hidden files are ignored."""
    if not input_dir.is_dir():
        raise ReadError(f"{input_dir}: input folder not found")
    entries = sorted(p for p in input_dir.iterdir() if not p.name.startswith("."))
    if not entries:
        raise ReadError(f"{input_dir}: the folder is empty")
    stems = [(p, *split_suffix(p)) for p in entries]
    matched = [(p, _CHANNEL_RE.match(stem)) for p, stem, _ in stems]
    if all(m is not None for _, m in matched):
        groups: dict[str, dict[int, Path]] = {}
        for p, m in matched:
            assert m is not None
            groups.setdefault(m["case"], {})[int(m["ch"])] = p
        cases = []
        for cid, chans in sorted(groups.items()):
            if sorted(chans) != list(range(len(chans))):
                raise ReadError(
                    f"{input_dir}: case {cid} has channel files {sorted(chans)}; expected "
                    f"_0000 .. _{len(chans) - 1:04d}"
                )
            cases.append(CaseInput(cid, [chans[i] for i in range(len(chans))]))
        return cases
    if n_channels > 1:
        raise ReadError(
            f"{input_dir}: the model needs {n_channels} channels per case; name the files "
            "CASE_0000.nii.gz, CASE_0001.nii.gz, ... or use --manifest"
        )
    return [CaseInput(stem, [p]) for p, stem, _ in stems]


def select_shard(items: Sequence[Any], shard: str | None) -> list[Any]:
    """Items of shard ``"i/n"`` (0-based ``i``): every n-th item starting at ``i``."""
    if not shard:
        return list(items)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise MedsegError(f"--shard {shard!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    i, n = int(m[1]), int(m[2])
    return list(items)[i::n]


def read_case(
    paths: Sequence[Path], series: str | None = None, **dicom_options: bool
) -> list[Volume]:
    """Read one case's channel files; ``series`` and ``dicom_options`` (``allow_nonuniform``,
    ``correct_tilt``) apply to DICOM inputs only."""
    from medseg.io import read_volume, volume_format

    vols = []
    for p in paths:
        opts: dict[str, Any] = {}
        if volume_format(p) == "dicom":
            opts = {**dicom_options, **({"series": series} if series is not None else {})}
        vols.append(read_volume(p, **opts))
    return vols


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


def run_cohort(
    cases: Sequence[CaseInput],
    loaded: LoadedModel,
    output_dir: Path,
    *,
    overwrite: bool = False,
    suffix: str | None = None,
    series: str | None = None,
    on_case: Callable[[str, str], None] | None = None,
    dicom_options: dict[str, bool] | None = None,
    **predict_kw: Any,
) -> dict[str, str]:
    """Segment every case into ``output_dir/<case_id><suffix>``; skip finished cases unless
    ``overwrite``. A case that raises anything (a bad file, out of memory) is collected and
    the others finish; ``CohortError`` lists them at the end.
    Returns ``{case_id: "done" | "skipped"}``."""
    if not output_dir.is_dir():
        raise WriteError(f"{output_dir}: output folder does not exist; create it first")
    status: dict[str, str] = {}
    failures: dict[str, str] = {}
    for case in cases:
        out = output_dir / f"{case.case_id}{output_suffix(case.images[0], suffix)}"
        if out.exists() and not overwrite:
            status[case.case_id] = "skipped"
        else:
            try:
                images = read_case(case.images, series, **(dicom_options or {}))
                pred = predict_case(images, loaded, **predict_kw)
                write_prediction(pred, out)
                status[case.case_id] = "done"
            except Exception as exc:  # noqa: BLE001 - one case's fault (even out of memory)
                failures[case.case_id] = describe_error(exc)  # must not stop the cohort
                status[case.case_id] = "failed"
        if on_case is not None:
            on_case(case.case_id, status[case.case_id])
    if failures:
        done = sum(s == "done" for s in status.values())
        skipped = sum(s == "skipped" for s in status.values())
        raise CohortError(
            f"{len(failures)} of {len(cases)} cases failed; {done} written to {output_dir}, "
            f"{skipped} skipped (already done)",
            failures,
        )
    return status
