"""Checkpoints: atomic writes, RNG state that survives ``weights_only`` loading, and
deterministic flags that are put back."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.training import train
from medseg.training.checkpoint import (
    CHECKPOINT_LAST,
    deterministic_flags_restored,
    rng_state,
    save_torch,
    set_deterministic,
    set_rng_state,
)
from tests.training.synthetic import synthetic_pipeline


def test_interrupted_checkpoint_write_leaves_the_last_one_loadable(
    prep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    train(synthetic_pipeline(prep), out, epochs=1, device="cpu", progress=False)
    before = torch.load(out / CHECKPOINT_LAST, weights_only=True)

    def killed_mid_write(obj, path) -> None:
        Path(path).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_torch(out / CHECKPOINT_LAST, {"model": {}})
    after = torch.load(out / CHECKPOINT_LAST, weights_only=True)
    assert after["step"] == before["step"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def _draws() -> tuple:
    return (
        random.random(),
        np.random.random(3).tolist(),  # noqa: NPY002 - the legacy global state is saved
        np.random.standard_normal(),  # noqa: NPY002 - leaves a cached Gaussian behind
        torch.rand(3).tolist(),
    )


def test_rng_state_saved_in_a_weights_only_file_replays_the_same_draws(tmp_path: Path) -> None:
    np.random.standard_normal()  # noqa: NPY002 - a cached second Gaussian is state too
    save_torch(tmp_path / "rng.pt", rng_state())
    expected = _draws()
    _draws()  # move every generator on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def test_deterministic_flags_are_put_back_after_the_block() -> None:
    cudnn = torch.backends.cudnn
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.deterministic,
        cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    with deterministic_flags_restored():
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert cudnn.deterministic and not cudnn.benchmark
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    after = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.deterministic,
        cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    assert after == before
