"""Checkpoints and what makes a resumed run identical: RNG state (``weights_only``-loadable),
seeding, deterministic kernels, atomic ``torch.save``, and the per-epoch ``train_log.csv``."""

from __future__ import annotations

import csv
import io
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg import atomic
from medseg.errors import ModelError

CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"


def rng_state() -> dict[str, Any]:
    """Python, numpy (legacy global), torch and CUDA generator states as plain values."""
    # the legacy global numpy state is saved because user code and libraries may draw from it
    np_state: Any = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": np_state[1].astype(np.int64).tolist(),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        ("MT19937", np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed the global Python, numpy and torch generators (process-wide)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels where the backend has them (warns where it has not).

    Process-wide: pair it with :func:`deterministic_flags_restored`."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


@contextmanager
def deterministic_flags_restored() -> Iterator[None]:
    """On exit, put back what :func:`set_deterministic` changes: torch's deterministic-algorithm
    flag (and its warn-only mode), cuDNN's deterministic and benchmark flags and
    ``CUBLAS_WORKSPACE_CONFIG``."""
    cudnn = torch.backends.cudnn
    algorithms = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_flags = (cudnn.deterministic, cudnn.benchmark)
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
        cudnn.deterministic, cudnn.benchmark = cudnn_flags
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` through the atomic writer: a kill leaves the old file or the new one."""
    atomic.write_with(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint (tensors and plain Python values only)."""
    if not path.is_file():
        raise ModelError(f"{path}: no checkpoint to resume from; start without --resume")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ModelError(f"{path}: unreadable checkpoint ({exc}); start without --resume") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ModelError(f"{path}: not a medseg training checkpoint")
    return ckpt


LOG_FIELDS = [
    "epoch", "step", "train_loss", "val_loss", "val_dice_mean", "lr", "seconds",
    "data_wait_fraction", "iterations_per_second",
]  # fmt: skip


def write_log(
    path: Path,
    rows: list[dict[str, Any]],
    class_names: Sequence[str],
    region_names: Sequence[str] = (),
) -> None:
    """Rewrite ``train_log.csv`` (atomically) with one row per epoch."""
    cols = LOG_FIELDS + [f"val_dice_{n}" for n in class_names]
    cols += [f"val_dice_region_{n}" for n in region_names]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    atomic.write_text(path, buf.getvalue())
