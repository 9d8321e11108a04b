"""Pipeline TOML files (``pipelines/X.toml``): what preprocess and train need for a data set.

```toml
name = "brats2013"
manifest = "data_manifests/brats2013.json"   # relative paths resolve against the current folder
prep_dir = "prep/brats2013"                  # preprocess writes here, train reads here

[plan]        # overrides of Plan fields (medseg/preprocess/plan.py), e.g. spatial_dims = 3
[preprocess]  # preprocessing options (workers, border weight maps, memory budget, ...)
[train]       # training options (epochs, optimiser, loss, augmentation, time budget, ...)
[infer]       # inference defaults (tta, tile size, ...)
```
Each section is interpreted by the module that owns it; this module only parses and checks
the top level.
"""

from __future__ import annotations

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
