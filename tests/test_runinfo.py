"""``train_summary.json`` read back without torch: the time-cap warning and the CPU record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from medseg.runinfo import SUMMARY_NAME, cpu_info, early_stop_warning

REPO = Path(__file__).resolve().parents[1]


def _summary(folder: Path, **kw: object) -> Path:
    folder.mkdir()
    (folder / SUMMARY_NAME).write_text(json.dumps(kw))
    return folder


def test_warning_names_the_step_and_the_plan_when_the_time_budget_stopped_the_run(
    tmp_path: Path,
) -> None:
    run = _summary(tmp_path / "r", steps_done=123, steps_planned=4000, stopped_by="time budget")
    msg = early_stop_warning(run)
    assert msg is not None and "stopped by the time budget at step 123 of 4000" in msg
    assert "\n" not in msg


def test_warning_for_a_run_stopped_short_by_the_library(tmp_path: Path) -> None:
    run = _summary(tmp_path / "r", steps_done=8, steps_planned=16, stopped_by="stop_after_epochs")
    msg = early_stop_warning(run)
    assert msg is not None and "stopped at step 8 of 16" in msg


def test_no_warning_for_a_finished_run_or_a_folder_without_summary(tmp_path: Path) -> None:
    done = _summary(tmp_path / "d", steps_done=4000, steps_planned=4000, stopped_by="steps")
    assert early_stop_warning(done) is None
    assert early_stop_warning(tmp_path) is None  # model folders made before summaries
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / SUMMARY_NAME).write_text("{not json")
    assert early_stop_warning(tmp_path / "bad") is None


def test_runinfo_imports_without_torch() -> None:
    code = "import sys, medseg.runinfo; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_cpu_info_reads_the_model_name_and_bf16_flags_of_proc_cpuinfo() -> None:
    info = cpu_info()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")]
    if names:
        assert info["model"] == names[0]
        flags = next(ln for ln in text.splitlines() if ln.startswith("flags")).split()
        assert info["flags"] == [f for f in ("avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
                                 if f in flags]  # fmt: skip
