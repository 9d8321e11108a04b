"""What a training run folder says about how its training went (no torch).

``train_summary.json`` records steps done and planned, what stopped the run ("steps",
"time budget", or "stop_after_epochs" for the library's programmatic stop), seconds, the CPU
(model name and bf16/AMX flags), the torch version and the precision.
:func:`early_stop_warning` reads it back, so ``medseg infer`` can say that a model was cut
short without importing torch.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

#: The summary file every training run writes into its run folder.
SUMMARY_NAME = "train_summary.json"

#: ``stopped_by`` values: the planned steps were all taken, or the time cap ended the run.
STOPPED_BY_STEPS = "steps"
STOPPED_BY_TIME = "time budget"

#: /proc/cpuinfo flags that decide whether bf16 runs natively on a CPU
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def cpu_info() -> dict[str, Any]:
    """``{"model": name, "flags": [...]}``: the CPU's model name and which of
    :data:`BF16_FLAGS` it has, from ``/proc/cpuinfo`` (Linux), else ``platform``."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags":
            flags = set(value.split())
        if model and flags:
            break
    return {"model": model, "flags": [f for f in BF16_FLAGS if f in flags]}


def stop_message(steps_done: int, steps_planned: int) -> str:
    """The sentence the log, the command and :func:`early_stop_warning` use."""
    return f"stopped by the time budget at step {steps_done} of {steps_planned}"


def early_stop_warning(run_folder: str | os.PathLike[str]) -> str | None:
    """A one-line warning when the model in ``run_folder`` stopped before its planned steps
    (by the time budget, or any other stop), else None (also None for a folder without a
    readable ``train_summary.json``, such as a model folder made before summaries existed)."""
    path = Path(run_folder) / SUMMARY_NAME
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
        stopped_by = s.get("stopped_by")
        done, planned = int(s["steps_done"]), int(s["steps_planned"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if stopped_by == STOPPED_BY_STEPS or done >= planned:
        return None
    what = (
        stop_message(done, planned)
        if stopped_by == STOPPED_BY_TIME
        else f"stopped at step {done} of {planned}"
    )
    return (
        f"{run_folder}: model {what}; it is not the pipeline's recipe "
        "(resume it with medseg train --resume to finish)"
    )
