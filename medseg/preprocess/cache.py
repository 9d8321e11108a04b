"""The preprocessed cache: one folder per case, memory-mappable ``.npy`` files.

```
PREP/plan.json, PREP/fingerprint.json
PREP/cases/<case_id>/image.npy      float32 (C, I, J, K)
                    /label.npy      int16 (1, I, J, K) class indices, -1 = ignore
                    /weights.npy    float32 (1, I, J, K) border weight map (optional)
                    /locations.npz  "c<class>" -> int32 (N, 3) voxel coordinates, N <= 10000
                    /case.json      CaseRecord, input hash, file list
```
``case.json`` is written last and removed first when a case is redone, so a case folder is
complete exactly when its ``case.json`` exists: an interrupted run resumes cleanly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medseg import __version__, atomic
from medseg.errors import PlanError, WriteError
from medseg.preprocess.pipeline import CaseRecord

#: Bump when the cache format or the preprocessing maths change: old cases are redone.
CACHE_VERSION = 1
#: At most this many sampled voxel coordinates per class and case.
MAX_LOCATIONS = 10_000


@dataclass
class CachedCase:
    """A case read back from the cache (arrays memory-mapped unless ``mmap=False``)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    weights: np.ndarray | None
    locations: dict[int, np.ndarray]
    record: CaseRecord


def case_dir(prep_dir: str | os.PathLike[str], case_id: str) -> Path:
    return Path(prep_dir) / "cases" / case_id


def input_hash(files: list[Path], settings: dict[str, Any]) -> str:
    """SHA-256 of the inputs' paths, sizes and modification times and of ``settings``
    (the plan and the preprocessing options): equal hashes mean nothing to redo."""
    h = hashlib.sha256()
    h.update(
        json.dumps([CACHE_VERSION, __version__, settings], sort_keys=True, default=str).encode()
    )
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def is_current(prep_dir: str | os.PathLike[str], case_id: str, digest: str) -> bool:
    """True when the case is complete in the cache and was made from the same inputs."""
    p = case_dir(prep_dir, case_id) / "case.json"
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    files = d.get("files", [])
    return d.get("input_hash") == digest and all((p.parent / f).is_file() for f in files)


def sample_locations(classes: np.ndarray, num_classes: int, seed: str) -> dict[int, np.ndarray]:
    """Up to ``MAX_LOCATIONS`` random voxel coordinates ``(N, 3)`` of each class (seeded)."""
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    flat = classes.reshape(-1)
    out: dict[int, np.ndarray] = {}
    for c in range(num_classes):
        idx = np.flatnonzero(flat == c)
        if idx.size > MAX_LOCATIONS:
            idx = np.sort(rng.choice(idx, size=MAX_LOCATIONS, replace=False))
        out[c] = np.stack(np.unravel_index(idx, classes.shape), axis=1).astype(np.int32)
    return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic.write_with(path, lambda tmp: np.save(tmp, np.ascontiguousarray(array)))


def write_case(
    prep_dir: str | os.PathLike[str],
    case_id: str,
    *,
    image: np.ndarray,
    label: np.ndarray | None,
    weights: np.ndarray | None,
    locations: dict[int, np.ndarray] | None,
    record: CaseRecord,
    digest: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write one case atomically, file by file, ``case.json`` last.

    A case that cannot be written whole (disk full, a read-only folder) leaves nothing: its
    files are removed, and its folder too when that empties it."""
    d = case_dir(prep_dir, case_id)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"{d}: cannot create the case folder ({exc.strerror})") from exc
    (d / "case.json").unlink(missing_ok=True)
    try:
        return _write_files(d, case_id, image, label, weights, locations, record, digest, extra)
    except BaseException:
        for name in _CASE_FILES:
            (d / name).unlink(missing_ok=True)
        for folder in (d, d.parent):  # the case folder, then cases/ if this was its first
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise


#: Every file a case folder may hold (``case.json`` last written, first removed).
_CASE_FILES = ("image.npy", "label.npy", "weights.npy", "locations.npz", "case.json")


def _write_files(
    d: Path,
    case_id: str,
    image: np.ndarray,
    label: np.ndarray | None,
    weights: np.ndarray | None,
    locations: dict[int, np.ndarray] | None,
    record: CaseRecord,
    digest: str,
    extra: dict[str, Any] | None,
) -> Path:
    files = ["image.npy"]
    _save_npy(d / "image.npy", image.astype(np.float32, copy=False))
    for name, arr, dtype in (("label.npy", label, np.int16), ("weights.npy", weights, np.float32)):
        if arr is None:
            (d / name).unlink(missing_ok=True)
            continue
        _save_npy(d / name, arr.astype(dtype, copy=False))
        files.append(name)
    if locations is not None:
        locs = {f"c{c}": v.astype(np.int32) for c, v in locations.items()}
        atomic.write_with(d / "locations.npz", lambda tmp: np.savez(tmp, **locs))  # type: ignore[arg-type]
        files.append("locations.npz")
    meta = {
        "case_id": case_id,
        "input_hash": digest,
        "files": files,
        "shape": list(image.shape),
        "record": record.to_json(),
        **(extra or {}),
    }
    atomic.write_json(d / "case.json", meta)
    return d


def list_cases(prep_dir: str | os.PathLike[str]) -> list[str]:
    """Ids of the complete cases in the cache, sorted."""
    root = Path(prep_dir) / "cases"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "case.json").is_file())


def load_case(prep_dir: str | os.PathLike[str], case_id: str, mmap: bool = True) -> CachedCase:
    """Read one case; ``mmap=True`` maps the arrays so a patch read touches only its bytes."""
    d = case_dir(prep_dir, case_id)
    try:
        meta = json.loads((d / "case.json").read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(
            f"{d}: case {case_id!r} is not in the cache ({exc}); run medseg preprocess"
        ) from exc
    mode: Literal["r"] | None = "r" if mmap else None

    def opt(name: str) -> np.ndarray | None:
        return np.load(d / name, mmap_mode=mode) if name in meta["files"] else None

    image = np.load(d / "image.npy", mmap_mode=mode)
    locations: dict[int, np.ndarray] = {}
    if "locations.npz" in meta["files"]:
        with np.load(d / "locations.npz") as z:
            locations = {int(k[1:]): z[k] for k in z.files}
    return CachedCase(
        case_id=case_id,
        image=image,
        label=opt("label.npy"),
        weights=opt("weights.npy"),
        locations=locations,
        record=CaseRecord.from_json(meta["record"]),
    )
