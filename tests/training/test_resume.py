"""Resume is bit-exact whatever stopped the run: a SIGKILL at any step (right after a
checkpoint, between checkpoints, during a checkpoint write), the time cap, a clean stop.

The network has dropout on, so the global torch generator shapes every step: a resume that
did not restore it would give other weights (the last test shows it does). Every run is
compared with one uninterrupted run by ``torch.equal`` on every tensor of the state dict.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medseg.training import train
from medseg.training.checkpoint import CHECKPOINT_LAST
from tests.training.synthetic import synthetic_pipeline, write_synthetic_cache

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 3  # 4 steps per epoch: checkpoints at steps 4, 8 and 12


@pytest.fixture(scope="module")
def dropout_prep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic cache with dropout 0.5 in the plan's network."""
    prep = tmp_path_factory.mktemp("dropout") / "prep"
    write_synthetic_cache(prep, dropout=0.5)
    return prep


@pytest.fixture(scope="module")
def reference(dropout_prep: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Final weights of one uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    res = _train(dropout_prep, out)
    assert res.steps_done == 12
    return _weights(out)


def _train(prep: Path, out: Path, **kw):
    return train(
        synthetic_pipeline(prep), out, epochs=EPOCHS, device="cpu", deterministic=True,
        progress=False, **kw,
    )  # fmt: skip


def _weights(out: Path) -> dict:
    return torch.load(out / CHECKPOINT_LAST, weights_only=True)["model"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _run_killed(prep: Path, out: Path, kill: str) -> subprocess.CompletedProcess:
    """The training in its own process, killed by SIGKILL at ``kill``."""
    cmd = [
        sys.executable, "-m", "tests.training.run_and_kill", str(prep), str(out), str(EPOCHS),
        str(torch.get_num_threads()), "--kill", kill,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc


def test_time_capped_run_resumes_to_the_uninterrupted_weights(
    dropout_prep: Path, reference: dict, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    first = _train(dropout_prep, out, overrides={"time_budget_minutes": 1e-6})
    assert first.stopped_by_budget and first.steps_done == 1  # cut mid-epoch
    res = _train(dropout_prep, out, resume=True)
    assert res.steps_done == 12 and not res.stopped_by_budget
    _assert_same_weights(_weights(out), reference)


def test_cleanly_stopped_run_resumes_to_the_uninterrupted_weights(
    dropout_prep: Path, reference: dict, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    _train(dropout_prep, out, stop_after_epochs=1)
    _train(dropout_prep, out, resume=True)
    _assert_same_weights(_weights(out), reference)


def test_run_killed_between_checkpoints_replays_to_the_uninterrupted_weights(
    dropout_prep: Path, reference: dict, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    _run_killed(dropout_prep, out, "step:6")  # 2 steps after the checkpoint at step 4
    assert torch.load(out / CHECKPOINT_LAST, weights_only=True)["step"] == 4
    _train(dropout_prep, out, resume=True)
    _assert_same_weights(_weights(out), reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kill", "checkpoint_step"),
    [("checkpoint:4", 4), ("step:5", 4), ("writing:8", 4), ("checkpoint:8", 8), ("step:11", 8)],
)
def test_run_killed_anywhere_resumes_to_the_uninterrupted_weights(
    dropout_prep: Path, reference: dict, tmp_path: Path, kill: str, checkpoint_step: int
) -> None:
    out = tmp_path / "run"
    _run_killed(dropout_prep, out, kill)
    assert torch.load(out / CHECKPOINT_LAST, weights_only=True)["step"] == checkpoint_step
    _train(dropout_prep, out, resume=True)
    _assert_same_weights(_weights(out), reference)
    # the temporary of a write cut short by the kill is gone once training wrote again
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_resume_without_the_rng_restore_gives_other_weights(
    dropout_prep: Path, reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dropout makes the generators matter: dropping their restore changes the result,
    so the tests above would catch a checkpoint that lost them."""
    from medseg.training import loop

    out = tmp_path / "run"
    _train(dropout_prep, out, stop_after_epochs=1)
    monkeypatch.setattr(loop, "set_rng_state", lambda _state: None)
    _train(dropout_prep, out, resume=True)
    after = _weights(out)
    assert any(not torch.equal(after[k], reference[k]) for k in reference)
