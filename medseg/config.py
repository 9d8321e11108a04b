"""Pipeline TOML files (``pipelines/X.toml``): what preprocess and train need for a data set.

```toml
name = "brats2013"
manifest = "data_manifests/brats2013.json"   # relative paths resolve against the current folder
prep_dir = "prep/brats2013"                  # preprocess writes here, train reads here

[plan]        # overrides of Plan fields (medseg/preprocess/plan.py), e.g. spatial_dims = 3
[preprocess]  # preprocessing options (workers, border weight maps, memory budget, ...)
[train]       # training options (epochs, optimiser, loss, augmentation, time budget, ...)
[infer]       # inference defaults (tta, tile size, ...)

[infer.dicom_codes.1]   # coded concepts of label value 1 in DICOM-SEG / RTSTRUCT outputs
category = ["SCT", "123037004", "Anatomical Structure"]
type = ["SCT", "10200004", "Liver"]
```
Each section is interpreted by the module that owns it; this module parses and checks the
top level, and checks that a preprocessed folder was planned with the pipeline's ``[plan]``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import PlanError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SECTIONS = ("plan", "preprocess", "train", "infer", "evaluate")


@dataclass(frozen=True)
class Pipeline:
    """A parsed pipeline TOML. ``path`` is where it was read from (None when built in code)."""

    name: str
    manifest: Path | None = None
    prep_dir: Path | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    infer: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    text: str = ""


def load_pipeline(path: str | os.PathLike[str]) -> Pipeline:
    """Read and check a pipeline TOML; raise ``PlanError`` naming the file on any problem."""
    p = Path(path)
    if p.is_dir():
        raise PlanError(f"{p}: is a folder; give a pipeline TOML file (see pipelines/)")
    if not p.is_file():
        raise PlanError(f"{p}: pipeline file not found; see pipelines/ for examples")
    try:
        text = p.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PlanError(f"{p}: not a valid TOML file ({exc})") from exc
    unknown = set(data) - {"name", "manifest", "prep_dir", *SECTIONS}
    if unknown:
        raise PlanError(f"{p}: unknown top-level keys {sorted(unknown)}; allowed: {SECTIONS}")
    for s in SECTIONS:
        if not isinstance(data.get(s, {}), dict):
            raise PlanError(f"{p}: [{s}] must be a table")
    dicom_codes(data.get("infer", {}), p)
    name = data.get("name", p.stem)
    if not isinstance(name, str) or not name:
        raise PlanError(f"{p}: name must be a non-empty string")
    return Pipeline(
        name=name,
        manifest=Path(data["manifest"]) if "manifest" in data else None,
        prep_dir=Path(data["prep_dir"]) if "prep_dir" in data else None,
        path=p,
        text=text,
        **{s: dict(data.get(s, {})) for s in SECTIONS},
    )


#: Plan fields that preprocessing always derives from the data, whatever ``[plan]`` says.
_DERIVED_NETWORK_KEYS = frozenset({"spatial_dims", "in_channels", "out_channels"})
_NATIVE_ORIENTATION = (None, False, "", "none", "native")


def _same(a: Any, b: Any) -> bool:
    """Equal as plan values: lists and tuples alike, floats to plan.json's 6 decimals."""
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, bool) or isinstance(b, bool):
            return a is b
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-6)
        except (TypeError, ValueError):
            return False
    return bool(a == b)


def _override_differs(key: str, wanted: Any, planned: dict[str, Any]) -> bool:
    """Whether ``[plan] key = wanted`` is not what ``planned`` (a plan.json object) holds.

    Mirrors how ``medseg.preprocess.plan.make_plan`` applies overrides: ``network``,
    ``channels`` (by position) and ``extra`` merge into the derived values, so only the keys
    given are compared; the network's dims and channel counts are always derived.
    """
    have = planned.get(key)
    if key == "orientation":
        wanted = None if wanted in _NATIVE_ORIENTATION else list(wanted)
        return not _same(wanted, have)
    if key == "crop_to_nonzero":
        return bool(wanted) != have
    if key in ("network", "extra") and isinstance(wanted, dict) and isinstance(have, dict):
        keys = set(wanted) - (_DERIVED_NETWORK_KEYS if key == "network" else set())
        return any(k not in have or not _same(wanted[k], have[k]) for k in keys)
    if key == "channels" and isinstance(wanted, list) and isinstance(have, list):
        if len(wanted) > len(have):
            return True
        return any(
            not isinstance(ov, dict) or any(not _same(v, ch.get(k)) for k, v in ov.items())
            for ov, ch in zip(wanted, have, strict=False)
        )
    return key not in planned or not _same(wanted, have)


def check_plan_overrides(pipeline: Pipeline, prep_dir: str | os.PathLike[str] | None) -> None:
    """Refuse a cache whose ``plan.json`` was made without the pipeline's ``[plan]`` overrides.

    ``medseg preprocess`` applies ``[plan]`` only when given ``--pipeline``; a cache made with
    ``--manifest/--out`` alone would otherwise train a different network, patch or spacing than
    the TOML says, silently. Nothing is checked when there is no ``[plan]`` or no plan.json
    yet (training then reports the missing cache itself).
    """
    if not pipeline.plan or prep_dir is None:
        return
    path = Path(prep_dir) / "plan.json"
    try:
        planned = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if not isinstance(planned, dict):
        return
    differ = sorted(k for k, v in pipeline.plan.items() if _override_differs(k, v, planned))
    if differ:
        source = pipeline.path or pipeline.name
        raise PlanError(
            f"{source} [plan]: {', '.join(differ)} differ from {path} (preprocessed without "
            f"these overrides); rerun: medseg preprocess --pipeline {source}"
        )


#: Keys of one ``[infer.dicom_codes.<value>]`` table.
_CODE_KEYS = ("category", "type")


def dicom_codes(infer: dict[str, Any], source: Path | str) -> dict[int, dict[str, list[str]]]:
    """``[infer.dicom_codes]`` checked: label value (a TOML key such as ``"1"``) -> ``category``
    and/or ``type``, each ``[coding scheme, code value, code meaning]`` of non-empty strings
    (e.g. ``["SCT", "10200004", "Liver"]``). These name the label's DICOM-SEG segment and
    RTSTRUCT ROI; a value left out gets the generic default (see
    :mod:`medseg.io.dicom_seg`). Raises ``PlanError`` naming ``source`` and the entry."""
    table = infer.get("dicom_codes", {})
    where = f"{source} [infer.dicom_codes]"
    if not isinstance(table, dict):
        raise PlanError(f"{where}: must be a table of label values, e.g. [infer.dicom_codes.1]")
    out: dict[int, dict[str, list[str]]] = {}
    for key, entry in table.items():
        if not str(key).isdigit() or int(key) < 1:
            raise PlanError(f'{where}: key {key!r} is not a nonzero label value such as "1"')
        if not isinstance(entry, dict) or not entry or set(entry) - set(_CODE_KEYS):
            raise PlanError(
                f"{where}.{key}: give category and/or type, each [scheme, code, meaning]"
            )
        for name, triple in entry.items():
            if not (
                isinstance(triple, list)
                and len(triple) == 3
                and all(isinstance(t, str) and t.strip() for t in triple)
            ):
                raise PlanError(
                    f"{where}.{key}.{name} = {triple!r}: give [scheme, code, meaning], e.g. "
                    '["SCT", "10200004", "Liver"]'
                )
        out[int(key)] = {name: list(triple) for name, triple in entry.items()}
    return out
