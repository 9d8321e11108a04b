"""One case: geometry and label values on real and synthetic scans, probabilities, output
arrays, postprocessing, the boundary-probability store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from medseg.errors import ModelError
from medseg.inference import case as case_module
from medseg.inference.case import (
    PROBABILITY_RESTORE_MAX_CLASSES,
    _BoundaryProbabilities,
    _output_arrays,
    infer_case,
    predict_case,
)
from medseg.inference.cohort import write_prediction
from medseg.inference.model_folder import LoadedModel, load_model
from medseg.inference.tiled import predict_logits, tile_layout
from medseg.io import read_volume
from medseg.preprocess.plan import ChannelPlan
from medseg.volume import Box, Grid, Volume
from tests.inference.helpers import (
    boundary_band,
    make_plan,
    model_folder,
    random_unet,
    threshold_loaded,
)


def test_large_outputs_are_memory_mapped() -> None:
    with _output_arrays((10, 10, 10), 3, True, budget=1000) as (cls, probs):
        assert isinstance(cls, np.memmap) and isinstance(probs, np.memmap)
        assert cls.dtype == np.int8 and probs.shape == (3, 10, 10, 10)
    with _output_arrays((10, 10, 10), 3, False, budget=1 << 30) as (cls, probs):
        assert not isinstance(cls, np.memmap) and probs is None


REAL = [
    ("nrrd/brain1/image.nrrd", 300.0),  # LPS file, negative second direction; LAS in RAS+
    ("brats2013/brats_2013_pat0001_1/Flair_subtrMeanDivStd.nii.gz", 0.5),  # LPS
    ("ct_examples/totalseg_example_ct_3mm/ct.nii.gz", 0.0),  # RAS
]


@pytest.mark.parametrize("rel,t", REAL)
@pytest.mark.parametrize("orientation", [None, ("R", "A", "S")])
def test_threshold_model_reproduces_thresholded_real_scan_exactly(
    data_root: Path, rel: str, t: float, orientation: tuple[str, str, str] | None
) -> None:
    scan = read_volume(data_root / rel)
    plan = make_plan(label_values=(0, 255), orientation=orientation)
    out = infer_case([scan], threshold_loaded(plan, t), tile_size=60)
    assert out.grid.shape == scan.grid.shape
    assert np.abs(out.grid.affine - scan.grid.affine).max() <= 1e-4
    ref = np.where(scan.array[0] > t, 255, 0)
    assert np.array_equal(out.array[0], ref)
    assert 0 < np.count_nonzero(ref) < ref.size  # the threshold splits the scan


def test_threshold_model_on_oblique_scan_reoriented_is_exact(image_volume: Volume) -> None:
    assert image_volume.grid.is_oblique
    plan = make_plan(orientation=("R", "A", "S"))
    out = infer_case([image_volume], threshold_loaded(plan, 100.0), tile_size=8)
    assert out.grid == image_volume.grid
    assert np.array_equal(out.array[0], (image_volume.array[0] > 100).astype(np.uint8))


def smooth_blob(grid: Grid) -> Volume:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1)
    xyz = grid.world(ijk)
    centre = grid.world((np.asarray(grid.shape) - 1) / 2)
    r = np.linalg.norm((xyz - centre) / np.array([6.0, 5.0, 9.0]), axis=-1)
    return Volume((100.0 * np.exp(-(r**2)))[None].astype(np.float32), grid)


@pytest.mark.parametrize("spacing", [(0.5, 0.6, 1.7), (1.3, 1.1, 4.0)])
def test_resampling_plan_is_within_one_voxel_on_the_boundary(
    oblique_grid: Grid, spacing: tuple[float, float, float]
) -> None:
    scan = smooth_blob(oblique_grid)
    plan = make_plan(orientation=("R", "A", "S"), target_spacing=spacing, crop=True)
    out = infer_case([scan], threshold_loaded(plan, 40.0), tile_size=12)
    assert out.grid == scan.grid
    ref = scan.array[0] > 40
    wrong = out.array[0].astype(bool) != ref
    assert not np.any(wrong & ~boundary_band(ref))
    assert wrong.sum() < 0.2 * boundary_band(ref).sum()


@pytest.mark.parametrize("spacing", [(2.0, 2.5, 4.0), (1.5, 1.5, 1.5)])
def test_resampling_real_ct_is_within_one_voxel_on_the_boundary(
    data_root: Path, spacing: tuple[float, float, float]
) -> None:
    """Threshold at the air/body midpoint (-500 HU): a threshold near a plateau (e.g. 0 HU
    beside -100 HU fat at the skin) is crossed by cubic-interpolation overshoot a few voxels
    from the boundary, which is the image interpolation, not the geometry under test."""
    scan = read_volume(data_root / "ct_examples/totalseg_example_ct_3mm/ct.nii.gz")
    plan = make_plan(orientation=("R", "A", "S"), target_spacing=spacing, crop=True)
    out = infer_case([scan], threshold_loaded(plan, -500.0), tile_size=44)
    assert out.grid == scan.grid
    ref = scan.array[0] > -500
    wrong = out.array[0].astype(bool) != ref
    assert not np.any(wrong & ~boundary_band(ref))


def test_2d_model_on_png_keeps_label_values_and_grid(data_root: Path, tmp_path: Path) -> None:
    scan = read_volume(data_root / "isbi2012/images/slice_00.png")
    plan = make_plan(dims=2, label_values=(0, 255), depth=3)
    pred = predict_case([scan], threshold_loaded(plan, 127.0), tile_size=60)
    ref = np.where(scan.array[0] > 127, 255, 0)
    assert np.array_equal(pred.labels.array[0], ref)
    write_prediction(pred, tmp_path / "pred.png")
    back = read_volume(tmp_path / "pred.png")
    assert back.grid.allclose(scan.grid, 1e-4) and np.array_equal(back.array[0], ref)


def test_multichannel_rgb_tiff_uses_all_channels(data_root: Path) -> None:
    scan = read_volume(data_root / "drive/training/images/21_training.tif")
    plan = make_plan(dims=2, channels=3, depth=2)
    out = infer_case([scan], threshold_loaded(plan, 60.0), tile_size=100)
    assert np.array_equal(out.array[0], (scan.array[0] > 60).astype(np.uint8))
    with pytest.raises(ModelError, match="3 channel"):
        infer_case([scan], threshold_loaded(make_plan(dims=2, channels=1), 60.0))


def test_probabilities_on_request_sum_to_one_and_match_labels(image_volume: Volume) -> None:
    plan = make_plan(orientation=("R", "A", "S"))
    loaded = threshold_loaded(plan, 100.0)
    plain = predict_case([image_volume], loaded, tile_size=8)
    assert plain.probabilities is None
    pred = predict_case([image_volume], loaded, tile_size=8, save_probabilities=True)
    p = pred.probabilities
    assert p is not None and p.grid == image_volume.grid and p.array.shape[0] == 2
    np.testing.assert_allclose(p.array.sum(0), 1.0, atol=1e-5)
    x = image_volume.array[0].astype(np.float64)
    np.testing.assert_allclose(p.array[1], 1 / (1 + np.exp(-2 * (x - 100))), atol=1e-5)
    assert np.array_equal(pred.labels.array, plain.labels.array)


def test_memory_mapped_outputs_give_same_labels(image_volume: Volume) -> None:
    loaded = threshold_loaded(make_plan(orientation=("R", "A", "S")), 100.0)
    a = infer_case([image_volume], loaded, tile_size=8, max_memory=100)
    b = infer_case([image_volume], loaded, tile_size=8)
    assert np.array_equal(a.array, b.array)


def test_postprocessing_json_is_applied(image_volume: Volume) -> None:
    from medseg.postprocess import FORMAT

    post = {
        "format": FORMAT,
        "version": 1,
        "steps": [{"op": "largest_component_foreground", "connectivity": "full"}],
    }
    plan = make_plan()
    out = infer_case([image_volume], threshold_loaded(plan, 110.0, post), tile_size=8)
    mask = image_volume.array[0] > 110
    lab, n = ndimage.label(mask, np.ones((3, 3, 3)))
    assert n > 1
    largest = lab == 1 + int(np.argmax(ndimage.sum(mask, lab, range(1, n + 1))))
    assert np.array_equal(out.array[0].astype(bool), largest)


def test_probability_threshold_step_is_applied_on_the_scan_grid(image_volume: Volume) -> None:
    """The threshold model's class-1 probability is sigmoid(2 (x - 100)) (see the test above),
    so a 0.9 cut must give x > 100 + ln(9) / 2 exactly, away from ties."""
    from medseg.postprocess import FORMAT

    post = {
        "format": FORMAT,
        "version": 2,
        "steps": [{"op": "threshold", "classes": [1], "value": 0.9}],
    }
    plan = make_plan(orientation=("R", "A", "S"))
    out = infer_case([image_volume], threshold_loaded(plan, 100.0, post), tile_size=8)
    x = image_volume.array[0].astype(np.float64)
    cut = 100.0 + np.log(9.0) / 2.0
    clear = np.abs(x - cut) > 1e-3
    assert clear.mean() > 0.99 and (x > cut).any() and (x < cut).any()
    assert np.array_equal(out.array[0].astype(bool)[clear], (x > cut)[clear])


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("slope", [1.0, -1.0])
def test_finer_plan_restores_labels_without_a_shift(dims: int, slope: float) -> None:
    """A ramp along the first axis (value = voxel index, or its mirror) through a plan twice as
    fine, cut at 0.1 past a voxel centre (both signs via the mirrored ramp). Each scan voxel
    sits between two plan voxels, 0.25 voxel to either side, one on each side of the cut:
    nearest neighbour would keep one of them, always the same way, and get the voxel next to
    the cut wrong on one of the two ramps. Labels must equal the cut of the scan itself."""
    shape = (24, 9, 7 if dims == 3 else 1)
    i = np.arange(shape[0], dtype=np.float32)
    ramp = (i if slope > 0 else shape[0] - 1 - i)[:, None, None] * np.ones(shape, np.float32)
    scan = Volume(ramp[None], Grid(shape, np.diag([1.0, 1.0, 1.0, 1.0])))
    target = (0.5, 1.0, 1.0)
    plan = make_plan(dims=dims, target_spacing=target)
    pred = predict_case([scan], threshold_loaded(plan, 11.1), tile_size=16)
    ref = scan.array[0] > 11.1
    assert 0 < ref.sum() < ref.size
    assert pred.labels.grid == scan.grid
    assert np.array_equal(pred.labels.array[0].astype(bool), ref)


@pytest.mark.parametrize(
    ("dims", "spacing"), [(3, (0.6, 1.3, 0.8)), (3, (1.7, 1.4, 2.2)), (2, (0.7, 1.6, 1.0))]
)
def test_boundary_probabilities_restore_the_labels_of_all_probabilities(
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
    dims: int,
    spacing: tuple[float, float, float],
) -> None:
    """A resampled case keeps softmax values only near class boundaries, tile by tile; its
    labels must equal the argmax of all probabilities restored linearly (the
    ``--save-probabilities`` path, whole channels through the separable resampler)."""
    shape = (31, 27, 19 if dims == 3 else 3)
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), (2.0, 2.0, 2.0 if dims == 3 else 0))
    scan = Volume(
        (smooth * 50)[None].astype(np.float32), Grid(shape, np.diag([1.0, 1.0, 1.0, 1.0]))
    )
    plan = make_plan(dims=dims, label_values=(0, 1, 2), target_spacing=spacing, base=4)
    net = random_unet(dims, 1, 3, depth=2, base=4, seed=7)
    loaded = LoadedModel(net, plan)
    added: list[int] = []
    real_add = _BoundaryProbabilities.add

    def counted(self: Any, labels: np.ndarray, *args: Any) -> None:
        added.append(labels.size)
        real_add(self, labels, *args)

    monkeypatch.setattr(_BoundaryProbabilities, "add", counted)
    got = predict_case([scan], loaded, tile_size=12)
    assert added  # the boundary store ran, tile by tile
    full = predict_case([scan], loaded, tile_size=12, save_probabilities=True)
    assert full.probabilities is not None
    probs = full.probabilities.array
    top = np.sort(probs, axis=0)
    clear = top[-1] - top[-2] > 1e-5
    assert clear.mean() > 0.99 and len(np.unique(full.labels.array)) == 3
    assert np.array_equal(got.labels.array[0][clear], full.labels.array[0][clear])


@pytest.mark.parametrize("n_classes", [2, PROBABILITY_RESTORE_MAX_CLASSES + 1])
def test_many_class_models_restore_by_nearest_neighbour(
    n_classes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probabilities of every class on the plan grid are what a whole-body atlas cannot
    afford: above the cap the labels come back by nearest neighbour, below it from them."""
    calls: list[int] = []
    real = case_module.restore_classes

    def counted(*args: Any, **kw: Any) -> np.ndarray:
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(case_module, "restore_classes", counted)
    shape = (20, 9, 7)
    i = np.arange(shape[0], dtype=np.float32)[:, None, None] * np.ones(shape, np.float32)
    scan = Volume(i[None], Grid(shape, np.diag([1.0, 1.0, 1.0, 1.0])))
    plan = make_plan(label_values=tuple(range(n_classes)), target_spacing=(0.5, 1.0, 1.0))
    pred = predict_case([scan], threshold_loaded(plan, 9.6), tile_size=16)
    # Threshold only ever raises class 1 over class 0, so the labels are the cut either way
    assert np.array_equal(pred.labels.array[0].astype(bool), scan.array[0] > 9.6)
    assert len(calls) == (1 if n_classes <= PROBABILITY_RESTORE_MAX_CLASSES else 0)


def test_int16_ct_case_gives_the_labels_of_the_float32_whole_volume_preprocessing(
    tmp_path: Path,
) -> None:
    """The lazy input (int16 scan normalised per tile) against the eager chain: the float32
    ``preprocess_case`` image through the same network and tiles, argmax, ``restore_labels``."""
    from dataclasses import replace

    from medseg.preprocess.pipeline import preprocess_case
    from medseg.preprocess.restore import restore_labels

    rng = np.random.default_rng(7)
    shape = (37, 29, 23)
    direction = np.diag([-1.0, -1.0, 1.0])  # LPS, as DICOM converters write CT
    grid = Grid.from_spacing(shape, (0.8, 0.7, 2.0), (30.0, 20.0, -50.0), direction)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    r = np.linalg.norm((ijk - (np.asarray(shape) - 1) / 2) / (np.asarray(shape) * 0.4), axis=-1)
    hu = np.where(r < 1.0, 40 + 200 * rng.normal(size=shape), -1024).astype(np.int16)
    scan = Volume(hu[None], grid, meta={"source": "ct.nii.gz"})
    plan = replace(
        make_plan(label_values=(0, 1, 5), orientation=("R", "A", "S"), crop=True),
        channels=[ChannelPlan("CT", "CT", "ct", (-900.0, 400.0), 20.0, 150.0)],
        target_spacing=(0.8, 0.7, 2.0),
    )
    folder, _ = model_folder(tmp_path, plan, seed=5)
    loaded = load_model(folder)
    got = predict_case([scan], loaded, tile_size=8)
    assert got.info["tiles"] > 1

    ref = preprocess_case([scan], plan)
    assert ref.record.crop_box != Box.from_shape(shape)
    logits = predict_logits(loaded.model, ref.image.array, tile_size=8, prepare=True)
    classes = restore_labels(logits.argmax(0), ref.record)
    want = np.asarray(plan.label_values)[classes]
    assert 0 < np.count_nonzero(want) < want.size  # labels vary: the comparison can fail
    assert got.labels.grid == scan.grid
    assert np.array_equal(got.labels.array[0], want)


def _count_give_backs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The modes :mod:`medseg.heap` gives the heap back to, in order, from now on; skips
    where glibc's ``mallopt`` is absent."""
    from medseg import heap

    if not heap.return_freed_memory():
        pytest.skip("no glibc mallopt on this platform")
    calls: list[str] = []
    give_back = heap._give_back

    def counted(*args: Any) -> bool:
        calls.append(args[-1])
        return give_back(*args)

    monkeypatch.setattr(heap, "_give_back", counted)
    return calls


def test_2d_stack_keeps_one_heap_across_its_slices(
    image_volume: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the command line's tile scope, a 2D model over a stack runs every slice in one
    kept heap: the heap is given back once after its last slice, not after every slice."""
    from medseg import heap
    from medseg.inference.cohort import kept_heap_for

    loaded = threshold_loaded(make_plan(dims=2), 100.0)
    shape = image_volume.array.shape
    layout = tile_layout(loaded.model, shape[1:3], tile_size=8, keep_heap=True)
    assert layout.keep_heap and shape[3] > 2
    calls = _count_give_backs(monkeypatch)
    pred = predict_case(
        [image_volume], loaded, tile_size=8, keep_heap=True, tile_scope=kept_heap_for
    )
    assert np.array_equal(pred.labels.array[0], (image_volume.array[0] > 100).astype(np.uint8))
    assert calls == ["return"] and heap.mode() == "return"


def test_predict_case_leaves_the_process_heap_alone(
    image_volume: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library never sets the allocator: without a tile scope a case planned for a kept
    heap runs in whatever mode the process is in and gives nothing back."""
    from medseg import heap

    calls = _count_give_backs(monkeypatch)
    seen: set[str] = set()
    run = case_module.run_tiles

    def watched(*args: Any, **kw: Any) -> int:
        seen.add(heap.mode())
        return run(*args, **kw)

    monkeypatch.setattr(case_module, "run_tiles", watched)
    loaded = threshold_loaded(make_plan(dims=2), 100.0)
    predict_case([image_volume], loaded, tile_size=8, keep_heap=True)
    assert seen == {"return"} and calls == [] and heap.mode() == "return"
