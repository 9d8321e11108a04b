"""Cohorts: find the cases of a folder, take a shard of them, read each case's files,
segment every case and write its labels (and probabilities) beside the others.

Every case is a task of :func:`medseg.cohort.run_tasks`: in this process, in local worker
processes or on a Dask cluster, with the same bytes written. Each worker process loads the
model once (:func:`worker_model`, kept by :func:`medseg.cohort.cached`) and sets its own
allocator (:func:`load_for_infer`); the command's process sets nothing for the workers.

A case is finished (skipped on a rerun) when its label file exists, is at least as new as the
model folder's files and the case's inputs, and its probabilities exist where they are asked
for (:func:`is_finished`). Every file is written beside its target and renamed into place,
the labels last, so an interrupted case leaves no label file and runs again.

A bad case never stops a cohort: the others are finished and the failures listed at the end.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from medseg.cohort import CaseEvent, Where, cached, run_tasks
from medseg.errors import CohortError, MedsegError, ReadError, WriteError
from medseg.inference.case import predict_case
from medseg.inference.model_folder import LoadedModel
from medseg.inference.outputs import OutputSpec, case_output, check_case_input, write_outputs
from medseg.inference.outputs import probabilities_path as probabilities_path  # re-exported
from medseg.inference.outputs import write_prediction as write_prediction  # re-exported
from medseg.inference.tiled import TileLayout
from medseg.io import split_suffix
from medseg.report.stats import stats_path
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


# -- the model in a worker process -----------------------------------------------------------------
#: Files of a model folder whose change makes earlier outputs stale (see :func:`is_finished`).
MODEL_FILES = ("plan.json", "model.pt", "postprocessing.json")


def load_for_infer(
    model: str | os.PathLike[str], device: str, precision: str
) -> tuple[LoadedModel, dict[str, Any]]:
    """The model folder on its device, and the allocator settings its cases run with.

    The allocator is process-wide state, so this is called once per process that segments
    (a worker, or the command's own process when cases run there), never by other library
    code: freed memory goes back to the system (:func:`medseg.heap.return_freed_memory`), and
    where a kept heap was measured faster (:func:`medseg.runtime.kept_heap_pays`) the tiles
    are planned for it and each case's tiles run inside one (:func:`kept_heap_for`)."""
    from medseg import heap
    from medseg.inference.model_folder import load_model
    from medseg.runtime import check_precision, kept_heap_pays, resolve_device

    dev = resolve_device(device)
    check_precision(precision, dev)
    loaded = load_model(model, dev)
    heap.return_freed_memory()
    return loaded, {"keep_heap": kept_heap_pays(dev), "tile_scope": kept_heap_for}


def kept_heap_for(layout: TileLayout) -> AbstractContextManager[None]:
    """Freed activations kept in the heap while a case's tiles run, where ``layout`` was
    planned for it; afterwards the heap is given back (:func:`medseg.heap.kept_freed_memory`)."""
    from medseg import heap

    return heap.kept_freed_memory(layout.keep_heap)


@dataclass(frozen=True)
class InferSettings:
    """How every case of a cohort is segmented; sent to each worker, so plain values only.

    ``tile_size`` in voxels, ``max_memory`` in bytes (None: half the available memory),
    ``tta`` ``"flip"`` or None; ``suffix`` of the output files (None: from the input);
    ``allow_nonuniform`` and ``correct_tilt`` go to the DICOM reader; ``outputs`` says what
    each case is written as (:mod:`medseg.inference.outputs`); ``engine`` runs the network
    (``onnx``: the graph for ``onnxruntime``, :mod:`medseg.inference.engine`)."""

    model: Path
    device: str = "auto"
    precision: str = "auto"
    tile_size: int | tuple[int, ...] | None = None
    max_memory: int | None = None
    tta: str | None = None
    save_probabilities: bool = False
    series: str | None = None
    suffix: str | None = None
    allow_nonuniform: bool = False
    correct_tilt: bool = False
    outputs: OutputSpec = field(default_factory=OutputSpec)
    engine: str = "torch"
    onnx: Path | None = None

    def dicom_options(self) -> dict[str, bool]:
        """The DICOM reader's options that are set (:func:`read_case`)."""
        named = {"allow_nonuniform": self.allow_nonuniform, "correct_tilt": self.correct_tilt}
        return {k: True for k, v in named.items() if v}

    def predict_kw(self) -> dict[str, Any]:
        """Keyword arguments of :func:`medseg.inference.case.predict_case`."""
        return {
            "tile_size": self.tile_size,
            "max_memory": self.max_memory,
            "tta": self.tta,
            "save_probabilities": self.save_probabilities or self.outputs.needs_probabilities,
            "precision": self.precision,
        }

    def output(self, output_dir: Path, case: CaseInput) -> Path:
        """The label file of ``case`` in ``output_dir`` (see
        :func:`medseg.inference.outputs.case_output`)."""
        default = output_suffix(case.images[0], self.suffix)
        return case_output(output_dir, case.case_id, self.outputs.format, default)


def worker_model(settings: InferSettings) -> tuple[LoadedModel, dict[str, Any], bool]:
    """The model of ``settings`` in this process: loaded (with :func:`load_for_infer`) by the
    first case a process runs and kept for the next ones, per model folder, device and
    precision. Returns the model, its ``predict_case`` heap settings, and whether this call
    loaded it."""
    folder = Path(settings.model).resolve()
    # the files' times and sizes too: a model retrained into the same folder is loaded anew
    stamp = tuple((s.st_mtime_ns, s.st_size) for s in _stats(folder / n for n in MODEL_FILES))
    # and the exported graph's, for the onnxruntime engine: a re-export is loaded anew
    graph = Path(settings.onnx) if settings.onnx is not None else folder / "model.onnx"
    graph_stamp = [(s.st_mtime_ns, s.st_size) for s in _stats([graph])]
    engine = (settings.engine, str(graph), *(graph_stamp if settings.engine != "torch" else []))
    key = ("infer", str(folder), stamp, settings.device, settings.precision, engine)
    loads: list[bool] = []

    def load() -> tuple[LoadedModel, dict[str, Any]]:
        from medseg.inference.engine import with_engine

        loads.append(True)
        loaded, heap_kw = load_for_infer(settings.model, settings.device, settings.precision)
        return with_engine(loaded, settings.engine, onnx_path=settings.onnx), heap_kw

    loaded, heap_kw = cached(key, load, replaces=partial(_same_folder, key))
    return loaded, heap_kw, bool(loads)


def _same_folder(key: tuple[Any, ...], other: Any) -> bool:
    """``other`` keeps another version of ``key``'s model folder (retrained since)."""
    return isinstance(other, tuple) and other[:2] == key[:2] and other[3:] == key[3:]


def _stats(paths: Any) -> list[os.stat_result]:
    return [p.stat() for p in paths if p.exists()]


@dataclass(frozen=True)
class CaseDone:
    """A segmented case: the files written, the worker process (pid) that ran it, its wall
    time in seconds, and whether that process loaded the model for it (its first case)."""

    written: tuple[str, ...]
    worker: int
    seconds: float
    loaded_model: bool


def segment_case(settings: InferSettings, output_dir: Path, case: CaseInput) -> CaseDone:
    """Read, segment and write one case (a task: runs in whichever process takes it)."""
    t0 = time.perf_counter()
    check_case_input(case.images, settings.outputs.format, settings.series)
    loaded, heap_kw, first = worker_model(settings)
    images = read_case(case.images, settings.series, **settings.dicom_options())
    pred = predict_case(images, loaded, **settings.predict_kw(), **heap_kw)
    out = settings.output(output_dir, case)
    written = write_outputs(
        pred, images, case.images, out, loaded.plan, settings.outputs, series=settings.series
    )
    seconds = time.perf_counter() - t0
    return CaseDone(tuple(str(p) for p in written), os.getpid(), seconds, first)


def is_finished(settings: InferSettings, output_dir: Path, case: CaseInput) -> bool:
    """Whether ``case`` was segmented already: its label file (renamed into place last, so
    it exists only once the case is whole) is at least as new as every input file and every
    model file, and its probabilities file exists when ``save_probabilities`` asks for it
    (and its statistics when ``outputs.stats`` does: they are written after the labels)."""
    out = settings.output(output_dir, case)
    try:
        written = out.stat().st_mtime_ns
    except OSError:
        return False
    if settings.save_probabilities and not probabilities_path(out).exists():
        return False
    if settings.outputs.stats and not stats_path(out).exists():
        return False
    sources = [*case.images, *(Path(settings.model) / n for n in MODEL_FILES)]
    newest = max((s.st_mtime_ns for s in _stats(sources)), default=0)
    return written >= newest


# -- cohorts ---------------------------------------------------------------------------------------
@dataclass
class CohortOutcome:
    """What a cohort run did: cases segmented (case id -> :class:`CaseDone`) and cases found
    finished already, both in the cohort's order."""

    done: dict[str, CaseDone] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _case_id(case: CaseInput) -> str:
    return case.case_id


def run_cohort(
    cases: Sequence[CaseInput],
    settings: InferSettings,
    output_dir: Path,
    *,
    overwrite: bool = False,
    where: Where | None = None,
    on_event: Callable[[CaseEvent], None] | None = None,
) -> CohortOutcome:
    """Segment every case into ``output_dir/<case_id><suffix>`` where ``where`` says (default:
    this process); skip finished cases (:func:`is_finished`) unless ``overwrite``.

    ``on_event`` gets every case's :class:`~medseg.cohort.CaseEvent` (a progress bar). Bad
    cases are collected; ``CohortError`` lists them at the end, after the others are written.
    """
    if not output_dir.is_dir():
        raise WriteError(f"{output_dir}: output folder does not exist; create it first")
    settings = replace(settings, model=Path(settings.model).resolve())
    out_dir = output_dir.resolve()
    result = run_tasks(
        partial(segment_case, settings, out_dir),
        cases,
        key=_case_id,
        where=where,
        finished=None if overwrite else partial(is_finished, settings, out_dir),
        stage="infer",
        on_event=on_event,
    )
    order = [c.case_id for c in cases]
    outcome = CohortOutcome(
        {k: result.results[k] for k in order if k in result.results}, result.skipped
    )
    if result.failures:
        failures = {k: result.failures[k] for k in order if k in result.failures}
        raise CohortError(
            f"{len(failures)} of {len(cases)} cases failed; {len(outcome.done)} written to "
            f"{output_dir}, {len(outcome.skipped)} skipped (already done)",
            failures,
        )
    return outcome


def cohort_plan(settings: InferSettings, where: Where) -> Any:
    """The model's plan, for the command's process to find and check the cases; the model is
    checked here too, with ``--tile-size`` and ``--max-memory`` against it
    (:func:`medseg.inference.tiled.check_tiling`): one clear error before any case runs.
    In this process (``where`` not parallel) the model is loaded as its cases will use it
    (:func:`worker_model`); otherwise it is loaded on the CPU, checked, and dropped, and this
    process's settings stay as they are."""
    from medseg.inference.tiled import check_tiling

    if not where.parallel:
        loaded = worker_model(settings)[0]
    else:
        from medseg.inference.model_folder import load_model
        from medseg.runtime import check_precision, resolve_device

        check_precision(settings.precision, resolve_device(settings.device))
        loaded = load_model(settings.model, "cpu")
    check_tiling(loaded.model, loaded.plan.spatial_dims, settings.tile_size, settings.max_memory)
    return loaded.plan
