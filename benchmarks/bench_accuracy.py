"""Accuracy on real data: medseg's pipelines against the standard MONAI recipe, same budget.

For each data set (``isbi2012``, ``drive``, ``brats2013``) this script

1. runs medseg exactly as a user does (subprocesses): ``medseg preprocess --pipeline
   pipelines/X.toml``, ``medseg train --pipeline pipelines/X.toml --fold 0`` (the recipe's steps)
   (fold 0 is the manifest's own train/val split, written as ``splits.json`` into the cache
   before training), then ``medseg infer`` on the raw validation files (PNG, TIFF, NIfTI; one
   ``--volume`` per channel file) with the pipeline's ``[infer] tta``;
2. trains the MONAI baseline recipe on the same training cases for the wall clock medseg took:
   ``BasicUNet`` with features ``(b, b, 2b, 4b, 8b, b)`` from the plan's base channels ``b``
   (MONAI's default pattern), ``RandCropByPosNegLabeld`` crops of the medseg patch size (rounded
   up to a multiple of 16) + random flips and rot90, ``DiceCELoss(softmax)``, Adam lr 1e-3,
   then ``sliding_window_inference`` (overlap 0.5, gaussian) and softmax argmax (for two
   classes the same as thresholding the foreground probability at 0.5);
3. where ``--nnunet-python`` has ``nnunetv2`` (optional; ``benchmarks/README.md``), trains
   nnU-Net v2 (Isensee et al. 2021, Nature Methods) for the same wall clock: the split
   written as its raw data set, ``plan_and_preprocess``, its 2d configuration for ISBI and
   DRIVE and 3d_fullres for BraTS, prediction with its defaults (``benchmarks/
   nnunet_baseline.py``, run with that Python);
4. scores all with the same code on the same arrays (everything read with
   ``medseg.io.read_volume``, nnU-Net's predictions through SimpleITK as they were written),
   prints a table and merges it into ``benchmarks/results/accuracy.json``.

Scores (issue 9, exactly):

- ISBI 2012: per slice, 4-connected components (``skimage.measure.label(connectivity=1)``) of
  the cell interior (file value 255) in reference and prediction,
  ``skimage.metrics.adapted_rand_error(ref_cc, pred_cc)[0]`` (0 = perfect), mean over slices.
- DRIVE: vessel F1 = 2TP / (2TP + FP + FN) pooled over all validation images, counting only
  pixels inside the field-of-view mask (``training/mask/*.gif`` > 0).
- BraTS 2013: whole-tumour Dice (label > 0) per case, mean over cases.

Usage (from the repository root; one data set at a time on a small machine)::

    python benchmarks/bench_accuracy.py --datasets isbi2012 --budget-minutes 20
    python benchmarks/bench_accuracy.py --datasets drive --skip-monai
    python benchmarks/bench_accuracy.py --datasets isbi2012 --nnunet-python NNUNET_VENV/bin/python

medseg trains its pipeline's recipe (``[train]`` steps); MONAI and nnU-Net train for the wall
clock medseg took. ``--budget-minutes`` caps medseg's training and sets the baselines' wall
clock instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from nnunet_baseline import SCRIPT as NNUNET
from nnunet_baseline import SKIP_MESSAGE, available

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "accuracy.json"
DATASETS = ("isbi2012", "drive", "brats2013")

#: Targets of issue 9 (higher_is_better, goal).
GOALS: dict[str, tuple[str, bool, float]] = {
    "isbi2012": ("adapted_rand_error", False, 0.05),
    "drive": ("vessel_f1_fov", True, 0.83),
    "brats2013": ("whole_tumour_dice", True, 0.85),
}


# -- scoring (the one definition used for both methods) -------------------------------------------
def isbi_slice_error(ref: np.ndarray, pred: np.ndarray) -> float:
    """Adapted Rand error of one slice: 4-connected cell-interior (value 255) components.

    ``ref`` and ``pred`` are label images in the file's values (0 = membrane, 255 = cell).
    """
    from skimage.measure import label
    from skimage.metrics import adapted_rand_error

    if ref.shape != pred.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference {ref.shape}")
    ref_cc = label(ref == 255, connectivity=1)
    pred_cc = label(pred == 255, connectivity=1)
    return float(adapted_rand_error(ref_cc, pred_cc)[0])


def drive_counts(ref: np.ndarray, pred: np.ndarray, fov: np.ndarray) -> tuple[int, int, int]:
    """``(TP, FP, FN)`` of vessel pixels (value > 0) inside the field of view (``fov > 0``)."""
    if not ref.shape == pred.shape == fov.shape:
        raise ValueError(f"shapes differ: ref {ref.shape}, pred {pred.shape}, fov {fov.shape}")
    inside = fov > 0
    r, p = (ref > 0) & inside, (pred > 0) & inside
    return int(np.sum(r & p)), int(np.sum(p & ~r)), int(np.sum(r & ~p))


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """``2TP / (2TP + FP + FN)``; 1 when there is nothing to find and nothing was found."""
    den = 2 * tp + fp + fn
    return 1.0 if den == 0 else 2.0 * tp / den


def dice_of(ref: np.ndarray, pred: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty."""
    if ref.shape != pred.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference {ref.shape}")
    den = int(ref.sum()) + int(pred.sum())
    return 1.0 if den == 0 else 2.0 * int(np.sum(ref & pred)) / den


@dataclass
class Scored:
    """Headline score and per-case details of one method on one data set."""

    score: float
    per_case: dict[str, Any] = field(default_factory=dict)


def score_dataset(
    dataset: str,
    refs: dict[str, np.ndarray],
    preds: dict[str, np.ndarray],
    fovs: dict[str, np.ndarray] | None = None,
) -> Scored:
    """Score ``preds`` against ``refs`` (case id -> label array in file values, same layout).

    2D arrays are ``(I, J)`` slices; BraTS arrays ``(I, J, K)``.
    """
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise ValueError(f"no prediction for cases {missing}")
    if dataset == "isbi2012":
        per = {cid: isbi_slice_error(refs[cid], preds[cid]) for cid in sorted(refs)}
        return Scored(float(np.mean(list(per.values()))), per)
    if dataset == "drive":
        if fovs is None:
            raise ValueError("DRIVE scoring needs the field-of-view masks")
        tot = np.zeros(3, dtype=np.int64)
        per_f1 = {}
        for cid in sorted(refs):
            c = drive_counts(refs[cid], preds[cid], fovs[cid])
            tot += c
            per_f1[cid] = f1_from_counts(*c)
        return Scored(f1_from_counts(*(int(v) for v in tot)), per_f1)
    if dataset == "brats2013":
        per_case: dict[str, Any] = {}
        for cid in sorted(refs):
            r, p = refs[cid], preds[cid]
            per_case[cid] = {
                "whole": dice_of(r > 0, p > 0),
                "core": dice_of(np.isin(r, (1, 3, 4)), np.isin(p, (1, 3, 4))),
                "enhancing": dice_of(r == 4, p == 4),
            }
        return Scored(float(np.mean([v["whole"] for v in per_case.values()])), per_case)
    raise ValueError(f"unknown data set {dataset!r}; expected one of {DATASETS}")


# -- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """Train and validation cases of a manifest (by its ``split`` field)."""

    manifest: Any
    train: list[Any]
    val: list[Any]


def load_split(
    manifest_path: Path, data_root: Path | None = None, val_cases: Sequence[str] | None = None
) -> Split:
    """The manifest's train/val split; ``val_cases`` (ids) instead validates on those cases
    and trains on every other train or val case (another fold of a small data set)."""
    from medseg.manifest import load_manifest

    m = load_manifest(manifest_path, data_root)
    if val_cases:
        unknown = set(val_cases) - {c.case_id for c in m.cases}
        if unknown:
            raise SystemExit(f"{manifest_path}: no cases {sorted(unknown)}")
        pool = [c for c in m.cases if c.split in ("train", "val")]
        train = [c for c in pool if c.case_id not in val_cases]
        val = [c for c in pool if c.case_id in val_cases]
        return Split(m, train, val)
    train = [c for c in m.cases if c.split == "train"]
    val = [c for c in m.cases if c.split == "val"]
    if not train or not val:
        raise SystemExit(f"{manifest_path}: needs cases with split 'train' and 'val'")
    return Split(m, train, val)


def _spatial(array: np.ndarray, dims: int) -> np.ndarray:
    """``(C, I, J, K)`` -> ``(C, I, J)`` for 2D data (K must be 1), unchanged for 3D."""
    if dims == 3:
        return array
    if array.shape[-1] != 1:
        raise ValueError(f"2D data set but the volume has K = {array.shape[-1]} slices")
    return array[..., 0]


def read_image(case: Any, dims: int) -> np.ndarray:
    """All channel files of a case stacked: float32 ``(C, I, J[, K])``."""
    from medseg.io import read_volume

    arrays = [read_volume(p).array for p in case.images]
    return _spatial(np.concatenate(arrays, axis=0), dims).astype(np.float32)


def read_label(path: Path, dims: int) -> np.ndarray:
    """A label file's values ``(I, J[, K])`` (file values, integer)."""
    from medseg.io import read_volume

    return _spatial(read_volume(path, label=True).array, dims)[0]


def references(dataset: str, split: Split, dims: int) -> tuple[dict, dict | None]:
    refs = {c.case_id: read_label(c.label, dims) for c in split.val}
    fovs = None
    if dataset == "drive":
        fovs = {c.case_id: read_label(c.extras["fov"], dims) for c in split.val}
    return refs, fovs


# -- medseg (the user's commands) ----------------------------------------------------------------
def medseg_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "medseg.cli", *args]


def run(cmd: Sequence[str], log: Path) -> float:
    """Run a command, appending its output to ``log``; seconds taken. Fails loudly."""
    t0 = time.perf_counter()
    print("$", " ".join(str(c) for c in cmd), flush=True)
    with log.open("a") as fh:
        fh.write("$ " + " ".join(str(c) for c in cmd) + "\n")
        fh.flush()
        proc = subprocess.run(list(cmd), cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-25:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    return time.perf_counter() - t0


def write_manifest_split(prep: Path, split: Split) -> None:
    """``PREP/splits.json`` whose fold 0 is the manifest's train/val split.

    ``medseg train`` reads folds from this file (every case must be in some fold's val, hence
    the complementary fold 1).
    """
    from medseg.atomic import write_json

    tr = sorted(c.case_id for c in split.train)
    va = sorted(c.case_id for c in split.val)
    write_json(prep / "splits.json", [{"train": tr, "val": va}, {"train": va, "val": tr}])


def pred_suffix(case: Any) -> str:
    name = Path(case.images[0]).name.lower()
    return ".nii.gz" if name.endswith((".nii", ".nii.gz")) else ".png"


def run_medseg(
    dataset: str,
    pipeline_path: Path,
    split: Split,
    work: Path,
    budget_min: float | None,
    dims: int,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from medseg.config import load_pipeline

    pipe = load_pipeline(pipeline_path)
    prep, run_dir, pred_dir = work / "prep", work / "medseg", work / "medseg_pred"
    log = work / "medseg.log"
    info: dict[str, Any] = {}
    info["preprocess_seconds"] = round(
        run(medseg_cmd("preprocess", "--pipeline", str(pipeline_path), "--out", str(prep)), log), 1
    )
    write_manifest_split(prep, split)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    info["train_seconds"] = round(
        run(
            medseg_cmd(
                "train", "--pipeline", str(pipeline_path), "--out", str(run_dir),
                "--prep", str(prep), "--fold", "0", "--device", "cpu",
                *(["--time-budget", f"{budget_min:g}"] if budget_min else []),
            ),
            log,
        ),
        1,
    )  # fmt: skip
    training = json.loads((run_dir / "training.json").read_text())
    info.update(
        epochs=training.get("epochs_done"),
        steps=training.get("steps_done"),
        best_val_dice=training.get("best_val_dice_mean"),
        postprocessing=(run_dir / "postprocessing.json").is_file()
        and json.loads((run_dir / "postprocessing.json").read_text()),
    )
    if sorted(training["val_cases"]) != sorted(c.case_id for c in split.val):
        raise SystemExit(f"{run_dir}: trained with validation {training['val_cases']}")
    pred_dir.mkdir(parents=True, exist_ok=True)
    tta = str(pipe.infer.get("tta", "none"))
    t0 = time.perf_counter()
    preds = {}
    for c in split.val:
        out = pred_dir / f"{c.case_id}{pred_suffix(c)}"
        vols = [a for p in c.images for a in ("--volume", str(p))]
        run(
            medseg_cmd(
                "infer", *vols, "--model", str(run_dir), "--output", str(out), "--tta", tta,
                "--device", "cpu",
            ),
            log,
        )  # fmt: skip
        preds[c.case_id] = read_label(out, dims)
    info["infer_seconds"] = round(time.perf_counter() - t0, 1)
    info["tta"] = tta
    return preds, info


# -- MONAI baseline ------------------------------------------------------------------------------
#: MONAI's recipe for 3D data when medseg's plan is 2D (BraTS): 3D random crops of 64^3 and a
#: BasicUNet of base width 16, the 3D set-up medseg itself used before its 2D configuration.
MONAI_3D_ROI, MONAI_3D_BASE = (64, 64, 64), 16


def monai_roi(plan: dict[str, Any], dims: int) -> tuple[int, ...]:
    """The medseg training patch (output side) rounded up to BasicUNet's multiple of 16; the
    3D default above where the plan is 2D on 3D data, and at least that default in 3D (MONAI
    reads the 1 mm data while medseg's plan may train at a coarser spacing)."""
    if len(plan["patch_output_size"]) != dims:
        return MONAI_3D_ROI
    roi = tuple(max(16, int(math.ceil(s / 16)) * 16) for s in plan["patch_output_size"])
    return tuple(max(r, d) for r, d in zip(roi, MONAI_3D_ROI, strict=True)) if dims == 3 else roi


def monai_features(plan: dict[str, Any], dims: int) -> tuple[int, ...]:
    b = int(plan["network"]["base_channels"])
    if len(plan["patch_output_size"]) != dims:
        b = MONAI_3D_BASE
    return (b, b, 2 * b, 4 * b, 8 * b, b)


def class_indices(label: np.ndarray, values: Sequence[int]) -> np.ndarray:
    lut = {int(v): i for i, v in enumerate(values)}
    out = np.zeros(label.shape, dtype=np.int64)
    for v, i in lut.items():
        out[label == v] = i
    return out


def run_monai(
    dataset: str,
    split: Split,
    plan: dict[str, Any],
    budget_min: float,
    dims: int,
    batch_size: int,
    seed: int = 0,
    progress: Callable[[str], None] = print,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet
    from monai.transforms import (
        Compose,
        EnsureTyped,
        FgBgToIndicesd,
        NormalizeIntensity,
        NormalizeIntensityd,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandRotate90d,
    )
    from monai.utils import set_determinism

    set_determinism(seed)
    values = [int(v) for v in plan["label_values"]]
    n_classes = len(values)
    nonzero = dataset == "brats2013"  # MONAI's BraTS recipe normalises inside the brain
    roi = monai_roi(plan, dims)
    keys = ["image", "label"]
    data = [
        {
            "image": read_image(c, dims),
            "label": class_indices(read_label(c.label, dims), values)[None],
        }
        for c in split.train
    ]
    flips = [RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(dims)]
    transform = Compose(
        [
            EnsureTyped(keys, track_meta=False),
            NormalizeIntensityd("image", nonzero=nonzero, channel_wise=True),
            FgBgToIndicesd("label", fg_postfix="_fg", bg_postfix="_bg"),
            RandCropByPosNegLabeld(
                keys, "label", spatial_size=roi, pos=1, neg=1, num_samples=1,
                fg_indices_key="label_fg", bg_indices_key="label_bg",
            ),
            *flips,
            RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(0, 1)),
        ]
    )  # fmt: skip
    ds = CacheDataset(data, transform, cache_rate=1.0, num_workers=0, progress=False)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0)
    model = BasicUNet(
        spatial_dims=dims, in_channels=data[0]["image"].shape[0], out_channels=n_classes,
        features=monai_features(plan, dims),
    )  # fmt: skip
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    budget = budget_min * 60.0
    t0, steps, last = time.perf_counter(), 0, 0.0
    model.train()
    while time.perf_counter() - t0 < budget:
        for batch in loader:
            x, y = batch["image"].float(), batch["label"].long()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            steps += 1
            now = time.perf_counter() - t0
            if now - last > 60:
                progress(f"monai {dataset}: step {steps}, loss {float(loss):.4f}, {now:.0f} s")
                last = now
            if now >= budget:
                break
    train_seconds = time.perf_counter() - t0
    model.eval()
    norm = NormalizeIntensity(nonzero=nonzero, channel_wise=True)
    preds = {}
    t1 = time.perf_counter()
    with torch.no_grad():
        for c in split.val:
            img = torch.as_tensor(np.asarray(norm(read_image(c, dims))), dtype=torch.float32)
            logits = sliding_window_inference(
                img[None], roi, sw_batch_size=4, predictor=model, overlap=0.5, mode="gaussian"
            )
            assert isinstance(logits, torch.Tensor)
            cls = torch.softmax(logits[0], dim=0).argmax(dim=0).numpy()
            preds[c.case_id] = np.asarray(values)[cls]
    info = {
        "train_seconds": round(train_seconds, 1),
        "steps": steps,
        "infer_seconds": round(time.perf_counter() - t1, 1),
        "roi": list(roi),
        "features": list(monai_features(plan, dims)),
        "batch_size": batch_size,
    }
    return preds, info


# -- nnU-Net v2 baseline (optional) --------------------------------------------------------------
#: nnU-Net's three-digit data set ids for the raw folder it plans from.
NNUNET_IDS = {"isbi2012": 901, "drive": 902, "brats2013": 903}


def write_nnunet_image(array: np.ndarray, path: Path, dims: int) -> None:
    """One channel ``(I, J[, K])`` as NIfTI through SimpleITK, whose array axes are the
    array's own, so a prediction read back the same way lines up voxel for voxel. Spacing
    1 mm (the 2D sets carry none; the BraTS volumes are 1 mm), 999 across a 2D slice
    (nnU-Net's convention for 2D data in 3D files)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array[None] if dims == 2 else array)
    img.SetSpacing((1.0, 1.0, 999.0) if dims == 2 else (1.0, 1.0, 1.0))
    sitk.WriteImage(img, str(path))


def read_nnunet_label(path: Path, dims: int) -> np.ndarray:
    """A label file written by ``write_nnunet_image`` (or nnU-Net from such input)."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return array[0] if dims == 2 else array


def write_nnunet_raw(dataset: str, split: Split, root: Path, dims: int) -> list[int]:
    """nnU-Net's raw data set ``root/raw/DatasetNNN_name``: the training cases in
    ``imagesTr``/``labelsTr``, the validation cases in ``imagesTs``, one file per channel;
    labels as consecutive class indices of the sorted training label values (returned)."""
    from medseg.atomic import write_json

    folder = root / "raw" / f"Dataset{NNUNET_IDS[dataset]}_{dataset}"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    labels = {c.case_id: read_label(c.label, dims) for c in split.train}
    values = sorted({int(v) for lab in labels.values() for v in np.unique(lab)})
    for cases, sub in ((split.train, "imagesTr"), (split.val, "imagesTs")):
        for c in cases:
            for k, channel in enumerate(read_image(c, dims)):
                write_nnunet_image(channel, folder / sub / f"{c.case_id}_{k:04d}.nii.gz", dims)
    for cid, lab in labels.items():
        index = class_indices(lab, values).astype(np.uint8)
        write_nnunet_image(index, folder / "labelsTr" / f"{cid}.nii.gz", dims)
    names = {"background": 0, **{f"value_{v}": i for i, v in enumerate(values) if i > 0}}
    channels = {str(k): name for k, name in enumerate(split.manifest.channels)}
    write_json(folder / "dataset.json", {"channel_names": channels, "labels": names,
               "numTraining": len(split.train), "file_ending": ".nii.gz"})  # fmt: skip
    return values


def run_nnunet(
    dataset: str, split: Split, budget_min: float, dims: int, work: Path, python: str, threads: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """nnU-Net v2 (Isensee et al. 2021, Nature Methods 18:203-211) as its user runs it, with
    ``python`` (an environment with ``nnunetv2``): the raw folder from the manifest split,
    ``plan_and_preprocess``, its 2d configuration for 2D data and 3d_fullres for BraTS,
    training on every training case for ``budget_min`` of wall clock (``nnunet_baseline.py``:
    nnU-Net has no time cap, its poly schedule is fitted to the budget), prediction of the
    validation cases with its defaults (tile step 0.5, gaussian, mirroring)."""
    root = work / "nnunet"
    if root.exists():  # stale plans or checkpoints would be reused
        shutil.rmtree(root)
    values = write_nnunet_raw(dataset, split, root, dims)
    cmd = [python, str(NNUNET), "train", "--work", str(root), "--dataset-id",
           str(NNUNET_IDS[dataset]), "--config", "2d" if dims == 2 else "3d_fullres",
           "--budget-seconds", f"{budget_min * 60.0:.0f}", "--threads", str(threads)]  # fmt: skip
    run(cmd, work / "nnunet.log")
    info = json.loads((root / "nnunet_info.json").read_text())
    lut = np.asarray(values)
    preds = {
        c.case_id: lut[read_nnunet_label(root / "pred" / f"{c.case_id}.nii.gz", dims)]
        for c in split.val
    }
    return preds, info


def monai_baseline(
    dataset: str, pipeline_path: Path, split: Split, work: Path, wall: float, dims: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The MONAI recipe with the widths and crop of medseg's plan (preprocessed if need be)."""
    from medseg.config import load_pipeline

    plan_path = work / "prep" / "plan.json"
    if not plan_path.is_file():  # the baseline's widths and crop come from the plan
        prep = ["preprocess", "--pipeline", str(pipeline_path), "--out", str(work / "prep")]
        run(medseg_cmd(*prep), work / "medseg.log")
    plan = json.loads(plan_path.read_text())
    batch = int(load_pipeline(pipeline_path).train.get("batch_size", 2))
    return run_monai(dataset, split, plan, wall, dims, batch)


# -- driver -------------------------------------------------------------------------------------
def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} (CPU)"


def merge_results(path: Path, dataset: str, entry: dict[str, Any]) -> dict[str, Any]:
    from medseg.atomic import write_json

    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
    data.setdefault("datasets", {})[dataset] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)
    return data


def fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"


def print_table(data: dict[str, Any]) -> None:
    """medseg vs MONAI and nnU-Net per data set, with the goal of issue 9 and who is ahead."""
    head = ("data set", "metric", "medseg", "MONAI", "nnU-Net", "ahead", "goal", "budget",
            "machine")  # fmt: skip
    names = {"medseg": "medseg", "monai": "MONAI", "nnunet": "nnU-Net"}
    rows = []
    for ds, e in data.get("datasets", {}).items():
        scores = {k: e[k] for k in names if e.get(k) is not None}
        ahead = "-"
        if len(scores) > 1:
            pick = max if e["higher_is_better"] else min
            ahead = names[pick(scores, key=lambda k: scores[k])]
        rows.append(
            (ds, e["metric"], fmt(e.get("medseg")), fmt(e.get("monai")), fmt(e.get("nnunet")),
             ahead, f"{e['goal_op']} {e['goal']}", f"{e['budget_minutes']:g} min",
             e.get("machine", "?"))
        )  # fmt: skip
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print()
    for r in [head, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def bench(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from medseg.config import load_pipeline

    for dataset in args.datasets:
        pipeline_path = REPO / "pipelines" / f"{dataset}.toml"
        pipe = load_pipeline(pipeline_path)
        assert pipe.manifest is not None
        split = load_split(
            REPO / pipe.manifest if not pipe.manifest.is_absolute() else pipe.manifest,
            val_cases=args.val_cases,
        )
        # medseg trains its recipe (steps); the baselines get the wall clock it took
        budget = args.budget_minutes
        dims = 2 if dataset in ("isbi2012", "drive") else 3
        work = args.work / dataset
        work.mkdir(parents=True, exist_ok=True)
        refs, fovs = references(dataset, split, dims)
        metric, higher, goal = GOALS[dataset]
        entry: dict[str, Any] = {
            "metric": metric,
            "higher_is_better": higher,
            "goal": goal,
            "goal_op": ">=" if higher else "<=",
            "budget_minutes": budget or 0.0,
            "train_cases": len(split.train),
            "val_cases": [c.case_id for c in split.val],
            "machine": machine(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }
        old = {}
        if args.results.is_file():
            old = json.loads(args.results.read_text()).get("datasets", {}).get(dataset, {})
        if not args.skip_medseg:
            preds, info = run_medseg(dataset, pipeline_path, split, work, budget, dims)
            entry["budget_minutes"] = budget or info["train_seconds"] / 60.0
            s = score_dataset(dataset, refs, preds, fovs)
            entry.update(medseg=s.score, medseg_per_case=s.per_case, medseg_info=info)
            print(f"{dataset}: medseg {metric} {s.score:.4f}", flush=True)
        else:
            entry.update(
                {k: old[k] for k in ("medseg", "medseg_per_case", "medseg_info") if k in old}
            )
        # the baselines train for the wall clock medseg took (or the one it was capped to)
        wall = float(entry["budget_minutes"] or old.get("budget_minutes") or 25.0)
        if not args.skip_monai:
            preds, info = monai_baseline(dataset, pipeline_path, split, work, wall, dims)
            s = score_dataset(dataset, refs, preds, fovs)
            entry.update(monai=s.score, monai_per_case=s.per_case, monai_info=info)
            print(f"{dataset}: MONAI {metric} {s.score:.4f}", flush=True)
        else:
            entry.update({k: old[k] for k in ("monai", "monai_per_case", "monai_info") if k in old})
        if args.skip_nnunet:
            entry.update(
                {k: old[k] for k in ("nnunet", "nnunet_per_case", "nnunet_info") if k in old}
            )
        elif not available(args.nnunet_python):
            print(f"{dataset}: nnU-Net {SKIP_MESSAGE}", flush=True)
            entry["nnunet_info"] = {"skipped": SKIP_MESSAGE}
        else:
            preds, info = run_nnunet(
                dataset, split, wall, dims, work, args.nnunet_python, args.threads
            )
            s = score_dataset(dataset, refs, preds, fovs)
            entry.update(nnunet=s.score, nnunet_per_case=s.per_case, nnunet_info=info)
            print(f"{dataset}: nnU-Net {metric} {s.score:.4f}", flush=True)
        data = merge_results(args.results, dataset, entry)
    print_table(data)
    print(f"\nwritten {args.results}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--datasets",
        default=",".join(DATASETS),
        type=lambda s: [d.strip() for d in s.split(",") if d.strip()],
        help="comma-separated subset of isbi2012,drive,brats2013",
    )
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="cap medseg's training and give each baseline this wall clock (default: medseg "
        "trains its steps, the baselines the time it took)",
    )
    p.add_argument(
        "--val-cases",
        type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
        help="validate on these case ids instead of the manifest's split (one data set)",
    )
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench_accuracy")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 4))
    p.add_argument("--skip-medseg", action="store_true", help="keep the last medseg result")
    p.add_argument("--skip-monai", action="store_true", help="keep the last MONAI result")
    p.add_argument("--skip-nnunet", action="store_true", help="keep the last nnU-Net result")
    p.add_argument(
        "--nnunet-python",
        default=sys.executable,
        help="a Python with nnunetv2 installed (the optional nnU-Net v2 baseline; "
        "benchmarks/README.md)",
    )
    args = p.parse_args(argv)
    bad = [d for d in args.datasets if d not in DATASETS]
    if bad:
        p.error(f"unknown data sets {bad}; choose from {DATASETS}")
    return args


if __name__ == "__main__":
    bench(parse_args())
