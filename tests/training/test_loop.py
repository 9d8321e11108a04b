"""Training loop: run folder, exact resume, time budget, folds, losses, CLI errors, and
process-wide state (heap, deterministic flags) left as the caller had it.

Runs on the synthetic cache of :mod:`tests.training.synthetic`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.config import Pipeline
from medseg.errors import ModelError, PlanError
from medseg.model import UNet
from medseg.runtime import bf16_autocast
from medseg.training import train
from medseg.training.checkpoint import CHECKPOINT_LAST
from tests.training.synthetic import synthetic_pipeline, tiny_plan, write_synthetic_cache


def test_training_writes_a_run_folder_that_inference_loads(prep: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = train(synthetic_pipeline(prep), out, epochs=2, device="cpu", progress=False)
    for name in (
        "plan.json",
        "pipeline.toml",
        "model.pt",
        CHECKPOINT_LAST,
        "train_log.csv",
        "training.json",
        "postprocessing.json",
        "checkpoint_best.pt",
    ):
        assert (out / name).is_file(), name
    assert (prep / "splits.json").is_file()
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    UNet(**tiny_plan().network).load_state_dict(state)
    ckpt = torch.load(out / CHECKPOINT_LAST, weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8
    lines = (out / "train_log.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,step,train_loss,val_loss,val_dice_mean,lr")
    assert len(lines) == 3 and res.epochs_done == 2
    assert 0.0 <= res.best_dice <= 1.0
    from medseg.inference.model_folder import load_model

    loaded = load_model(out)
    assert loaded.plan.network == tiny_plan().network


def test_cpu_trains_under_bf16_where_its_flags_say_native_bf16() -> None:
    """AMX or AVX512-BF16 (both measured faster under bf16 autocast, docs/benchmarks.md)."""
    from medseg.runinfo import cpu_info

    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    flags = cpu_info()["flags"]
    native = "amx_tile" in flags or "avx512_bf16" in flags
    assert bf16_autocast(torch.device("cpu")) == native


def test_bf16_autocast_keeps_float32_weights_and_follows_the_float32_run(
    prep: Path, tmp_path: Path
) -> None:
    if not bf16_autocast(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16 (no AMX, no AVX512-BF16)")
    first_loss = {}
    for amp in (False, True):
        out = tmp_path / f"amp_{amp}"
        res = train(
            synthetic_pipeline(prep, amp=amp), out, epochs=1, device="cpu", progress=False,
            deterministic=True,
        )  # fmt: skip
        record = json.loads((out / "training.json").read_text())
        assert record["precision"] == ("bf16 autocast" if amp else "float32")
        state = torch.load(out / "model.pt", weights_only=True)
        assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
        first_loss[amp] = res.log[0]["train_loss"]
    # same batches, same start: bf16 rounding moves the loss a little, and only a little
    assert first_loss[True] != first_loss[False]
    assert first_loss[True] == pytest.approx(first_loss[False], rel=0.05)


def test_resume_2_plus_2_epochs_equals_4_epochs_exactly(prep: Path, tmp_path: Path) -> None:
    # workers differ between the runs on purpose: batches depend only on (seed, rank, step)
    pipe = synthetic_pipeline(
        prep, augment={"p_elastic": 1.0, "elastic_sigma": 2.0, "p_rotate": 0.5}
    )
    a = train(
        pipe,
        tmp_path / "a",
        epochs=4,
        device="cpu",
        deterministic=True,
        progress=False,
        overrides={"workers": 2},
    )
    train(
        pipe,
        tmp_path / "b",
        epochs=4,
        device="cpu",
        deterministic=True,
        progress=False,
        stop_after_epochs=2,
    )
    assert torch.load(tmp_path / "b" / CHECKPOINT_LAST, weights_only=True)["epoch"] == 2
    b = train(
        pipe,
        tmp_path / "b",
        epochs=4,
        device="cpu",
        deterministic=True,
        progress=False,
        resume=True,
    )
    assert b.epochs_done == 4 and b.steps_done == a.steps_done == 16
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    la = (tmp_path / "a" / "train_log.csv").read_text().splitlines()
    lb = (tmp_path / "b" / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[2] for r in la] == [r.split(",")[2] for r in lb]  # same losses


def test_time_budget_stops_early_and_still_writes_a_usable_run(prep: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = train(
        synthetic_pipeline(prep, time_budget_minutes=1e-6),
        out,
        epochs=50,
        device="cpu",
        progress=False,
    )
    assert res.stopped_by_budget and res.epochs_done == 1 and res.steps_done == 1
    assert (out / "model.pt").is_file()
    assert json.loads((out / "training.json").read_text())["stopped_by_time_budget"] is True
    assert res.message.endswith("stopped by the time budget at step 1 of 200 (1 epochs), "
                                f"best validation Dice {res.best_dice:.4f}")  # fmt: skip
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["stopped_by"] == "time budget"
    assert (summary["steps_done"], summary["steps_planned"]) == (1, 200)
    assert summary["torch"] == torch.__version__ and summary["precision"] in (
        "float32",
        "bf16 autocast",
    )
    from medseg.runinfo import cpu_info, early_stop_warning

    assert summary["cpu"] == cpu_info()["model"] and summary["cpu_flags"] == cpu_info()["flags"]
    warning = early_stop_warning(out)
    assert warning is not None and "stopped by the time budget at step 1 of 200" in warning


def test_learning_rate_follows_the_step_alone_with_or_without_a_time_cap(
    prep: Path, tmp_path: Path
) -> None:
    """The poly schedule ``lr0 (1 - step / total)^0.9`` of the recipe's steps: a time cap
    that ends the run does not move it (the logged lr is the epoch's last step's)."""
    pipe = synthetic_pipeline(prep, steps=6, lr=0.02, optimizer="adamw")
    full = train(pipe, tmp_path / "full", device="cpu", progress=False)
    assert full.steps_done == 6 and full.steps_planned == 6
    assert [r["step"] for r in full.log] == [4, 6]  # epochs of 4 steps, the last one shorter
    assert [r["lr"] for r in full.log] == pytest.approx(
        [0.02 * (1 - 3 / 6) ** 0.9, 0.02 * (1 - 5 / 6) ** 0.9]
    )
    summary = json.loads((tmp_path / "full" / "train_summary.json").read_text())
    assert summary["stopped_by"] == "steps" and summary["steps_done"] == 6
    from medseg.runinfo import early_stop_warning

    assert early_stop_warning(tmp_path / "full") is None
    capped = train(pipe, tmp_path / "capped", device="cpu", progress=False,
                   overrides={"time_budget_minutes": 1e-6})  # fmt: skip
    assert capped.stopped_by_budget and capped.log[0]["lr"] == pytest.approx(0.02)


def test_epochs_on_the_command_line_replace_the_recipes_steps(prep: Path, tmp_path: Path) -> None:
    pipe = synthetic_pipeline(prep, steps=100)
    res = train(pipe, tmp_path / "r", epochs=1, device="cpu", progress=False)
    assert res.steps_done == res.steps_planned == 4
    res = train(pipe, tmp_path / "s", steps=3, device="cpu", progress=False)
    assert res.steps_done == res.steps_planned == 3


def test_fold_all_trains_on_every_case_without_validation(prep: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = train(synthetic_pipeline(prep), out, fold="all", epochs=1, device="cpu", progress=False)
    info = json.loads((out / "training.json").read_text())
    assert info["val_cases"] == [] and len(info["train_cases"]) == 5
    assert res.best_dice is None and (out / "model.pt").is_file()


def test_fold_manifest_uses_the_manifests_own_split(prep: Path, tmp_path: Path) -> None:
    from medseg.training.splits import manifest_split

    cases = [
        {"case_id": f"case{i}", "images": [f"x/{i}.png"], "label": f"y/{i}.png",
         "split": "val" if i == 3 else ("test" if i == 4 else "train")}
        for i in range(5)
    ]  # fmt: skip
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"name": "s", "channels": ["x"], "labels": {"0": "bg", "255": "disc"},
                             "cases": cases}))  # fmt: skip
    pipe = Pipeline(name="s", manifest=m, prep_dir=prep, train=synthetic_pipeline(prep).train)
    ids = [f"case{i}" for i in range(5)]
    assert manifest_split(pipe, ids) == (["case0", "case1", "case2"], ["case3"])
    res = train(pipe, tmp_path / "r", fold="manifest", epochs=1, device="cpu", progress=False)
    info = json.loads((tmp_path / "r" / "training.json").read_text())
    assert info["val_cases"] == ["case3"] and info["train_cases"] == ids[:3]
    assert res.best_dice is not None


def test_weighted_loss_trains_on_the_cached_weight_maps(prep: Path, tmp_path: Path) -> None:
    res = train(
        synthetic_pipeline(prep, loss="weighted_ce"),
        tmp_path / "w",
        epochs=1,
        device="cpu",
        progress=False,
    )
    assert np.isfinite(res.log[-1]["train_loss"])


def test_weighted_loss_without_weight_maps_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "prep"
    write_synthetic_cache(p, weights=False)
    with pytest.raises(PlanError, match="border_weights"):
        train(
            synthetic_pipeline(p, loss="weighted_ce"),
            tmp_path / "r",
            epochs=1,
            device="cpu",
            progress=False,
        )


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(prep: Path, tmp_path: Path):
    train(synthetic_pipeline(prep), tmp_path / "r", epochs=1, device="cpu", progress=False)
    with pytest.raises(ModelError, match="--resume"):
        train(synthetic_pipeline(prep), tmp_path / "r", epochs=1, device="cpu", progress=False)
    with pytest.raises(ModelError, match="no checkpoint"):
        train(
            synthetic_pipeline(prep),
            tmp_path / "new",
            epochs=1,
            device="cpu",
            progress=False,
            resume=True,
        )


def test_cli_train_errors_are_one_line_exit_2(
    prep: Path, tmp_path: Path, capsys, pipeline_toml
) -> None:
    from medseg.cli import main

    toml = pipeline_toml(prep, train={"bogus_key": 1})
    with pytest.raises(SystemExit) as exc:
        main(["train", "--pipeline", str(toml), "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bogus_key" in err[0]
    assert not (tmp_path / "r").exists()


def test_cli_train_runs_and_resumes(prep: Path, tmp_path: Path, capsys, pipeline_toml) -> None:
    from medseg.cli import main

    toml = pipeline_toml(prep, train={"iterations_per_epoch": 2, "workers": 0})
    args = [
        "train",
        "--pipeline",
        str(toml),
        "--out",
        str(tmp_path / "r"),
        "--device",
        "cpu",
        "--fold",
        "1",
    ]
    for extra in (["--epochs", "1"], ["--epochs", "2", "--resume"]):
        with pytest.raises(SystemExit) as exc:
            main([*args, *extra])
        assert exc.value.code == 0
    assert torch.load(tmp_path / "r" / CHECKPOINT_LAST, weights_only=True)["epoch"] == 2
    assert (tmp_path / "r" / "pipeline.toml").read_text() == toml.read_text()


def test_cli_train_says_last_that_the_time_budget_stopped_it(
    prep: Path, tmp_path: Path, capsys, pipeline_toml
) -> None:
    from medseg.cli import main

    toml = pipeline_toml(prep, train={"steps": 50, "workers": 0, "iterations_per_epoch": 5})
    with pytest.raises(SystemExit) as exc:
        main(["train", "--pipeline", str(toml), "--out", str(tmp_path / "r"), "--device", "cpu",
              "--time-budget", "1e-6"])  # fmt: skip
    assert exc.value.code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "stopped by the time budget at step 1 of 50" in last


def _wait_for_lock(out: Path, proc: subprocess.Popen) -> dict:
    """The lock file's content once ``proc`` holds the folder (or fail if it died first)."""
    import time

    lock = out / ".medseg.lock"
    while proc.poll() is None:
        try:
            info = json.loads(lock.read_text())
            if info.get("pid") == proc.pid:
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"first train exited ({proc.returncode}) before holding the lock")


def test_a_second_train_on_the_same_folder_is_refused_naming_the_holder(
    prep: Path, tmp_path: Path, pipeline_toml
) -> None:
    """Two real processes: the second gets one line naming the first (its pid), exit 2, and
    the first keeps training undisturbed."""
    import signal
    import sys

    toml = pipeline_toml(prep, train={"steps": 1000000, "workers": 0})
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "medseg.cli", "train", "--pipeline", str(toml), "--out",
           str(out), "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_for_lock(out, first)
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        assert first.poll() is None  # still training
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    err = second.stderr.strip().splitlines()
    assert len(err) == 1 and f"pid {first.pid}" in err[0] and "medseg train" in err[0], err
    assert "Traceback" not in second.stderr


def test_train_refuses_an_unwritable_output_before_building_anything(
    prep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medseg.errors import WriteError
    from medseg.training import loop

    blocker = tmp_path / "file"  # a file where the run folder's parent should be
    blocker.write_text("x")
    monkeypatch.setattr(loop, "setup_run", lambda *a, **k: pytest.fail("built a run"))
    with pytest.raises(WriteError, match="is a file, not a folder"):
        train(synthetic_pipeline(prep), blocker / "run", epochs=1, device="cpu", progress=False)


# -- real data (slow) ------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[2]


def _prepare(tmp_path: Path, data_root: Path, toml: str) -> Pipeline:
    """Write a pipeline TOML, preprocess it with ``medseg preprocess`` and load it."""
    from medseg.cli import main
    from medseg.config import load_pipeline

    p = tmp_path / "pipeline.toml"
    p.write_text(toml)
    with pytest.raises(SystemExit) as exc:
        main(["preprocess", "--pipeline", str(p), "--data-root", str(data_root)])
    assert exc.value.code == 0
    return load_pipeline(p)


@pytest.mark.slow
def test_isbi2012_short_training_lowers_loss_and_beats_chance(
    tmp_path: Path, data_root: Path
) -> None:
    """2D, border weight maps, elastic deformation; then ``medseg infer`` uses the run folder."""
    from medseg.cli import main
    from medseg.io import read_volume

    torch.set_num_threads(2)
    pipe = _prepare(tmp_path, data_root, f"""
name = "isbi-slow"
manifest = "{REPO / 'data_manifests/isbi2012.json'}"
prep_dir = "{tmp_path / 'prep'}"
[plan]
network = {{depth = 3, base_channels = 8}}
patch_output_size = [116, 116]
tile_output_size = [252, 252]
[preprocess]
border_weights = {{w0 = 10, sigma = 5}}
[train]
iterations_per_epoch = 20
batch_size = 4
loss = "dice_weighted_ce"
workers = 1
val_every = 10
augment = {{p_elastic = 0.5, elastic_sigma = 10.0, p_rotate = 0.3}}
""")  # fmt: skip
    out = tmp_path / "run"
    res = train(pipe, out, epochs=10, device="cpu", progress=False)
    losses = [r["train_loss"] for r in res.log]
    assert losses[-1] < 0.8 * losses[0]
    # membrane (22 % of pixels) is class 0 here; predicting "all membrane" scores Dice 0.36
    membrane = res.log[-1]["val_dice_membrane"]
    assert membrane > 0.6, res.log[-1]
    # trivial predictors score a class mean of 0.18 (all membrane) and 0.44 (all cell)
    assert (membrane + res.log[-1]["val_dice_cell"]) / 2 > 0.6
    # the run folder works with medseg infer unchanged, on a raw PNG of the data set
    png = data_root / "isbi2012/images/slice_21.png"
    pred = tmp_path / "pred.png"
    with pytest.raises(SystemExit) as exc:
        main(["infer", "--volume", str(png), "--model", str(out), "--output", str(pred),
              "--device", "cpu"])  # fmt: skip
    assert exc.value.code == 0
    p = read_volume(pred, label=True)
    assert set(np.unique(p.array).tolist()) <= {0, 255}
    assert p.grid.shape == read_volume(png).grid.shape


def test_region_dice_needs_regions_in_the_plan(prep: Path, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="regions"):
        train(synthetic_pipeline(prep, region_dice=True), tmp_path / "r", epochs=1, device="cpu",
              progress=False)  # fmt: skip


@pytest.mark.slow
def test_brats2013_short_training_finds_the_whole_tumour(tmp_path: Path, data_root: Path) -> None:
    """3D, two channels, five classes; whole tumour (label > 0) on the validation case."""
    from medseg.metrics import dice
    from medseg.preprocess.cache import load_case
    from medseg.preprocess.plan import Plan as PlanT
    from medseg.training.validation import validate

    torch.set_num_threads(2)
    pipe = _prepare(tmp_path, data_root, f"""
name = "brats-slow"
manifest = "{REPO / 'data_manifests/brats2013.json'}"
prep_dir = "{tmp_path / 'prep'}"
[plan]
network = {{depth = 2, base_channels = 8}}
target_spacing = [2.0, 2.0, 2.0]
patch_output_size = [36, 36, 36]
tile_output_size = [60, 60, 60]
[train]
iterations_per_epoch = 25
batch_size = 2
workers = 1
val_every = 100
optimizer = "adamw"
lr = 3e-3
foreground_fraction = 0.5
augment = {{p_rotate = 0.2, p_scale = 0.2}}
""")  # fmt: skip
    out = tmp_path / "run"
    res = train(pipe, out, epochs=6, device="cpu", progress=False)
    losses = [r["train_loss"] for r in res.log]
    assert losses[-1] < 0.8 * losses[0]
    plan = PlanT.load(out / "plan.json")
    info = json.loads((out / "training.json").read_text())
    (val_id,) = info["val_cases"]
    v = validate(res.model, tmp_path / "prep", [val_id], plan, None)
    ref = np.asarray(load_case(tmp_path / "prep", val_id).label[0])
    whole = dice(v.predictions[val_id] > 0, ref > 0)
    assert whole > 0.5, whole  # tumour is ~ 3 % of the cropped brain: chance is near 0


def test_training_refuses_a_device_it_cannot_train_on(prep: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    for device, words in (("mps", "cpu or cuda"), ("bogus", "unknown device")):
        with pytest.raises(ModelError, match=words):
            train(synthetic_pipeline(prep), out, epochs=1, device=device, progress=False)
    assert not out.exists()  # refused before anything was written


def test_training_leaves_the_heap_as_the_caller_set_it(prep: Path, tmp_path: Path) -> None:
    from medseg import heap

    heap.return_freed_memory()
    if heap.mode() != "return":
        pytest.skip("no glibc mallopt on this platform")
    seen: list[str] = []
    train(
        synthetic_pipeline(prep), tmp_path / "run", epochs=2, device="cpu", progress=False,
        log=lambda _msg: seen.append(heap.mode()),
    )  # fmt: skip
    assert seen and set(seen) == {"return"}  # the library does not touch the allocator
    assert heap.mode() == "return"


def test_cli_train_keeps_the_heap_while_it_runs_and_restores_it_after(
    prep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pipeline_toml
) -> None:
    from medseg import cli, heap

    heap.return_freed_memory()
    if heap.mode() != "return":
        pytest.skip("no glibc mallopt on this platform")
    seen: list[str] = []
    # the command's per-epoch log lines go through its console: record the heap mode there
    monkeypatch.setattr(cli.console, "print", lambda *_a, **_k: seen.append(heap.mode()))
    toml = pipeline_toml(prep, train={"iterations_per_epoch": 2, "workers": 0})
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--pipeline", str(toml), "--out", str(tmp_path / "r"),
                  "--device", "cpu", "--epochs", "2"])  # fmt: skip
    assert exc.value.code == 0
    assert seen and set(seen) == {"keep"}  # every epoch's log line came from inside the run
    assert heap.mode() == "return"


def _deterministic_flags() -> tuple:
    cudnn = torch.backends.cudnn
    return (
        torch.are_deterministic_algorithms_enabled(),
        cudnn.deterministic,
        cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )


def test_training_sets_the_deterministic_flags_only_while_it_runs(
    prep: Path, tmp_path: Path
) -> None:
    before = _deterministic_flags()
    assert before[0] is False  # torch's default, which the test relies on
    seen: list[tuple] = []
    train(
        synthetic_pipeline(prep), tmp_path / "run", epochs=1, device="cpu", progress=False,
        deterministic=True, log=lambda _msg: seen.append(_deterministic_flags()),
    )  # fmt: skip
    assert seen and all(s[:3] == (True, True, False) for s in seen)
    assert _deterministic_flags() == before
    # restored when training raises too (region_dice without regions fails after the flags)
    with pytest.raises(PlanError, match="regions"):
        train(
            synthetic_pipeline(prep, region_dice=True), tmp_path / "r2", epochs=1, device="cpu",
            progress=False, deterministic=True,
        )  # fmt: skip
    assert _deterministic_flags() == before
