"""nnU-Net v2 as a same-run baseline (Isensee et al. 2021, "nnU-Net: a self-configuring method
for deep learning-based biomedical image segmentation", Nature Methods 18:203-211).

Runs under a Python that has ``nnunetv2`` installed (an environment of its own: see
``benchmarks/README.md``, "optional: nnU-Net v2 baseline"). It imports no medseg code; the
benchmarks call it as a subprocess with that Python:

- ``speed``: ``nnUNetPredictor`` (``manual_initialization``, tile step 0.5, gaussian, no
  mirroring) over a random float32 volume; prints the seconds as JSON.
- ``rss``: the user path on ``WORK/ct.nii.gz`` (``predict_from_files_sequential``: read, crop,
  CT normalisation, sliding window, resample back, argmax, write); prints peak RSS as JSON.
- ``train``: ``plan_and_preprocess`` of ``WORK/raw/DatasetNNN_*``, training for a wall-clock
  budget (``BudgetTrainer`` below), prediction of its ``imagesTs`` into ``WORK/pred``.

Networks come from nnU-Net's own planner (``ExperimentPlanner``: patch size, stages, strides,
``PlainConvUNet``); for the speed and memory rows only the widths are set to the benchmark's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

#: This script, which the benchmarks run with the ``--nnunet-python`` interpreter.
SCRIPT = Path(__file__).resolve()
#: What a benchmark prints where that interpreter has no ``nnunetv2``.
SKIP_MESSAGE = (
    "skipped: pip install nnunetv2 into an environment of its own (benchmarks/README.md, "
    "optional: nnU-Net v2 baseline), then --nnunet-python PATH"
)


def available(python: str) -> bool:
    """Whether ``python`` imports ``nnunetv2`` (the optional baseline)."""
    import subprocess

    probe = subprocess.run([python, "-c", "import nnunetv2"], capture_output=True)
    return probe.returncode == 0


#: nnU-Net's epoch is 250 training + 50 validation iterations, 1000 epochs. A CPU budget of
#: minutes holds less than one such epoch, so ``BudgetTrainer`` runs epochs of this many
#: iterations (validation in nnU-Net's 5:1 ratio) and fits the epoch count to the budget.
ITERATIONS_PER_EPOCH = 10


def set_folders(work: Path) -> None:
    """nnU-Net's three folders under ``work``; it reads them when ``nnunetv2`` is imported."""
    for key, sub in (
        ("nnUNet_raw", "raw"),
        ("nnUNet_preprocessed", "preprocessed"),
        ("nnUNet_results", "results"),
    ):
        os.environ[key] = str(work / sub)
    os.environ.setdefault("nnUNet_compile", "f")  # nnU-Net does not compile on a CPU either


def peak_mib() -> float:
    """``VmHWM`` of this process (MiB): its own peak, not the parent's."""
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def write_fake_dataset(
    work: Path,
    dataset_id: int,
    shape_zyx: list[int],
    spacing_zyx: list[float],
    channel: str,
    intensity: dict[str, float],
    classes: int,
) -> str:
    """A raw dataset of one small example file plus the fingerprint of a volume of ``shape_zyx``
    at ``spacing_zyx`` mm (SimpleITK axis order), so that nnU-Net's planner plans for that
    volume without reading it. Returns the dataset's folder name."""
    import SimpleITK as sitk

    name = f"Dataset{dataset_id}_Bench"
    raw = work / "raw" / name
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    for sub, arr in (
        ("imagesTr/case_0000", np.zeros((8, 8, 8), np.float32)),
        ("labelsTr/case", np.zeros((8, 8, 8), np.uint8)),
    ):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(raw / f"{sub}.nii.gz"))
    labels = {"background": 0, **{f"class{c}": c for c in range(1, classes)}}
    dataset = {
        "channel_names": {"0": channel},
        "labels": labels,
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset))
    prep = work / "preprocessed" / name
    prep.mkdir(parents=True, exist_ok=True)
    fingerprint = {
        "spacings": [spacing_zyx],
        "shapes_after_crop": [shape_zyx],
        "foreground_intensity_properties_per_channel": {"0": intensity},
        "median_relative_size_after_cropping": 1.0,
    }
    (prep / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    return name


def default_plans(
    work: Path,
    shape_zyx: list[int],
    spacing_zyx: list[float],
    channel: str,
    intensity: dict[str, float],
    classes: int,
) -> dict[str, Any]:
    """nnU-Net's own plans (``ExperimentPlanner``, PlainConvUNet) for one volume."""
    set_folders(work)
    write_fake_dataset(work, 990, shape_zyx, spacing_zyx, channel, intensity, classes)
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )

    return ExperimentPlanner(990).plan_experiment()


def with_widths(plans: dict[str, Any], base: int, stages: int | None) -> dict[str, Any]:
    """3d_fullres with features ``base * 2**i`` (nnU-Net's doubling, its cap of 320) and, if
    ``stages`` is given, at most the first ``stages`` stages of the planned topology."""
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    n = min(stages or arch["n_stages"], arch["n_stages"])
    arch["n_stages"] = n
    arch["features_per_stage"] = [min(base * 2**i, 320) for i in range(n)]
    for key in ("kernel_sizes", "strides", "n_conv_per_stage"):
        arch[key] = arch[key][:n]
    arch["n_conv_per_stage_decoder"] = arch["n_conv_per_stage_decoder"][: n - 1]
    return plans


def make_predictor(
    plans: dict[str, Any], dataset_json: dict[str, Any], config: str, network: Any, mirroring: bool
) -> Any:
    """``nnUNetPredictor`` on the CPU, tile step 0.5, gaussian weighting, set up by
    ``manual_initialization`` as nnU-Net's trainer does for its final validation."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=mirroring,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    axes = tuple(range(len(manager.get_configuration(config).patch_size)))
    predictor.manual_initialization(
        network,
        manager,
        manager.get_configuration(config),
        [network.state_dict()],
        dataset_json,
        "nnUNetTrainer",
        axes,
    )
    return predictor


def build_network(plans: dict[str, Any], config: str, channels: int, classes: int) -> Any:
    """The planned network (``get_network_from_plans``), randomly initialised, in eval mode."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(0)
    arch = plans["configurations"][config]["architecture"]
    net = get_network_from_plans(
        arch["network_class_name"],
        arch["arch_kwargs"],
        arch["_kw_requires_import"],
        channels,
        classes,
        deep_supervision=False,
    )
    return net.eval()


def cmd_speed(a: argparse.Namespace) -> None:
    """Seconds of one sliding-window pass over a random ``a.size`` volume (1 mm spacing), the
    network planned for it cut to ``a.stages`` stages, widths ``a.base * 2**i``."""
    import torch

    torch.set_num_threads(a.threads)
    intensity = {
        "mean": 0.0,
        "median": 0.0,
        "std": 1.0,
        "min": -5.0,
        "max": 5.0,
        "percentile_99_5": 3.0,
        "percentile_00_5": -3.0,
    }
    plans = default_plans(a.work, list(a.size), [1.0, 1.0, 1.0], "MR", intensity, 2)
    plans = with_widths(plans, a.base, a.stages)
    net = build_network(plans, "3d_fullres", 1, 2)
    dataset_json = json.loads((a.work / "raw" / "Dataset990_Bench" / "dataset.json").read_text())
    predictor = make_predictor(plans, dataset_json, "3d_fullres", net, mirroring=False)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, *a.size)).astype(np.float32))
    t = time.perf_counter()
    predictor.predict_logits_from_preprocessed_data(x)
    seconds = time.perf_counter() - t
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    print(json.dumps({"seconds": seconds, "patch_size": patch, "stages": len(net.encoder.stages)}))


def cmd_rss(a: argparse.Namespace) -> None:
    """The user path on ``a.work/ct.nii.gz`` with nnU-Net's default 3d_fullres plan for it
    (CT normalisation with the window and statistics the medseg plan uses, widths
    ``a.base * 2**i``); ``predict_from_files_sequential``: one process, so ``VmHWM`` holds it
    all. Prints peak RSS (MiB), seconds and the patch size as JSON."""
    import nibabel as nib
    import torch

    torch.set_num_threads(a.threads)
    start = {"import": peak_mib()}
    header = nib.load(str(a.work / "ct.nii.gz")).header
    shape_zyx = [int(s) for s in header.get_data_shape()[::-1]]
    spacing_zyx = [float(s) for s in header.get_zooms()[::-1]]
    intensity = {
        "mean": 40.0,
        "median": 40.0,
        "std": 350.0,
        "min": -1024.0,
        "max": 3000.0,
        "percentile_99_5": 1500.0,
        "percentile_00_5": -1000.0,
    }
    plans = default_plans(a.work / "nnunet", shape_zyx, spacing_zyx, "CT", intensity, a.classes)
    plans = with_widths(plans, a.base, None)
    net = build_network(plans, "3d_fullres", 1, a.classes)
    dataset_json = json.loads(
        (a.work / "nnunet" / "raw" / "Dataset990_Bench" / "dataset.json").read_text()
    )
    predictor = make_predictor(plans, dataset_json, "3d_fullres", net, mirroring=False)
    out = a.work / "nnunet_pred"
    out.mkdir(exist_ok=True)
    t = time.perf_counter()  # from here on what a user's prediction costs (planning excluded)
    with torch.inference_mode():
        predictor.predict_from_files_sequential([[str(a.work / "ct.nii.gz")]], str(out))
    cfg = plans["configurations"]["3d_fullres"]
    res = {
        "peak_mib": peak_mib(),
        "seconds": time.perf_counter() - t,
        "stages": start,
        "patch_size": cfg["patch_size"],
        "n_stages": cfg["architecture"]["arch_kwargs"]["n_stages"],
    }
    print(json.dumps(res))


def budget_trainer(budget_s: float) -> type:
    """nnU-Net's ``nnUNetTrainer`` whose epoch count follows a wall-clock budget.

    nnU-Net has no time cap: it trains a fixed 1000 epochs with a poly learning-rate schedule
    over them. Stopping it early would leave the rate high, so this subclass runs short epochs
    (``ITERATIONS_PER_EPOCH``) and after each one sets ``num_epochs`` (and the poly schedule's
    end) to the epochs that fit in the budget at the mean epoch time so far (setting up
    included): the schedule runs out when the budget does, on whatever machine. Within an
    epoch it stops at the first step past the budget (then validates and saves as nnU-Net
    does). Nothing in nnU-Net is changed."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class BudgetTrainer(nnUNetTrainer):  # type: ignore[misc,valid-type]
        # nnUNetTrainer records its own arguments by name: the same signature
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")) -> None:  # fmt: skip
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch = ITERATIONS_PER_EPOCH
            self.num_val_iterations_per_epoch = max(1, ITERATIONS_PER_EPOCH // 5)
            self.steps_done = 0

        def run_training(self) -> None:
            t0 = time.perf_counter()
            self.on_train_start()
            while self.current_epoch < self.num_epochs:
                self.on_epoch_start()
                self.on_train_epoch_start()
                outs = []
                for _ in range(self.num_iterations_per_epoch):
                    outs.append(self.train_step(next(self.dataloader_train)))
                    if time.perf_counter() - t0 >= budget_s:  # the cap, within an epoch
                        break
                self.on_train_epoch_end(outs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val = [self.validation_step(next(self.dataloader_val))
                           for _ in range(self.num_val_iterations_per_epoch)]  # fmt: skip
                    self.on_validation_epoch_end(val)
                self.on_epoch_end()
                self.steps_done += len(outs)
                elapsed = time.perf_counter() - t0
                fit = int(budget_s / (elapsed / self.current_epoch))
                self.num_epochs = (
                    self.current_epoch if elapsed >= budget_s else max(self.current_epoch + 1, fit)
                )
                self.lr_scheduler.max_steps = max(self.num_epochs, 1)
            self.on_train_end()

    return BudgetTrainer


def plan_and_preprocess(dataset_id: int, config: str, threads: int) -> dict[str, float]:
    """nnU-Net's ``nnUNetv2_plan_and_preprocess -c CONFIG`` through its Python API; seconds."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    t = time.perf_counter()
    extract_fingerprints([dataset_id], num_processes=threads, check_dataset_integrity=True)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=[config], num_processes=[threads])
    return {"plan_and_preprocess_seconds": round(time.perf_counter() - t, 1)}


def cmd_train(a: argparse.Namespace) -> None:
    """Plan, preprocess, train fold ``all`` (every training case) for ``a.budget_seconds``,
    then predict ``imagesTs`` with nnU-Net's defaults (tile step 0.5, gaussian, mirroring) into
    ``a.work/pred``; writes ``a.work/nnunet_info.json``."""
    set_folders(a.work)
    import torch

    torch.set_num_threads(a.threads)
    name = next(p.name for p in (a.work / "raw").glob(f"Dataset{a.dataset_id}_*"))
    info: dict[str, Any] = plan_and_preprocess(a.dataset_id, a.config, a.threads)
    prep = a.work / "preprocessed" / name
    plans = json.loads((prep / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((prep / "dataset.json").read_text())
    plans["continue_training"] = False  # what nnU-Net's run_training sets (a fresh start)
    trainer = budget_trainer(a.budget_seconds)(
        plans, a.config, "all", dataset_json, device=torch.device("cpu")
    )
    t = time.perf_counter()
    trainer.run_training()
    cfg = trainer.configuration_manager
    info.update(
        train_seconds=round(time.perf_counter() - t, 1),
        epochs=trainer.current_epoch,
        steps=trainer.steps_done,
        batch_size=cfg.batch_size,
        patch_size=list(cfg.patch_size),
        configuration=a.config,
    )
    trainer.set_deep_supervision_enabled(False)
    net = trainer.network.eval()
    predictor = make_predictor(plans, dataset_json, a.config, net, mirroring=True)
    t = time.perf_counter()
    (a.work / "pred").mkdir(exist_ok=True)
    predictor.predict_from_files_sequential(
        str(a.work / "raw" / name / "imagesTs"), str(a.work / "pred")
    )
    info["infer_seconds"] = round(time.perf_counter() - t, 1)
    (a.work / "nnunet_info.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("speed", "rss", "train"):
        p = sub.add_parser(name)
        p.add_argument("--work", type=Path, required=True)
        p.add_argument("--threads", type=int, default=2)
    sp = sub.choices["speed"]
    sp.add_argument("--size", type=int, nargs=3, default=[192, 192, 160])
    sp.add_argument("--base", type=int, default=8)
    sp.add_argument("--stages", type=int, default=5, help="stages (poolings + 1)")
    rp = sub.choices["rss"]
    rp.add_argument("--base", type=int, default=2)
    rp.add_argument("--classes", type=int, default=5)
    tp = sub.choices["train"]
    tp.add_argument("--dataset-id", type=int, required=True)
    tp.add_argument("--config", required=True, choices=["2d", "3d_fullres"])
    tp.add_argument("--budget-seconds", type=float, required=True)
    a = ap.parse_args()
    {"speed": cmd_speed, "rss": cmd_rss, "train": cmd_train}[a.cmd](a)


if __name__ == "__main__":
    main()
