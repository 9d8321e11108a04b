"""Training loop: run folder, exact resume, atomic checkpoints, folds, DDP, CLI errors.

A tiny 2D synthetic cache (five 40x36 scans of a bright disc, K == 1) is written in the
documented cache layout; the network is a depth-2 U-Net with 4 base channels.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("medseg.preprocess.cache", reason="preprocessing cache not available")

from medseg.config import Pipeline  # noqa: E402
from medseg.errors import ModelError, PlanError  # noqa: E402
from medseg.model import UNet, shapes  # noqa: E402
from medseg.preprocess.plan import ChannelPlan, Plan  # noqa: E402
from medseg.train import (  # noqa: E402
    CHECKPOINT_LAST,
    TrainConfig,
    bf16_autocast,
    fold_cases,
    load_or_create_splits,
    make_splits,
    save_torch,
    train,
)

DEPTH = 2


def _plan() -> Plan:
    m = shapes.margin(DEPTH)
    out = shapes.valid_output_size(12, DEPTH)
    net = dict(
        spatial_dims=2, in_channels=1, out_channels=2, depth=DEPTH, base_channels=4,
        channel_multiplier=2, convs_per_level=2, upsampling="transpose", norm="batch",
        dropout=0.0,
    )  # fmt: skip
    return Plan(
        spatial_dims=2, channels=[ChannelPlan("x")], label_values=[0, 255],
        class_names=["background", "disc"], network=net, patch_output_size=(out, out),
        tile_output_size=(out, out), margin=(m, m),
    )  # fmt: skip


def write_synthetic_cache(prep: Path, n: int = 5, weights: bool = True) -> Plan:
    """Cases written by the cache's own writer (image, label, weights, locations, record)."""
    from medseg.preprocess.cache import sample_locations, write_case
    from medseg.preprocess.pipeline import CaseRecord
    from medseg.volume import Box, Grid

    rng = np.random.default_rng(0)
    plan = _plan()
    prep.mkdir(parents=True)
    plan.save(prep / "plan.json")
    grid = Grid.from_spacing((40, 36, 1))
    record = CaseRecord(grid, None, Box((0, 0, 0), (40, 36, 1)), grid, grid, [], [])
    for i in range(n):
        ii, jj = np.mgrid[:40, :36]
        ci, cj = rng.integers(10, 30), rng.integers(10, 26)
        lab = ((ii - ci) ** 2 + (jj - cj) ** 2 < 40).astype(np.int16)[None, :, :, None]
        img = (lab + rng.normal(0, 0.3, lab.shape)).astype(np.float32)
        write_case(
            prep, f"case{i}", image=img, label=lab,
            weights=(1.0 + 4.0 * lab).astype(np.float32) if weights else None,
            locations=sample_locations(lab[0], 2, f"case{i}"), record=record, digest="x",
        )  # fmt: skip
    return plan


@pytest.fixture
def prep(tmp_path: Path) -> Path:
    p = tmp_path / "prep"
    write_synthetic_cache(p)
    return p


def _pipeline(prep: Path, **train_opts) -> Pipeline:
    opts = {
        "iterations_per_epoch": 4,
        "batch_size": 2,
        "workers": 0,
        "augment": {"p_elastic": 0.5, "elastic_sigma": 2.0},
    }
    opts.update(train_opts)
    return Pipeline(name="synthetic", prep_dir=prep, train=opts, text='name = "synthetic"\n')


def test_splits_are_seeded_disjoint_and_cover_every_case(tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(12)]
    splits = make_splits(ids, 5, seed=3)
    assert len(splits) == 5
    vals = [c for s in splits for c in s["val"]]
    assert sorted(vals) == sorted(ids)  # each case validates exactly once
    for s in splits:
        assert not set(s["train"]) & set(s["val"])
        assert sorted(s["train"] + s["val"]) == sorted(ids)
    assert make_splits(ids, 5, seed=3) == splits
    assert make_splits(ids, 5, seed=4) != splits
    first = load_or_create_splits(tmp_path, ids, 5, 3)
    assert json.loads((tmp_path / "splits.json").read_text()) == first
    # saved once: a different seed later does not redraw it
    assert load_or_create_splits(tmp_path, ids, 5, 99) == first
    assert fold_cases(first, "all", ids) == (sorted(ids), [])
    with pytest.raises(PlanError, match="out of range"):
        fold_cases(first, 7, ids)


def test_training_writes_a_run_folder_that_inference_loads(prep: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = train(_pipeline(prep), out, epochs=2, device="cpu", progress=False)
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
    UNet(**_plan().network).load_state_dict(state)
    ckpt = torch.load(out / CHECKPOINT_LAST, weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8
    lines = (out / "train_log.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,step,train_loss,val_loss,val_dice_mean,lr")
    assert len(lines) == 3 and res.epochs_done == 2
    assert 0.0 <= res.best_dice <= 1.0
    from medseg.inference.model_folder import load_model

    loaded = load_model(out)
    assert loaded.plan.network == _plan().network


def test_bf16_autocast_keeps_float32_weights_and_follows_the_float32_run(
    prep: Path, tmp_path: Path
) -> None:
    if not bf16_autocast(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16 (no AMX, no AVX512-BF16)")
    first_loss = {}
    for amp in (False, True):
        out = tmp_path / f"amp_{amp}"
        res = train(
            _pipeline(prep, amp=amp), out, epochs=1, device="cpu", progress=False,
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
    pipe = _pipeline(prep, augment={"p_elastic": 1.0, "elastic_sigma": 2.0, "p_rotate": 0.5})
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


def test_interrupted_checkpoint_write_leaves_the_last_one_loadable(
    prep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    train(_pipeline(prep), out, epochs=1, device="cpu", progress=False)
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


def test_time_budget_stops_early_and_still_writes_a_usable_run(prep: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = train(
        _pipeline(prep, time_budget_minutes=1e-6), out, epochs=50, device="cpu", progress=False
    )
    assert res.stopped_by_budget and res.epochs_done == 1 and res.steps_done == 1
    assert (out / "model.pt").is_file()
    assert json.loads((out / "training.json").read_text())["stopped_by_time_budget"] is True


def test_fold_all_trains_on_every_case_without_validation(prep: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = train(_pipeline(prep), out, fold="all", epochs=1, device="cpu", progress=False)
    info = json.loads((out / "training.json").read_text())
    assert info["val_cases"] == [] and len(info["train_cases"]) == 5
    assert res.best_dice is None and (out / "model.pt").is_file()


def test_fold_manifest_uses_the_manifests_own_split(prep: Path, tmp_path: Path) -> None:
    from medseg.train import manifest_split

    cases = [
        {"case_id": f"case{i}", "images": [f"x/{i}.png"], "label": f"y/{i}.png",
         "split": "val" if i == 3 else ("test" if i == 4 else "train")}
        for i in range(5)
    ]  # fmt: skip
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"name": "s", "channels": ["x"], "labels": {"0": "bg", "255": "disc"},
                             "cases": cases}))  # fmt: skip
    pipe = Pipeline(name="s", manifest=m, prep_dir=prep, train=_pipeline(prep).train)
    ids = [f"case{i}" for i in range(5)]
    assert manifest_split(pipe, ids) == (["case0", "case1", "case2"], ["case3"])
    res = train(pipe, tmp_path / "r", fold="manifest", epochs=1, device="cpu", progress=False)
    info = json.loads((tmp_path / "r" / "training.json").read_text())
    assert info["val_cases"] == ["case3"] and info["train_cases"] == ids[:3]
    assert res.best_dice is not None


def test_weighted_loss_trains_on_the_cached_weight_maps(prep: Path, tmp_path: Path) -> None:
    res = train(
        _pipeline(prep, loss="weighted_ce"), tmp_path / "w", epochs=1, device="cpu", progress=False
    )
    assert np.isfinite(res.log[-1]["train_loss"])


@pytest.mark.parametrize("key", ["amp", "batch_dice", "postprocess"])
def test_switches_that_are_not_booleans_fail_naming_the_key(key: str) -> None:
    with pytest.raises(PlanError, match=rf"\[train\] {key} = 'false' must be true or false"):
        TrainConfig.from_dict({key: "false"})
    assert getattr(TrainConfig.from_dict({key: False}), key) is False


def test_weighted_loss_without_weight_maps_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "prep"
    write_synthetic_cache(p, weights=False)
    with pytest.raises(PlanError, match="border_weights"):
        train(
            _pipeline(p, loss="weighted_ce"), tmp_path / "r", epochs=1, device="cpu", progress=False
        )


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(prep: Path, tmp_path: Path):
    train(_pipeline(prep), tmp_path / "r", epochs=1, device="cpu", progress=False)
    with pytest.raises(ModelError, match="--resume"):
        train(_pipeline(prep), tmp_path / "r", epochs=1, device="cpu", progress=False)
    with pytest.raises(ModelError, match="no checkpoint"):
        train(
            _pipeline(prep), tmp_path / "new", epochs=1, device="cpu", progress=False, resume=True
        )


def test_cli_train_errors_are_one_line_exit_2(prep: Path, tmp_path: Path, capsys) -> None:
    from medseg.cli import main

    toml = tmp_path / "p.toml"
    toml.write_text(f'name = "s"\nprep_dir = "{prep}"\n[train]\nbogus_key = 1\n')
    with pytest.raises(SystemExit) as exc:
        main(["train", "--pipeline", str(toml), "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bogus_key" in err[0]
    assert not (tmp_path / "r").exists()


def test_cli_train_runs_and_resumes(prep: Path, tmp_path: Path, capsys) -> None:
    from medseg.cli import main

    toml = tmp_path / "p.toml"
    toml.write_text(
        f'name = "s"\nprep_dir = "{prep}"\n[train]\niterations_per_epoch = 2\nworkers = 0\n'
    )
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_rank(rank: int, world: int, port: int, prep: str, out: str, dump: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    res = train(_pipeline(Path(prep)), Path(out), epochs=1, device="cpu", progress=False)
    torch.save({k: v.clone() for k, v in res.model.state_dict().items()}, f"{dump}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_two_cpu_processes_keep_identical_weights(prep: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(
        _ddp_rank,
        args=(2, _free_port(), str(prep), str(tmp_path / "run"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT_LAST, weights_only=True)
    assert ckpt["sampler"]["world_size"] == 2 and ckpt["step"] == 4
    # weights moved away from the seeded initialisation
    torch.manual_seed(12345)
    init = UNet(**_plan().network).state_dict()
    assert any(not torch.equal(init[k], s0[k]) for k in init if k.endswith("weight"))


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
        train(_pipeline(prep, region_dice=True), tmp_path / "r", epochs=1, device="cpu",
              progress=False)  # fmt: skip


def test_region_dice_trains_and_validation_reports_region_dice(prep: Path, tmp_path: Path) -> None:
    plan = Plan.load(prep / "plan.json")
    dataclasses.replace(plan, regions={"disc": [1]}).save(prep / "plan.json")
    res = train(
        _pipeline(prep, region_dice=True, val_every=1), tmp_path / "r", epochs=1, device="cpu",
        progress=False,
    )  # fmt: skip
    assert np.isfinite(res.log[-1]["train_loss"])
    from medseg.train import validate

    info = json.loads((tmp_path / "r" / "training.json").read_text())
    v = validate(res.model, prep, info["val_cases"], Plan.load(prep / "plan.json"), None)
    # one class in the region: the region Dice is that class's Dice
    assert v.region_dice["disc"] == pytest.approx(v.dice["disc"])
    header = (tmp_path / "r" / "train_log.csv").read_text().splitlines()[0]
    assert header.endswith("val_dice_disc,val_dice_region_disc")


@pytest.mark.slow
def test_brats2013_short_training_finds_the_whole_tumour(tmp_path: Path, data_root: Path) -> None:
    """3D, two channels, five classes; whole tumour (label > 0) on the validation case."""
    from medseg.metrics import dice
    from medseg.preprocess.cache import load_case
    from medseg.preprocess.plan import Plan as PlanT
    from medseg.train import validate

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
            train(_pipeline(prep), out, epochs=1, device=device, progress=False)
    assert not out.exists()  # refused before anything was written


def test_training_keeps_the_heap_while_it_runs_and_restores_it_after(
    prep: Path, tmp_path: Path
) -> None:
    from medseg import heap

    heap.return_freed_memory()
    if heap.mode() != "return":
        pytest.skip("no glibc mallopt on this platform")
    seen: list[str] = []
    train(
        _pipeline(prep), tmp_path / "run", epochs=2, device="cpu", progress=False,
        log=lambda _msg: seen.append(heap.mode()),
    )  # fmt: skip
    assert seen and set(seen) == {"keep"}  # every epoch's log line came from inside the run
    assert heap.mode() == "return"
