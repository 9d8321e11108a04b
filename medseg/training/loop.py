"""The training loop: setup, resume (or a fresh run folder), epochs of steps, finish.

The recipe follows nnU-Net (Isensee et al. 2021) where the U-Net paper leaves it open: SGD with
Nesterov momentum 0.99 and a poly learning-rate schedule ``lr0 (1 - progress)^0.9`` (or AdamW),
gradient-norm clipping at 12, foreground oversampling of 1/3 of each batch, a fixed number of
iterations per epoch. Validation (:mod:`medseg.training.validation`) segments every validation
case whole and reports Dice per class.

Length: the recipe's optimiser steps (:attr:`TrainConfig.total_steps`); the learning rate
follows the step alone. ``time_budget_minutes`` only caps an invocation's wall clock, and a run
it stops says so in the log, the result and ``train_summary.json``.

Reproducibility: every batch is drawn from its own generator ``(seed, rank, step)`` (see
:mod:`medseg.training.data`), so a checkpoint's step counter is the whole sampler state; the
checkpoint at the end of each epoch also holds the weights, the optimiser and the Python,
numpy and torch generators as the last step left them (validation runs between, and its use
of the generators is undone, so it cannot move training). In deterministic mode a run resumed
from any checkpoint, whatever stopped it (a kill, the time cap, a clean stop), ends with the
same weights as one run in one go: a kill between checkpoints replays the steps since the last.

Run folder (``out_dir``): ``pipeline.toml`` (copy), ``plan.json``, ``model.pt`` (plain state
dict, ``torch.load(weights_only=True)``), ``checkpoint_last.pt`` and ``checkpoint_best.pt``,
``train_log.csv``, ``training.json``, ``train_summary.json`` (:mod:`medseg.runinfo`),
``postprocessing.json``. The folder is locked (:func:`medseg.atomic.folder_lock`) while
training writes it. Everything is written by rank 0
through ``medseg.atomic``.

Phases pass values, not long parameter lists: :class:`~medseg.training.setup.Run` (fixed for
the invocation), :class:`~medseg.training.setup.Learner` (network, optimiser, loss),
:class:`_Loop` (what the epochs run on) and the mutable :class:`_State` (what a checkpoint
saves).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medseg import atomic
from medseg.config import Pipeline
from medseg.errors import ModelError
from medseg.runinfo import (
    STOPPED_BY_STEPS,
    STOPPED_BY_TIME,
    SUMMARY_NAME,
    cpu_info,
    stop_message,
)
from medseg.runtime import bf16_autocast
from medseg.training.checkpoint import (
    CHECKPOINT_BEST,
    CHECKPOINT_LAST,
    deterministic_flags_restored,
    load_checkpoint,
    rng_state,
    save_torch,
    set_rng_state,
    write_log,
)
from medseg.training.data import PatchBatches, StepRange
from medseg.training.distributed import (
    DistInfo,
    barrier,
    broadcast_flag,
    broadcast_float,
    launch_rank,
    sync_buffers,
)
from medseg.training.setup import Learner, Run, build_learner, setup_run
from medseg.training.validation import Validation, postprocessing_decision, validate

Batch = dict[str, torch.Tensor]


@dataclass
class TrainResult:
    """What a training run produced (``model`` is the unwrapped network, last weights).

    ``message`` is the one line a command prints last: the steps done, and "stopped by the
    time budget at step N of M" when the cap ended the run; ``rank`` is this process's."""

    run_dir: Path
    model: nn.Module
    epochs_done: int
    steps_done: int
    steps_planned: int
    best_dice: float | None
    stopped_by_budget: bool
    log: list[dict[str, Any]]
    message: str = ""
    rank: int = 0


@dataclass(frozen=True)
class _Loop:
    """What the epochs of this invocation run on: steps up to ``end_step`` (of ``total``
    planned); ``budget`` in seconds of this invocation."""

    net: nn.Module
    loader: DataLoader
    end_step: int
    total: int
    autocast: bool
    budget: float | None
    writer: Any


@dataclass
class _State:
    """The run's progress: what a checkpoint saves and a resume restores. ``epoch`` is the
    epoch the last step lies in (an epoch cut short by the time cap is finished on resume and
    logs a second row under the same number)."""

    epoch: int = 0
    step: int = 0
    elapsed_before: float = 0.0
    best: float | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    #: validation of the weights in model.pt, for the postprocessing decision
    model_val: Validation | None = None
    val_seconds: float = 0.0
    stopped: bool = False
    t_start: float = 0.0

    def elapsed(self) -> float:
        """Seconds of training so far, resumed runs included."""
        return self.elapsed_before + self.this_run()

    def this_run(self) -> float:
        """Seconds of training in this invocation."""
        return time.perf_counter() - self.t_start


def train(
    pipeline: Pipeline,
    out_dir: str | os.PathLike[str],
    *,
    fold: int | str | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    resume: bool = False,
    device: str = "auto",
    deterministic: bool | None = None,
    prep_dir: str | os.PathLike[str] | None = None,
    stop_after_epochs: int | None = None,
    progress: bool = True,
    overrides: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train one model (one fold) into ``out_dir``; see the module docstring.

    ``epochs`` / ``steps`` override the recipe's length (``epochs`` then counts, not a
    ``[train] steps``). ``stop_after_epochs`` ends this invocation after that many epochs (as
    if interrupted; the schedule still aims at the planned steps), so a later ``resume=True``
    continues it.

    ``out_dir`` is checked for writability before anything is built and locked while training
    writes it (rank 0): a second ``train`` on it raises :class:`~medseg.errors.LockError`
    naming the holder.

    Process-wide state: the global Python, numpy and torch generators are seeded from the
    config's ``seed`` before the network is initialised (a resume then restores them from the
    checkpoint) and are left as training leaves them. torch's deterministic-algorithm and cuDNN
    flags are set from ``deterministic`` while training runs and restored when it returns or
    raises. The allocator (:mod:`medseg.heap`) is left alone: the CLI opts in.
    """
    atomic.check_writable_folder(out_dir)
    lock = (
        atomic.folder_lock(out_dir, "medseg train")
        if launch_rank() == 0
        else contextlib.nullcontext()
    )
    with lock, deterministic_flags_restored():
        run = setup_run(
            pipeline, out_dir, fold=fold, epochs=epochs, steps=steps, device=device,
            deterministic=deterministic, prep_dir=prep_dir, overrides=overrides, log=log,
        )  # fmt: skip
        learner = build_learner(run)
        state = _resume(run, learner) if resume else _start(run)
        barrier(run.info)
        loop = _prepare_loop(run, learner, state, stop_after_epochs)
        state.t_start = time.perf_counter()
        _run_epochs(run, learner, state, loop, progress and run.info.is_main)
        message = _finish(run, learner, state, loop)
    return TrainResult(
        run.out, learner.model, state.epoch, state.step, loop.total, state.best, state.stopped,
        state.rows, message, run.info.rank,
    )  # fmt: skip


# -- resume or start ---------------------------------------------------------------------------
def _resume(run: Run, learner: Learner) -> _State:
    """Weights, optimiser, progress and RNG state of ``checkpoint_last.pt``."""
    ckpt_path = run.out / CHECKPOINT_LAST
    ckpt = load_checkpoint(ckpt_path)
    if str(ckpt.get("fold")) != str(run.cfg.fold):
        raise ModelError(
            f"{ckpt_path}: checkpoint is fold {ckpt.get('fold')}, not {run.cfg.fold}; "
            "resume with the same --fold"
        )
    learner.model.load_state_dict(ckpt["model"])
    learner.opt.load_state_dict(ckpt["optimizer"])
    state = _State(
        epoch=int(ckpt["epoch"]),
        step=int(ckpt["step"]),
        elapsed_before=float(ckpt.get("elapsed", 0.0)),
        best=ckpt.get("best"),
        rows=list(ckpt.get("log", [])),
    )
    set_rng_state(ckpt["rng"])
    run.say(f"resuming {run.out} at epoch {state.epoch} (step {state.step})")
    return state


def _start(run: Run) -> _State:
    """A new run folder (rank 0): plan.json and the pipeline's text; refuses an existing run."""
    if run.info.is_main:
        if (run.out / CHECKPOINT_LAST).exists():
            raise ModelError(
                f"{run.out}: already holds a training run; use --resume or a new --out"
            )
        run.out.mkdir(parents=True, exist_ok=True)
        run.plan.save(run.out / "plan.json")
        if run.pipeline.text:
            atomic.write_text(run.out / "pipeline.toml", run.pipeline.text)
    return _State()


# -- epochs ----------------------------------------------------------------------------------------
def _prepare_loop(
    run: Run, learner: Learner, state: _State, stop_after_epochs: int | None
) -> _Loop:
    """DDP wrapper, the batch loader from the current step, precision, budget, TensorBoard."""
    cfg, dev, info = run.cfg, run.dev, run.info
    net: nn.Module = learner.model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            learner.model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    dataset = PatchBatches(
        run.prep, run.train_ids, run.sampling, run.augment, cfg.batch_size, cfg.seed, info.rank,
        with_weights=learner.loss_fn.needs_weights,
    )  # fmt: skip
    total = cfg.total_steps
    end_step = total
    if stop_after_epochs is not None:
        ipe = cfg.iterations_per_epoch
        end_step = min(total, (state.step // ipe + stop_after_epochs) * ipe)
    loader = DataLoader(
        dataset,
        batch_size=None,
        sampler=StepRange(state.step, end_step),
        num_workers=cfg.workers,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if cfg.workers > 0 else None,
        persistent_workers=False,
        # batches draw from their own (seed, rank, step) streams; a private generator keeps
        # the loader from consuming the global torch RNG, so resumed runs stay identical
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return _Loop(
        net=net,
        loader=loader,
        end_step=end_step,
        total=total,
        autocast=cfg.amp and bf16_autocast(dev),
        budget=cfg.time_budget_minutes * 60.0 if cfg.time_budget_minutes else None,
        writer=_tensorboard(run.out) if (cfg.tensorboard and info.is_main) else None,
    )


def _run_epochs(run: Run, learner: Learner, state: _State, loop: _Loop, show: bool) -> None:
    """Epochs until ``loop.end_step`` or the time cap, under a progress bar."""
    bar = _progress(show)
    with bar:
        batches = iter(loop.loader)
        task = bar.add_task("train", total=loop.end_step - state.step, loss=float("nan"))

        def advance(loss: float) -> None:
            bar.update(task, advance=1, loss=loss)

        while state.step < loop.end_step and not state.stopped:
            _epoch(run, learner, state, loop, batches, advance)
    del batches
    if state.stopped:
        run.say(f"{run.out}: {stop_message(state.step, loop.total)}")


def _epoch(
    run: Run,
    learner: Learner,
    state: _State,
    loop: _Loop,
    batches: Iterator[Batch],
    advance: Callable[[float], None],
) -> None:
    """The steps to the end of the current epoch (the rest of it after a resume from a cut
    short one), then validation (when due), the log row and the checkpoint."""
    loop.net.train()
    t_epoch, wait, losses = time.perf_counter(), 0.0, []
    lr = 0.0
    ipe = run.cfg.iterations_per_epoch
    epoch_end = min((state.step // ipe + 1) * ipe, loop.end_step)
    while state.step < epoch_end:
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        lr, loss = _step(run, learner, state, loop, batch)
        losses.append(loss)
        advance(loss)
        if _out_of_time(state, loop, run.info):
            state.stopped = True
            break
    state.epoch = -(-state.step // ipe)  # the epoch the last step lies in
    # DDP broadcasts rank 0's buffers (batch-norm statistics) before each forward; do it
    # once more so every rank ends the epoch with the model rank 0 validates and saves
    sync_buffers(learner.model, run.info)
    seconds = time.perf_counter() - t_epoch
    row: dict[str, Any] = {
        "epoch": state.epoch,
        "step": state.step,
        "train_loss": round(float(np.mean(losses)), 6),
        "lr": lr,
        "seconds": round(seconds, 3),
        "data_wait_fraction": round(wait / max(seconds, 1e-9), 4),
        "iterations_per_second": round(len(losses) / max(seconds, 1e-9), 3),
    }
    # the generators as the steps left them: validation must not move them, so that training
    # continues (here, or after a resume from this checkpoint) from the same state either way
    rng = rng_state()
    _validate_epoch(run, learner, state, row, last=state.step == loop.end_step or state.stopped)
    set_rng_state(rng)
    state.val_seconds = broadcast_float(state.val_seconds, run.info)
    state.rows.append(row)
    if loop.writer is not None:
        for k, val in row.items():
            if isinstance(val, (int, float)) and k != "epoch":
                loop.writer.add_scalar(k, val, state.epoch)
    _save_checkpoint(run, learner, state, rng)
    barrier(run.info)


def _step(
    run: Run, learner: Learner, state: _State, loop: _Loop, batch: Batch
) -> tuple[float, float]:
    """One optimiser step on ``batch`` at the poly learning rate; returns (lr, loss)."""
    cfg, dev = run.cfg, run.dev
    x = batch["image"].to(dev, non_blocking=True).contiguous(memory_format=learner.fmt)
    y = batch["label"].to(dev, non_blocking=True)
    w = batch["weights"].to(dev, non_blocking=True) if "weights" in batch else None
    # the schedule follows the step alone: the same recipe gives the same model on any machine
    lr = _poly(cfg.learning_rate, state.step / loop.total, cfg.poly_exponent)
    for g in learner.opt.param_groups:
        g["lr"] = lr
    learner.opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=loop.autocast):
        logits = loop.net(x)
    loss = learner.loss_fn(logits.float(), y, w)
    if not torch.isfinite(loss):
        raise ModelError(
            f"training diverged at step {state.step} (loss {loss.item()}); lower [train] lr"
        )
    loss.backward()
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(learner.model.parameters(), cfg.grad_clip)
    learner.opt.step()
    state.step += 1
    return lr, float(loss.detach())


def _out_of_time(state: _State, loop: _Loop, info: DistInfo) -> bool:
    """Whether this invocation's time cap leaves no room for another step plus the final
    validation (rank 0 decides, so every rank stops at the same step)."""
    if not loop.budget or state.step >= loop.end_step:
        return False
    return broadcast_flag(state.this_run() + 1.2 * state.val_seconds + 5 > loop.budget, info)


def _poly(lr0: float, progress: float, exponent: float) -> float:
    return lr0 * max(0.0, 1.0 - min(progress, 1.0)) ** exponent


def _validate_epoch(
    run: Run, learner: Learner, state: _State, row: dict[str, Any], *, last: bool
) -> None:
    """Validate on rank 0 when due (every ``val_every`` epochs and the last), add the scores to
    ``row``, keep the best weights, and say how the epoch went."""
    cfg = run.cfg
    due = state.epoch % cfg.val_every == 0 or last
    if not (run.val_ids and run.info.is_main and due):
        run.say(f"epoch {state.epoch}: loss {row['train_loss']:.4f}")
        return
    tv = time.perf_counter()
    v = validate(learner.model, run.prep, run.val_ids, run.plan, learner.loss_fn, cfg.val_tile_size)
    state.val_seconds = time.perf_counter() - tv
    row["val_loss"] = v.loss
    row["val_dice_mean"] = round(v.mean_dice, 6)
    row.update({f"val_dice_{k}": round(d, 6) for k, d in v.dice.items()})
    row.update({f"val_dice_region_{k}": round(d, 6) for k, d in v.region_dice.items()})
    if cfg.select == "last":
        state.model_val = v
    if state.best is None or v.mean_dice > state.best:
        state.best = v.mean_dice
        weights = {k: t.detach().cpu() for k, t in learner.model.state_dict().items()}
        save_torch(run.out / CHECKPOINT_BEST, weights)
        if cfg.select == "best":
            state.model_val = v
            save_torch(run.out / "model.pt", weights)
    run.say(
        f"epoch {state.epoch}: loss {row['train_loss']:.4f}, val Dice {v.mean_dice:.4f} "
        f"({', '.join(f'{k} {d:.3f}' for k, d in v.dice.items())})"
        + "".join(f", region {k} {d:.3f}" for k, d in v.region_dice.items())
    )


def _save_checkpoint(run: Run, learner: Learner, state: _State, rng: dict[str, Any]) -> None:
    """``checkpoint_last.pt`` (with ``rng``, the generators after the epoch's last step),
    ``train_log.csv`` and, without best-epoch selection, ``model.pt`` (rank 0)."""
    if not run.info.is_main:
        return
    cfg = run.cfg
    weights = {k: v.detach().cpu() for k, v in learner.model.state_dict().items()}
    ckpt = {
        "model": weights,
        "optimizer": learner.opt.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "elapsed": state.elapsed(),
        "best": state.best,
        "fold": str(cfg.fold),
        "train_cases": run.train_ids,
        "val_cases": run.val_ids,
        "rng": rng,
        "sampler": {"seed": cfg.seed, "world_size": run.info.world_size, "step": state.step},
        "config": {k: v for k, v in asdict(cfg).items() if v is not None},
        "log": state.rows,
    }
    save_torch(run.out / CHECKPOINT_LAST, ckpt)
    if cfg.select == "last" or not run.val_ids:
        save_torch(run.out / "model.pt", weights)
    write_log(
        run.out / "train_log.csv", state.rows, run.plan.class_names, list(run.plan.regions or {})
    )


# -- finish ----------------------------------------------------------------------------------------
def _finish(run: Run, learner: Learner, state: _State, loop: _Loop) -> str:
    """model.pt, the postprocessing decision (when training finished), training.json and
    train_summary.json; returns the line a command prints last."""
    cfg, out = run.cfg, run.out
    if run.info.is_main:
        if cfg.select == "best" and run.val_ids and not (out / "model.pt").exists():
            weights = {k: t.cpu() for k, t in learner.model.state_dict().items()}
            save_torch(out / "model.pt", weights)
        finished = state.step >= loop.total or state.stopped
        if finished and cfg.postprocess and run.val_ids:
            _write_postprocessing(run, state)
        atomic.write_json(out / "training.json", _training_record(run, state, loop.autocast))
        atomic.write_json(out / SUMMARY_NAME, _summary(state, loop))
    if loop.writer is not None:
        loop.writer.close()
    barrier(run.info)
    best = "n/a" if state.best is None else f"{state.best:.4f}"
    done = (
        stop_message(state.step, loop.total)
        if state.stopped
        else f"{state.step} of {loop.total} steps"
    )
    return f"{out}: {done} ({state.epoch} epochs), best validation Dice {best}"


def _summary(state: _State, loop: _Loop) -> dict[str, Any]:
    """``train_summary.json``: how far the run got, what stopped it, on which CPU and torch."""
    if state.stopped:
        stopped_by = STOPPED_BY_TIME
    elif state.step >= loop.total:
        stopped_by = STOPPED_BY_STEPS
    else:  # the library's stop_after_epochs: resumed later with --resume
        stopped_by = "stop_after_epochs"
    cpu = cpu_info()
    return {
        "steps_done": state.step,
        "steps_planned": loop.total,
        "stopped_by": stopped_by,
        "seconds": round(state.elapsed(), 1),
        "cpu": cpu["model"],
        "cpu_flags": cpu["flags"],
        "torch": torch.__version__,
        "precision": "bf16 autocast" if loop.autocast else "float32",
    }


def _write_postprocessing(run: Run, state: _State) -> None:
    """``postprocessing.json``, decided on what ``medseg infer`` will see: the same TTA and,
    for probability steps (two-class cuts, region decoding), the probabilities."""
    from medseg.model import UNet

    plan = run.plan
    tta = run.pipeline.infer.get("tta")
    want_probs = plan.num_classes == 2 or bool(plan.regions)
    model_val = state.model_val
    if model_val is None or tta or want_probs:
        chosen = UNet(**plan.network).to(run.dev)
        chosen.load_state_dict(torch.load(run.out / "model.pt", weights_only=True))
        model_val = validate(
            chosen, run.prep, run.val_ids, plan, None, run.cfg.val_tile_size, tta=tta,
            probabilities=want_probs,
        )  # fmt: skip
    atomic.write_json(
        run.out / "postprocessing.json",
        postprocessing_decision(run.prep, plan, model_val, run.cfg.postprocess_metric),
    )


def _training_record(run: Run, state: _State, autocast: bool) -> dict[str, Any]:
    """What ``training.json`` records about the run."""
    return {
        "fold": str(run.cfg.fold),
        "train_cases": run.train_ids,
        "val_cases": run.val_ids,
        "epochs_done": state.epoch,
        "steps_done": state.step,
        "steps_planned": run.cfg.total_steps,
        "best_val_dice_mean": state.best,
        "stopped_by_time_budget": state.stopped,
        "seconds": round(state.elapsed(), 1),
        "world_size": run.info.world_size,
        "device": str(run.dev),
        "precision": "bf16 autocast" if autocast else "float32",
        "config": {k: v for k, v in asdict(run.cfg).items() if v is not None},
    }


def _tensorboard(out: Path) -> Any:
    """A TensorBoard writer when the ``tensorboard`` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _progress(enabled: bool) -> Any:
    """A rich progress bar on stderr (steps, loss, it/s), disabled unless ``enabled``."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text("-- it/s" if task.speed is None else f"{task.speed:.2f} it/s")

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        Speed(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )
