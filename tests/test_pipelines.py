"""The real-data pipelines in ``pipelines/`` load, plan and configure training; the accuracy
benchmark's scores follow their definitions. No training here (that is the benchmark's job).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from medseg.config import Pipeline, load_pipeline
from medseg.preprocess.fingerprint import CaseFingerprint, ChannelStats, Fingerprint
from medseg.preprocess.plan import Plan, make_plan
from medseg.volume import Box, Grid

REPO = Path(__file__).resolve().parents[1]
PIPELINES = ("isbi2012", "drive", "brats2013")

#: Geometry of the real cases (data README): shape (I, J, K) and affine, per data set.
_GEOMETRY = {
    "isbi2012": ((512, 512, 1), np.diag([-1.0, -1.0, 1.0, 1.0])),
    "drive": ((565, 584, 1), np.diag([-1.0, -1.0, 1.0, 1.0])),
    "brats2013": (
        (240, 240, 155),
        np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]),
    ),
}


def _pipeline(name: str) -> Pipeline:
    return load_pipeline(REPO / "pipelines" / f"{name}.toml")


def _fingerprint(name: str, pipe: Pipeline, data_root: Path) -> Fingerprint:
    """A fingerprint with the data set's real geometry, channels and labels (no pixels read)."""
    from medseg.manifest import load_manifest

    assert pipe.manifest is not None
    m = load_manifest(REPO / pipe.manifest, data_root)
    shape, affine = _GEOMETRY[name]
    labels = m.labels or {0: "background", 1: "foreground"}
    cases = [
        CaseFingerprint(
            c.case_id,
            Grid(shape, affine),
            len(m.channels),
            Box((0, 0, 0), shape),
            {v: 100 for v in labels},
        )
        for c in m.cases
    ]
    stats = [ChannelStats(ch, 0.0, 1.0, -3.0, 3.0, -4.0, 4.0, 100) for ch in m.channels]
    return Fingerprint(m.name, list(m.channels), m.modalities, labels, m.regions, cases, stats)


def _plan(name: str, data_root: Path) -> Plan:
    pipe = _pipeline(name)
    return make_plan(_fingerprint(name, pipe, data_root), pipe.plan, source=f"{name} [plan]")


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_manifest_exists_and_has_train_and_val_split(name: str, data_root: Path) -> None:
    from medseg.manifest import load_manifest

    pipe = _pipeline(name)
    assert pipe.name == name
    assert pipe.manifest is not None and pipe.prep_dir is not None
    m = load_manifest(REPO / pipe.manifest, data_root)
    splits = {c.split for c in m.cases}
    assert {"train", "val"} <= splits
    assert all(c.label is not None and Path(c.label).is_file() for c in m.cases)
    assert all(Path(p).is_file() for c in m.cases for p in c.images)


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_plan_keys_accepted_and_network_consistent(name: str, data_root: Path) -> None:
    from medseg.model import UNet, shapes

    plan = _plan(name, data_root)
    d, n = plan.network["depth"], plan.network["convs_per_level"]
    assert plan.margin == (shapes.margin(d, n),) * plan.spatial_dims
    for size in (*plan.patch_output_size, *plan.tile_output_size):
        assert shapes.is_valid_output(size, d, n)
    model = UNet(**plan.network)
    assert model.margin == plan.margin[0]
    # the plan survives its own JSON round trip (what preprocess writes and infer reads)
    assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()


def test_isbi_plan_keeps_the_label_polarity(data_root: Path) -> None:
    """File value 0 is membrane (class 0, separating objects), 255 the cell interior."""
    plan = _plan("isbi2012", data_root)
    assert plan.spatial_dims == 2
    assert plan.label_values == [0, 255]
    assert plan.class_names == ["membrane", "cell"]
    labels = np.array([[0, 255], [255, 0]])
    assert np.array_equal(plan.classes_to_labels(plan.labels_to_classes(labels)), labels)


def test_drive_plan_is_2d_rgb(data_root: Path) -> None:
    plan = _plan("drive", data_root)
    assert plan.spatial_dims == 2 and plan.in_channels == 3
    assert plan.label_values == [0, 255]


def test_brats_plan_is_3d_brain_zscored_with_brats_regions(data_root: Path) -> None:
    plan = _plan("brats2013", data_root)
    assert plan.spatial_dims == 3 and plan.in_channels == 2
    assert [c.normalisation for c in plan.channels] == ["zscore_nonzero", "zscore_nonzero"]
    assert plan.crop_to_nonzero
    assert plan.label_values == [0, 1, 2, 3, 4]
    assert plan.regions == {"whole": [1, 2, 3, 4], "core": [1, 3, 4], "enhancing": [4]}


def test_brats_cases_share_one_background_value_after_preprocessing(data_root: Path) -> None:
    """The source z-scored each scan inside the brain, so the constant outside it differs per
    case (FLAIR -3.6 in pat0001, -5.3 in pat0004); a network trained on one background and
    shown another floods it with tumour. Re-z-scoring inside the brain sets it to 0."""
    import nibabel as nib

    from medseg.io import read_volume
    from medseg.preprocess.pipeline import preprocess_case

    plan = _plan("brats2013", data_root)
    for case in ("brats_2013_pat0001_1", "brats_2013_pat0004_1"):
        folder = data_root / "brats2013" / case
        raw = nib.load(folder / "Flair_subtrMeanDivStd.nii.gz").get_fdata()
        images = [read_volume(folder / f"{ch}_subtrMeanDivStd.nii.gz") for ch in ("Flair", "T1c")]
        out = preprocess_case(images, plan).image.array
        for c in range(2):  # outside the brain 0 (up to the resampling's ringing), not -3.6
            assert np.mean(np.abs(out[c]) < 1e-3) > 0.1
        assert np.mean(np.abs(out[0] - raw[0, 0, 0]) < 1e-2) < 0.01
        brain = raw != raw[0, 0, 0]
        assert abs(raw[brain].mean()) < 0.2  # the source's own z-scoring, for scale
        assert abs(float(out[0][out[0] != 0].mean())) < 0.05


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_train_preprocess_and_infer_sections_accepted(name: str) -> None:
    from medseg.inference.tiled import _flip_sets
    from medseg.preprocess.cohort import Options
    from medseg.training.augment import AugmentConfig
    from medseg.training.config import TrainConfig
    from medseg.training.losses import SegmentationLoss

    pipe = _pipeline(name)
    cfg = TrainConfig.from_dict(pipe.train)
    AugmentConfig.from_dict(cfg.augment)
    opts = Options.from_dict(pipe.preprocess)
    loss = SegmentationLoss(cfg.loss)
    # a loss on border weight maps needs preprocessing to write them
    assert not loss.needs_weights or opts.border_weights is not None
    # the recipe's length is its steps, stated with the measured minutes in the comments; a
    # wall-clock cap is no part of it (it would make the model depend on the machine)
    assert cfg.time_budget_minutes is None
    assert f"{cfg.total_steps:,} steps" in pipe.text
    dims = load_pipeline(REPO / "pipelines" / f"{name}.toml").plan["spatial_dims"]
    assert _flip_sets(pipe.infer.get("tta", "none"), dims)  # a value `medseg infer` accepts
    assert set(pipe.infer) <= {"tta"}


def test_isbi_pipeline_uses_the_unet_paper_ingredients() -> None:
    pipe = _pipeline("isbi2012")
    bw = pipe.preprocess["border_weights"]
    assert (bw["w0"], bw["sigma"], bw["instances"]) == (10.0, 5.0, "components")
    assert bw["class_balance"] is False
    assert pipe.train["loss"] in ("weighted_ce", "dice_weighted_ce")
    assert pipe.train["augment"]["p_elastic"] > 0
    assert pipe.infer["tta"] == "flip"


# -- the accuracy benchmark's scores --------------------------------------------------------------
@pytest.fixture(scope="module")
def bench() -> ModuleType:
    path = REPO / "benchmarks" / "bench_accuracy.py"
    if str(path.parent) not in sys.path:  # as when it runs as a script: its sibling modules
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("bench_accuracy", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_accuracy"] = mod
    spec.loader.exec_module(mod)
    return mod


def _two_cells() -> np.ndarray:
    """0 = membrane frame and a vertical membrane between two cells of value 255."""
    ref = np.zeros((12, 12), dtype=np.uint8)
    ref[1:11, 1:5] = 255
    ref[1:11, 6:11] = 255
    return ref


def test_isbi_score_perfect_is_zero_and_merge_is_penalised(bench: ModuleType) -> None:
    ref = _two_cells()
    assert bench.isbi_slice_error(ref, ref.copy()) == pytest.approx(0.0)
    merged = ref.copy()
    merged[1:11, 5] = 255  # the membrane between the cells is missed
    err = bench.isbi_slice_error(ref, merged)
    # two equal-sized cells merged into one: precision 1/2 (skimage's definition), recall 1
    # -> error 1 - 2 * 0.5 * 1 / 1.5 = 1/3, up to the unequal sizes and the extra 10 pixels
    assert 0.25 < err < 0.4


def test_isbi_score_uses_4_connectivity(bench: ModuleType) -> None:
    """Cells touching only at a corner are two segments (a diagonal membrane separates them)."""
    ref = np.zeros((6, 6), dtype=np.uint8)
    ref[0:3, 0:3] = 255
    ref[3:6, 3:6] = 255
    one = ref.copy()
    one[2, 3] = 255  # now 4-connected: one segment
    assert bench.isbi_slice_error(ref, ref) == pytest.approx(0.0)
    assert bench.isbi_slice_error(ref, one) > 0.2


def test_isbi_polarity_inverted_prediction_scores_badly(bench: ModuleType) -> None:
    ref = _two_cells()
    assert bench.isbi_slice_error(ref, 255 - ref) > 0.3


def test_drive_f1_counts_only_inside_the_fov(bench: ModuleType) -> None:
    ref = np.zeros((4, 4), dtype=np.uint8)
    ref[0, :] = 255
    pred = np.zeros_like(ref)
    pred[0, :2] = 255  # TP 2, FN 2
    pred[3, 3] = 255  # FP outside the FOV: ignored
    pred[2, 2] = 255  # FP inside
    fov = np.full_like(ref, 255)
    fov[3, 3] = 0
    assert bench.drive_counts(ref, pred, fov) == (2, 1, 2)
    s = bench.score_dataset(
        "drive", {"a": ref, "b": ref}, {"a": pred, "b": ref}, {"a": fov, "b": fov}
    )
    # pooled: TP 6, FP 1, FN 2 -> 12 / 15
    assert s.score == pytest.approx(12 / 15)


def test_brats_whole_tumour_dice_is_the_mean_over_cases(bench: ModuleType) -> None:
    ref = np.zeros((4, 4, 4), dtype=np.uint8)
    ref[:2] = 2
    ref[0, 0, 0] = 4
    pred_a = ref.copy()  # Dice 1
    pred_b = np.zeros_like(ref)
    pred_b[:1] = 1  # 16 of 32 whole-tumour voxels, labelled with another tumour class
    s = bench.score_dataset("brats2013", {"a": ref, "b": ref}, {"a": pred_a, "b": pred_b})
    assert s.per_case["b"]["whole"] == pytest.approx(2 * 16 / 48)
    assert s.score == pytest.approx((1.0 + 2 * 16 / 48) / 2)


def test_bench_split_other_fold_trains_on_every_other_case(bench: ModuleType, data_root) -> None:
    manifest = REPO / "data_manifests" / "brats2013.json"
    own = bench.load_split(manifest, data_root)
    assert [c.case_id for c in own.val] == ["brats_2013_pat0005_1"]
    other = bench.load_split(manifest, data_root, val_cases=["brats_2013_pat0004_1"])
    assert [c.case_id for c in other.val] == ["brats_2013_pat0004_1"]
    assert sorted(c.case_id for c in other.train) == [
        f"brats_2013_pat000{i}_1" for i in (1, 2, 3, 5)
    ]
    with pytest.raises(SystemExit, match="pat0009"):
        bench.load_split(manifest, data_root, val_cases=["brats_2013_pat0009_1"])


def test_nnunet_raw_folder_holds_the_split_one_file_per_channel_labels_consecutive(
    bench: ModuleType, data_root, tmp_path: Path
) -> None:
    """The optional nnU-Net baseline's raw data set (written without nnunetv2): DRIVE's RGB
    TIFF as three channel files, its 0/255 vessel labels as classes 0/1, checked against the
    files read by Pillow and the NIfTI read by nibabel."""
    import json

    import nibabel as nib
    from PIL import Image

    full = bench.load_split(REPO / "data_manifests" / "drive.json", data_root)
    split = bench.Split(full.manifest, full.train[:2], full.val[:1])
    assert bench.write_nnunet_raw("drive", split, tmp_path, 2) == [0, 255]
    folder = tmp_path / "raw" / "Dataset902_drive"
    val_id = split.val[0].case_id
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == [
        f"{val_id}_{k:04d}.nii.gz" for k in range(3)
    ]
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert meta["labels"] == {"background": 0, "value_255": 1}
    assert meta["numTraining"] == 2
    case = split.train[0]
    label = np.asarray(nib.load(folder / "labelsTr" / f"{case.case_id}.nii.gz").dataobj)
    vessel = np.asarray(Image.open(case.label)) > 0
    assert set(np.unique(label)) == {0, 1}
    assert int(label.sum()) == int(vessel.sum())
    green = np.asarray(nib.load(folder / "imagesTr" / f"{case.case_id}_0001.nii.gz").dataobj)
    rgb = np.asarray(Image.open(case.images[0]), dtype=np.float64)
    assert green.sum() == pytest.approx(rgb[..., 1].sum())
    back = bench.read_nnunet_label(folder / "labelsTr" / f"{case.case_id}.nii.gz", 2)
    assert np.array_equal(back, label[:, :, 0].T)


# -- `medseg infer` follows the run's pipeline [infer] tta ----------------------------------------
def _tiny_run(folder: Path, infer_table: str) -> None:
    """A model folder as `medseg train` writes it: plan.json, model.pt, pipeline.toml."""
    import torch

    from medseg.model import UNet, shapes
    from medseg.preprocess.plan import ChannelPlan

    network = {
        "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "depth": 1,
        "base_channels": 4, "channel_multiplier": 2, "convs_per_level": 2,
        "upsampling": "transpose", "norm": "none", "dropout": 0.0,
    }  # fmt: skip
    size = shapes.min_output_size(1, 2)
    plan = Plan(
        spatial_dims=2,
        channels=[ChannelPlan("EM", "EM", "zscore")],
        label_values=[0, 255],
        class_names=["membrane", "cell"],
        network=network,
        patch_output_size=(size, size),
        tile_output_size=(size, size),
        margin=(shapes.margin(1, 2),) * 2,
        orientation=None,
    )
    folder.mkdir()
    plan.save(folder / "plan.json")
    torch.manual_seed(3)
    model = UNet(**network)
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "pipeline.toml").write_text(f'name = "tiny"\n\n[infer]\n{infer_table}\n')


def test_infer_defaults_to_the_run_pipeline_tta(tmp_path: Path, rng: np.random.Generator) -> None:
    from PIL import Image

    from medseg.cli import main

    img = tmp_path / "slice.png"
    Image.fromarray(rng.integers(0, 255, size=(21, 17), dtype=np.uint8)).save(img)
    run = tmp_path / "run"
    _tiny_run(run, 'tta = "flip"')
    out = {}
    for name, extra in (("default", []), ("flip", ["--tta", "flip"]), ("none", ["--tta", "none"])):
        path = tmp_path / f"{name}.png"
        with pytest.raises(SystemExit) as done:  # typer's standalone mode exits
            main(
                ["infer", "--volume", str(img), "--model", str(run), "--output", str(path), *extra]
            )
        assert done.value.code in (0, None)
        out[name] = np.asarray(Image.open(path))
    assert np.array_equal(out["default"], out["flip"])
    assert not np.array_equal(out["none"], out["flip"])  # the check can tell them apart


def test_border_weights_without_class_balance_weigh_only_the_gaps() -> None:
    """``class_balance=False``: w = 1 in the cells and far from them, 1 + w0 * exp(...) in the
    membrane between two cells; ignored voxels 0."""
    from medseg.preprocess.weights import border_weights

    classes = np.zeros((30, 30, 1), dtype=np.int16)
    classes[2:28, 2:14] = 1
    classes[2:28, 16:28] = 1  # a 2-voxel membrane between two cells
    classes[0, 0] = -1
    w = border_weights(classes, w0=10.0, sigma=5.0, class_balance=False)
    assert w[0, 0, 0] == 0.0
    assert np.all(w[classes == 1] == 1.0)
    # gap voxel (15, 14): 1 voxel from the left cell, 2 from the right one: d1 + d2 = 3
    assert w[15, 14, 0] == pytest.approx(1.0 + 10.0 * np.exp(-(3.0**2) / (2 * 5.0**2)), rel=1e-5)
    balanced = border_weights(classes, w0=10.0, sigma=5.0)
    assert balanced[5, 5, 0] != pytest.approx(1.0)  # the default keeps the paper's w_c


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_plan_overrides_match_a_cache_preprocessed_with_it(
    name: str, data_root: Path, tmp_path: Path
) -> None:
    from medseg.config import check_plan_overrides

    _plan(name, data_root).save(tmp_path / "plan.json")
    check_plan_overrides(_pipeline(name), tmp_path)
