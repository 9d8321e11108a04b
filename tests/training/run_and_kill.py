"""A training process that SIGKILLs itself at a chosen point, for the resume tests.

    python -m tests.training.run_and_kill PREP OUT EPOCHS THREADS [--resume] [--kill WHERE:STEP]

``WHERE`` is ``step`` (right after optimiser step STEP, between checkpoints), ``checkpoint``
(right after the checkpoint at step STEP is in place) or ``writing`` (during the write of
that checkpoint: its temporary file is complete but not yet renamed into place). The kill is
``os.kill(getpid(), SIGKILL)``: no cleanup, no ``finally``, as a crash or the OOM killer.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import torch


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(where: str, at: int) -> None:
    """Wrap the loop's step / checkpoint functions so the process dies at ``where:at``."""
    from medseg import atomic
    from medseg.training import loop
    from medseg.training.checkpoint import CHECKPOINT_LAST

    if where == "step":
        step = loop._step

        def killing_step(run: Any, learner: Any, state: Any, lp: Any, batch: Any) -> Any:
            out = step(run, learner, state, lp, batch)
            if state.step == at:
                _kill()
            return out

        loop._step = killing_step  # type: ignore[assignment]
    elif where == "checkpoint":
        save = loop._save_checkpoint

        def killing_save(run: Any, learner: Any, state: Any, rng: Any) -> None:
            save(run, learner, state, rng)
            if state.step == at:
                _kill()

        loop._save_checkpoint = killing_save  # type: ignore[assignment]
    elif where == "writing":
        save_torch = loop.save_torch

        def killing_save_torch(path: Path, obj: Any) -> None:
            if path.name == CHECKPOINT_LAST and obj["step"] == at:

                def write_then_die(tmp: Path) -> None:
                    torch.save(obj, tmp)
                    _kill()

                atomic.write_with(path, write_then_die)
            save_torch(path, obj)

        loop.save_torch = killing_save_torch  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown kill point {where!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("prep", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("epochs", type=int)
    ap.add_argument("threads", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.kill:
        where, at = args.kill.split(":")
        _install_kill(where, int(at))
    from medseg.training import train
    from tests.training.synthetic import synthetic_pipeline

    train(
        synthetic_pipeline(args.prep), args.out, epochs=args.epochs, device="cpu",
        deterministic=True, progress=False, resume=args.resume,
    )  # fmt: skip


if __name__ == "__main__":
    main()
