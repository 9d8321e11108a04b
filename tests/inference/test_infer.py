"""Overlap-tile inference: exactness against the whole-volume forward pass, mirroring,
memory-driven tiling, model folders, whole cases on real and synthetic scans, the CLI."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from medseg import infer, runtime
from medseg.model import UNet, shapes


class CentreCrop(nn.Module):
    """Fake valid network: output = input cropped by the margin (what a U-Net of this depth
    would see at the centre). Any misplaced or missing tile changes the result."""

    def __init__(self, dims: int, channels: int, depth: int, convs: int = 2) -> None:
        super().__init__()
        self.margin = shapes.margin(depth, convs)
        self.network = {
            "spatial_dims": dims,
            "in_channels": channels,
            "out_channels": channels,
            "depth": depth,
            "convs_per_level": convs,
            "base_channels": 1,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.margin
        return x[(slice(None), slice(None), *[slice(m, s - m) for s in x.shape[2:]])]


def random_unet(
    dims: int, cin: int, cout: int, depth: int, base: int, seed: int = 0, **kw: Any
) -> UNet:
    """A randomly initialised U-Net in eval mode with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    net = UNet(dims, cin, cout, depth=depth, base_channels=base, **kw)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def whole_volume_logits(
    net: nn.Module, image: np.ndarray, flips: list[tuple[int, ...]]
) -> np.ndarray:
    """Independent reference: mirror-pad the whole image once (numpy) to the smallest valid
    size and run the network once per mirroring, averaging."""
    depth, convs = net.network["depth"], net.network["convs_per_level"]
    m = shapes.margin(depth, convs)
    spatial = image.shape[1:]
    full = [shapes.valid_output_size(n, depth, convs) for n in spatial]
    pad = [(0, 0)] + [(m, m + f - n) for n, f in zip(spatial, full, strict=True)]
    x = torch.from_numpy(np.pad(image, pad, mode="reflect"))[None]
    acc = torch.zeros(1, net.network["out_channels"], *full)
    with torch.no_grad():
        for axes in flips:
            d = [2 + a for a in axes]
            y = net(torch.flip(x, d)) if d else net(x)
            acc += torch.flip(y, d) if d else y
    out = (acc / len(flips))[0].numpy()
    return out[(slice(None), *[slice(0, n) for n in spatial])]


def test_tiled_equals_whole_volume_3d(rng: np.random.Generator) -> None:
    net = random_unet(3, 1, 2, depth=2, base=4)
    image = rng.normal(size=(1, 67, 91, 53)).astype(np.float32)
    ref = whole_volume_logits(net, image, [()])
    for tile in (12, 28, (20, 44, 36)):
        got = infer.predict_logits(net, image, tile_size=tile)
        layout = infer.tile_layout(net, image.shape[1:], tile_size=tile)
        assert len(layout.tiles) > 1
        assert np.abs(got - ref).max() <= 1e-4, tile


@pytest.mark.parametrize("upsampling", ["transpose", "interpolate"])
def test_tiled_equals_whole_volume_3d_depth3(rng: np.random.Generator, upsampling: str) -> None:
    net = random_unet(3, 2, 3, depth=3, base=2, upsampling=upsampling, seed=1)
    image = rng.normal(size=(2, 29, 23, 17)).astype(np.float32)
    ref = whole_volume_logits(net, image, [()])
    for tile in (12, 20):
        got = infer.predict_logits(net, image, tile_size=tile, batch_size=3)
        assert np.abs(got - ref).max() <= 1e-4, tile


@pytest.mark.parametrize("depth", [1, 3, 4])
def test_tiled_equals_whole_volume_2d(rng: np.random.Generator, depth: int) -> None:
    net = random_unet(2, 3, 4, depth=depth, base=4, seed=depth)
    image = rng.normal(size=(3, 101, 77)).astype(np.float32)
    ref = whole_volume_logits(net, image, [()])
    q = shapes.lattice(depth)
    for tile in (q + 4, 2 * q + 7, 60):
        got = infer.predict_logits(net, image, tile_size=tile, batch_size=2)
        assert np.abs(got - ref).max() <= 1e-4, tile


@pytest.mark.skipif(
    not infer.native_bf16(torch.device("cpu")), reason="this CPU has no native bf16"
)
@pytest.mark.parametrize("dims", [2, 3])
def test_bf16_precision_stays_close_to_float32_logits(rng: np.random.Generator, dims: int) -> None:
    net = random_unet(dims, 2, 3, depth=2, base=8, seed=5)
    image = rng.normal(size=(2, *[40] * dims)).astype(np.float32)
    ref = whole_volume_logits(net, image, [()])
    fp32 = infer.predict_logits(net, image, tile_size=20, prepare=True, precision="float32")
    bf16 = infer.predict_logits(net, image, tile_size=20, prepare=True, precision="bf16")
    scale = np.abs(ref).max()
    assert np.abs(fp32 - ref).max() <= 1e-4 * scale
    err = np.abs(bf16 - ref).max()
    assert 1e-4 * scale < err <= 0.05 * scale  # bf16 really ran, and stayed within its eps
    top = np.sort(ref, axis=0)
    clear = top[-1] - top[-2] > 0.1 * scale
    assert clear.mean() > 0.5
    assert np.array_equal(bf16.argmax(0)[clear], ref.argmax(0)[clear])


def test_unknown_precision_and_missing_bf16_are_refused(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = random_unet(2, 1, 2, depth=1, base=2)
    image = rng.normal(size=(1, 20, 20)).astype(np.float32)
    with pytest.raises(infer.ModelError, match="--precision 'fp8'"):
        infer.predict_logits(net, image, precision="fp8")
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    with pytest.raises(infer.ModelError, match="no native bf16.*--precision float32"):
        infer.predict_logits(net, image, precision="bf16")


def test_tiled_with_flip_tta_equals_whole_with_flip_tta(rng: np.random.Generator) -> None:
    net = random_unet(3, 1, 2, depth=2, base=2, seed=3)
    image = rng.normal(size=(1, 31, 26, 19)).astype(np.float32)
    flips = [s for r in range(4) for s in itertools.combinations(range(3), r)]
    ref = whole_volume_logits(net, image, flips)
    plain = whole_volume_logits(net, image, [()])
    assert np.abs(ref - plain).max() > 1e-2  # mirroring really changes a random network
    for tile in (8, 16):
        got = infer.predict_logits(net, image, tile_size=tile, tta="flip")
        assert np.abs(got - ref).max() <= 1e-4
    net2 = random_unet(2, 1, 2, depth=3, base=2, seed=4)
    img2 = rng.normal(size=(1, 45, 38)).astype(np.float32)
    ref2 = whole_volume_logits(net2, img2, [(), (1,)])
    got2 = infer.predict_logits(net2, img2, tile_size=12, tta=[1])
    assert np.abs(got2 - ref2).max() <= 1e-4


@pytest.mark.parametrize("dims,depth", [(2, 1), (2, 4), (3, 2), (3, 3)])
def test_centre_crop_model_reproduces_input_bit_for_bit(
    rng: np.random.Generator, dims: int, depth: int
) -> None:
    shape = (2, 67, 91, 53)[: dims + 1] if dims == 3 else (2, 67, 91)
    image = rng.normal(size=shape).astype(np.float32)
    model = CentreCrop(dims, 2, depth)
    q = shapes.lattice(depth)
    for tile in (q + 4, 3 * q + 4, 1000):
        assert np.array_equal(infer.predict_logits(model, image, tile_size=tile), image)


def test_flip_tta_of_mirror_symmetric_model_is_identity(rng: np.random.Generator) -> None:
    # integer values: the average of 8 equal numbers is then exact in float32
    image = rng.integers(-50, 50, size=(1, 23, 30, 17)).astype(np.float32)
    model = CentreCrop(3, 1, 2)
    assert np.array_equal(infer.predict_logits(model, image, tile_size=8, tta="flip"), image)


def test_memory_budget_drives_tile_count_not_result(rng: np.random.Generator) -> None:
    net = random_unet(3, 1, 2, depth=2, base=2, seed=5)
    image = rng.normal(size=(1, 40, 37, 30)).astype(np.float32)
    small = infer.tile_layout(net, image.shape[1:], max_memory=2 << 20)
    large = infer.tile_layout(net, image.shape[1:], max_memory=1 << 34)
    assert len(small.tiles) > 1 and len(large.tiles) == 1
    a = infer.predict_logits(net, image, max_memory=2 << 20)
    b = infer.predict_logits(net, image, max_memory=1 << 34)
    assert np.abs(a - b).max() <= 1e-4


def test_progress_counts_every_tile_once(rng: np.random.Generator) -> None:
    image = rng.normal(size=(1, 40, 30)).astype(np.float32)
    model = CentreCrop(2, 1, 2)
    calls: list[tuple[int, int]] = []
    infer.predict_logits(
        model, image, tile_size=8, batch_size=3, progress=lambda d, t: calls.append((d, t))
    )
    n = len(infer.tile_layout(model, (40, 30), tile_size=8).tiles)
    assert calls[-1] == (n, n) and all(t == n for _, t in calls)


def test_wrong_channel_count_is_one_line_error(rng: np.random.Generator) -> None:
    net = random_unet(2, 2, 2, depth=1, base=2)
    with pytest.raises(infer.ModelError, match="channels"):
        infer.predict_logits(net, rng.normal(size=(3, 20, 20)).astype(np.float32))


def test_large_outputs_are_memory_mapped() -> None:
    with infer._output_arrays((10, 10, 10), 3, True, budget=1000) as (cls, probs):
        assert isinstance(cls, np.memmap) and isinstance(probs, np.memmap)
        assert cls.dtype == np.int8 and probs.shape == (3, 10, 10, 10)
    with infer._output_arrays((10, 10, 10), 3, False, budget=1 << 30) as (cls, probs):
        assert not isinstance(cls, np.memmap) and probs is None


def test_parse_bytes_units() -> None:
    assert infer.parse_bytes("4G") == 4 << 30
    assert infer.parse_bytes("512M") == 512 << 20
    assert infer.parse_bytes("1.5g") == int(1.5 * (1 << 30))
    assert infer.parse_bytes("2000") == 2000
    with pytest.raises(infer.ModelError):
        infer.parse_bytes("lots")


# ---------------------------------------------------------------------------------------------
# whole cases: geometry, label values, model folders, CLI
# ---------------------------------------------------------------------------------------------
from pathlib import Path  # noqa: E402

from scipy import ndimage  # noqa: E402

from medseg.io import read_volume, write_volume  # noqa: E402
from medseg.preprocess.plan import ChannelPlan, Plan  # noqa: E402
from medseg.volume import Box, Grid, Volume  # noqa: E402


class Threshold(nn.Module):
    """Fake valid network: logits ``[t - x, x - t]`` of the centre-cropped first channel, so
    its labels are "intensity above t" at exactly the voxel it is asked about."""

    def __init__(self, dims: int, channels: int, t: float, depth: int = 2) -> None:
        super().__init__()
        self.t = t
        self.margin = shapes.margin(depth, 2)
        self.network = {
            "spatial_dims": dims,
            "in_channels": channels,
            "out_channels": 2,
            "depth": depth,
            "convs_per_level": 2,
            "base_channels": 1,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.margin
        c = x[(slice(None), slice(0, 1), *[slice(m, s - m) for s in x.shape[2:]])]
        return torch.cat([self.t - c, c - self.t], dim=1)


def make_plan(
    *,
    dims: int = 3,
    channels: int = 1,
    label_values: tuple[int, ...] = (0, 1),
    orientation: tuple[str, str, str] | None = None,
    target_spacing: tuple[float, float, float] | None = None,
    crop: bool = False,
    depth: int = 2,
    base: int = 2,
) -> Plan:
    network = {
        "spatial_dims": dims,
        "in_channels": channels,
        "out_channels": len(label_values),
        "depth": depth,
        "base_channels": base,
        "channel_multiplier": 2,
        "convs_per_level": 2,
        "upsampling": "transpose",
        "norm": "batch",
        "dropout": 0.0,
    }
    return Plan(
        spatial_dims=dims,
        channels=[ChannelPlan(f"ch{i}", "other", "none") for i in range(channels)],
        label_values=list(label_values),
        class_names=[str(v) for v in label_values],
        network=network,
        patch_output_size=(shapes.min_output_size(depth),) * dims,
        tile_output_size=(shapes.min_output_size(depth),) * dims,
        margin=(shapes.margin(depth),) * dims,
        orientation=orientation,
        target_spacing=target_spacing,
        crop_to_nonzero=crop,
    )


def threshold_loaded(plan: Plan, t: float, post: dict | None = None) -> infer.LoadedModel:
    return infer.LoadedModel(Threshold(plan.spatial_dims, plan.in_channels, t), plan, post)


def boundary_band(mask: np.ndarray) -> np.ndarray:
    """Voxels within one voxel (26-neighbourhood) of the mask's boundary."""
    st = np.ones((3,) * mask.ndim, bool)
    return ndimage.binary_dilation(mask, st) & ~ndimage.binary_erosion(mask, st)


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
    out = infer.infer_case([scan], threshold_loaded(plan, t), tile_size=60)
    assert out.grid.shape == scan.grid.shape
    assert np.abs(out.grid.affine - scan.grid.affine).max() <= 1e-4
    ref = np.where(scan.array[0] > t, 255, 0)
    assert np.array_equal(out.array[0], ref)
    assert 0 < np.count_nonzero(ref) < ref.size  # the threshold splits the scan


def test_threshold_model_on_oblique_scan_reoriented_is_exact(image_volume: Volume) -> None:
    assert image_volume.grid.is_oblique
    plan = make_plan(orientation=("R", "A", "S"))
    out = infer.infer_case([image_volume], threshold_loaded(plan, 100.0), tile_size=8)
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
    out = infer.infer_case([scan], threshold_loaded(plan, 40.0), tile_size=12)
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
    out = infer.infer_case([scan], threshold_loaded(plan, -500.0), tile_size=44)
    assert out.grid == scan.grid
    ref = scan.array[0] > -500
    wrong = out.array[0].astype(bool) != ref
    assert not np.any(wrong & ~boundary_band(ref))


def test_2d_model_on_png_keeps_label_values_and_grid(data_root: Path, tmp_path: Path) -> None:
    scan = read_volume(data_root / "isbi2012/images/slice_00.png")
    plan = make_plan(dims=2, label_values=(0, 255), depth=3)
    pred = infer.predict_case([scan], threshold_loaded(plan, 127.0), tile_size=60)
    ref = np.where(scan.array[0] > 127, 255, 0)
    assert np.array_equal(pred.labels.array[0], ref)
    infer.write_prediction(pred, tmp_path / "pred.png")
    back = read_volume(tmp_path / "pred.png")
    assert back.grid.allclose(scan.grid, 1e-4) and np.array_equal(back.array[0], ref)


def test_multichannel_rgb_tiff_uses_all_channels(data_root: Path) -> None:
    scan = read_volume(data_root / "drive/training/images/21_training.tif")
    plan = make_plan(dims=2, channels=3, depth=2)
    out = infer.infer_case([scan], threshold_loaded(plan, 60.0), tile_size=100)
    assert np.array_equal(out.array[0], (scan.array[0] > 60).astype(np.uint8))
    with pytest.raises(infer.ModelError, match="3 channel"):
        infer.infer_case([scan], threshold_loaded(make_plan(dims=2, channels=1), 60.0))


def test_probabilities_on_request_sum_to_one_and_match_labels(image_volume: Volume) -> None:
    plan = make_plan(orientation=("R", "A", "S"))
    loaded = threshold_loaded(plan, 100.0)
    plain = infer.predict_case([image_volume], loaded, tile_size=8)
    assert plain.probabilities is None
    pred = infer.predict_case([image_volume], loaded, tile_size=8, save_probabilities=True)
    p = pred.probabilities
    assert p is not None and p.grid == image_volume.grid and p.array.shape[0] == 2
    np.testing.assert_allclose(p.array.sum(0), 1.0, atol=1e-5)
    x = image_volume.array[0].astype(np.float64)
    np.testing.assert_allclose(p.array[1], 1 / (1 + np.exp(-2 * (x - 100))), atol=1e-5)
    assert np.array_equal(pred.labels.array, plain.labels.array)


def test_memory_mapped_outputs_give_same_labels(image_volume: Volume) -> None:
    loaded = threshold_loaded(make_plan(orientation=("R", "A", "S")), 100.0)
    a = infer.infer_case([image_volume], loaded, tile_size=8, max_memory=100)
    b = infer.infer_case([image_volume], loaded, tile_size=8)
    assert np.array_equal(a.array, b.array)


def test_postprocessing_json_is_applied(image_volume: Volume) -> None:
    from medseg.postprocess import FORMAT

    post = {
        "format": FORMAT,
        "version": 1,
        "steps": [{"op": "largest_component_foreground", "connectivity": "full"}],
    }
    plan = make_plan()
    out = infer.infer_case([image_volume], threshold_loaded(plan, 110.0, post), tile_size=8)
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
    out = infer.infer_case([image_volume], threshold_loaded(plan, 100.0, post), tile_size=8)
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
    pred = infer.predict_case([scan], threshold_loaded(plan, 11.1), tile_size=16)
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
    loaded = infer.LoadedModel(net, plan)
    added: list[int] = []
    real_add = infer._BoundaryProbabilities.add

    def counted(self: Any, labels: np.ndarray, *args: Any) -> None:
        added.append(labels.size)
        real_add(self, labels, *args)

    monkeypatch.setattr(infer._BoundaryProbabilities, "add", counted)
    got = infer.predict_case([scan], loaded, tile_size=12)
    assert added  # the boundary store ran, tile by tile
    full = infer.predict_case([scan], loaded, tile_size=12, save_probabilities=True)
    assert full.probabilities is not None
    probs = full.probabilities.array
    top = np.sort(probs, axis=0)
    clear = top[-1] - top[-2] > 1e-5
    assert clear.mean() > 0.99 and len(np.unique(full.labels.array)) == 3
    assert np.array_equal(got.labels.array[0][clear], full.labels.array[0][clear])


@pytest.mark.parametrize("n_classes", [2, infer.PROBABILITY_RESTORE_MAX_CLASSES + 1])
def test_many_class_models_restore_by_nearest_neighbour(
    n_classes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probabilities of every class on the plan grid are what a whole-body atlas cannot
    afford: above the cap the labels come back by nearest neighbour, below it from them."""
    from medseg.preprocess import restore

    calls: list[int] = []
    real = restore.restore_classes

    def counted(*args: Any, **kw: Any) -> np.ndarray:
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(restore, "restore_classes", counted)
    shape = (20, 9, 7)
    i = np.arange(shape[0], dtype=np.float32)[:, None, None] * np.ones(shape, np.float32)
    scan = Volume(i[None], Grid(shape, np.diag([1.0, 1.0, 1.0, 1.0])))
    plan = make_plan(label_values=tuple(range(n_classes)), target_spacing=(0.5, 1.0, 1.0))
    pred = infer.predict_case([scan], threshold_loaded(plan, 9.6), tile_size=16)
    # Threshold only ever raises class 1 over class 0, so the labels are the cut either way
    assert np.array_equal(pred.labels.array[0].astype(bool), scan.array[0] > 9.6)
    assert len(calls) == (1 if n_classes <= infer.PROBABILITY_RESTORE_MAX_CLASSES else 0)


# -- model folders ----------------------------------------------------------------------------
def model_folder(tmp_path: Path, plan: Plan, seed: int = 0) -> tuple[Path, UNet]:
    folder = tmp_path / "run"
    folder.mkdir()
    plan.save(folder / "plan.json")
    net = random_unet(
        plan.spatial_dims,
        cin=plan.in_channels,
        cout=plan.num_classes,
        depth=plan.network["depth"],
        base=plan.network["base_channels"],
        seed=seed,
    )
    torch.save(net.state_dict(), folder / "model.pt")
    return folder, net


def test_load_model_restores_weights_and_plan(tmp_path: Path, rng: np.random.Generator) -> None:
    plan = make_plan(depth=1, base=2, label_values=(0, 3, 7))
    folder, net = model_folder(tmp_path, plan)
    loaded = infer.load_model(folder)
    assert loaded.plan.label_values == [0, 3, 7] and loaded.postprocessing is None
    assert not loaded.model.training
    x = torch.from_numpy(rng.normal(size=(1, 1, 20, 20, 20)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), net(x))


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("EXECUTED-PICKLED-CODE",))


def test_load_model_refuses_pickled_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, net = model_folder(tmp_path, make_plan(depth=1))
    state = dict(net.state_dict())
    state["payload"] = _Evil()  # type: ignore[assignment]
    torch.save(state, folder / "model.pt")
    with pytest.raises(infer.ModelError, match="refused"):
        infer.load_model(folder)
    assert "EXECUTED" not in capsys.readouterr().out


def test_load_model_names_mismatched_weights(tmp_path: Path) -> None:
    folder, net = model_folder(tmp_path, make_plan(depth=1))
    state = net.state_dict()
    state.pop("head.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, folder / "model.pt")
    with pytest.raises(infer.ModelError, match=r"missing \['head.weight'\].*unexpected"):
        infer.load_model(folder)


def test_load_model_without_plan_is_plan_error(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(infer.PlanError, match="plan.json"):
        infer.load_model(tmp_path / "run")


# -- cohorts and the CLI ----------------------------------------------------------------------
def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from medseg.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_infer_writes_labels_on_input_grid(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = make_plan(depth=1, base=2, label_values=(0, 255), orientation=("R", "A", "S"))
    folder, _ = model_folder(tmp_path, plan)
    scan_path = data_root / "nrrd/brain1/image.nrrd"
    out = tmp_path / "pred.nrrd"
    code, _, err = run_cli(
        [
            "infer",
            "--volume",
            str(scan_path),
            "--model",
            str(folder),
            "--output",
            str(out),
            "--device",
            "cpu",
            "--tile-size",
            "64",
            "--save-probabilities",
        ],
        capsys,
    )
    assert code == 0, err
    scan, pred = read_volume(scan_path), read_volume(out)
    assert pred.grid.shape == scan.grid.shape
    assert np.abs(pred.grid.affine - scan.grid.affine).max() <= 1e-4
    assert set(np.unique(pred.array)) <= {0, 255}
    probs = read_volume(infer.probabilities_path(out))
    assert probs.array.shape == (2, *scan.grid.shape)


@pytest.mark.skipif(
    not infer.native_bf16(torch.device("cpu")), reason="this CPU has no native bf16"
)
def test_cli_infer_bf16_gives_the_float32_labels_but_for_near_ties(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = make_plan(dims=2, channels=3, depth=2, base=4, label_values=(0, 255))
    folder, _ = model_folder(tmp_path, plan)
    scan = data_root / "drive/training/images/21_training.tif"
    labels = {}
    for precision in ("float32", "bf16"):
        out = tmp_path / f"{precision}.png"
        args = ["infer", "--volume", str(scan), "--model", str(folder), "--output", str(out)]
        code, _, err = run_cli([*args, "--device", "cpu", "--precision", precision], capsys)
        assert code == 0, err
        labels[precision] = read_volume(out).array
    agree = (labels["float32"] == labels["bf16"]).mean()
    assert 0.97 < agree < 1.0, agree


def _no_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_cli_bad_inputs_one_line_exit_2_nothing_written(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scan = str(data_root / "ct_examples/totalseg_example_ct_3mm/ct.nii.gz")
    outdir = tmp_path / "out"
    outdir.mkdir()
    folder, net = model_folder(tmp_path, make_plan(depth=1, channels=2))
    no_plan = tmp_path / "noplan"
    no_plan.mkdir()
    torch.save(net.state_dict(), no_plan / "model.pt")
    evil = tmp_path / "evil"
    evil.mkdir()
    make_plan(depth=1, channels=2).save(evil / "plan.json")
    torch.save({"w": _Evil()}, evil / "model.pt")
    two_channels = ["--volume", scan, "--volume", scan]
    good = ["--model", str(folder), *two_channels]
    cases = {
        "plan.json not found": ["--model", str(no_plan), *two_channels],
        "refused": ["--model", str(evil), *two_channels],
        "channel": ["--model", str(folder), "--volume", scan],
        "--precision 'fp8'": [*good, "--precision", "fp8"],
        "does not exist": [*good, "--output", str(tmp_path / "missing" / "p.nii.gz")],
    }
    for what, args in cases.items():
        if "--output" not in args:
            args = [*args, "--output", str(outdir / "pred.nii.gz")]
        code, out, err = run_cli(["infer", "--device", "cpu", *args], capsys)
        assert code == 2, (what, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("medseg: error:") and what in lines[0]
        assert "EXECUTED" not in out
        assert _no_files(outdir) == []


def test_cli_cohort_finishes_good_cases_lists_bad_and_skips_done(
    image_volume: Volume, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = make_plan(depth=1, base=2, channels=2, orientation=("R", "A", "S"))
    folder, _ = model_folder(tmp_path, plan)
    inp = tmp_path / "in"
    inp.mkdir()
    for case in ("a", "b"):
        for ch in range(2):
            write_volume(image_volume, inp / f"{case}_{ch:04d}.nii.gz")
    (inp / "c_0000.nii.gz").write_bytes(b"not a nifti")
    (inp / "c_0001.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "out"
    out.mkdir()
    args = [
        "infer",
        "--input-dir",
        str(inp),
        "--model",
        str(folder),
        "--output",
        str(out),
        "--device",
        "cpu",
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 1
    assert "failed: c:" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]
    pred = read_volume(out / "a.nii.gz")
    assert pred.grid.allclose(image_volume.grid, 1e-4)
    (inp / "c_0000.nii.gz").unlink()
    (inp / "c_0001.nii.gz").unlink()
    before = (out / "a.nii.gz").stat().st_mtime_ns
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "0 cases written, 2 skipped" in stdout
    assert (out / "a.nii.gz").stat().st_mtime_ns == before
    code, stdout, _ = run_cli([*args, "--overwrite", "--shard", "1/2"], capsys)
    assert code == 0 and "1 cases written" in stdout


def test_discover_cases_and_shards(tmp_path: Path) -> None:
    for name in ("x_0000.nii.gz", "x_0001.nii.gz", "y_0000.nii.gz", "y_0001.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    cases = infer.discover_cases(tmp_path, 2)
    assert [(c.case_id, [p.name for p in c.images]) for c in cases] == [
        ("x", ["x_0000.nii.gz", "x_0001.nii.gz"]),
        ("y", ["y_0000.nii.gz", "y_0001.nii.gz"]),
    ]
    items = list(range(10))
    shards = [infer.select_shard(items, f"{i}/3") for i in range(3)]
    assert sorted(sum(shards, [])) == items and shards[1] == [1, 4, 7]
    with pytest.raises(infer.MedsegError):
        infer.select_shard(items, "3/3")


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
    loaded = infer.load_model(folder)
    got = infer.predict_case([scan], loaded, tile_size=8)
    assert got.info["tiles"] > 1

    ref = preprocess_case([scan], plan)
    assert ref.record.crop_box != Box.from_shape(shape)
    logits = infer.predict_logits(loaded.model, ref.image.array, tile_size=8, prepare=True)
    classes = restore_labels(logits.argmax(0), ref.record)
    want = np.asarray(plan.label_values)[classes]
    assert 0 < np.count_nonzero(want) < want.size  # labels vary: the comparison can fail
    assert got.labels.grid == scan.grid
    assert np.array_equal(got.labels.array[0], want)


def test_inference_model_runs_lean_forward_and_stays_tiling_exact(
    rng: np.random.Generator,
) -> None:
    net = random_unet(3, 1, 2, depth=2, base=4, seed=7)
    fast = infer.inference_model(net)
    assert getattr(fast, "lean", False) and not net.lean
    image = rng.normal(size=(1, 47, 60, 38)).astype(np.float32)
    ref = whole_volume_logits(net, image, [()])
    got = infer.predict_logits(net, image, tile_size=20, prepare=True)
    assert np.abs(got - ref).max() <= 1e-4
    budget = 8 << 20
    plain = infer.tile_layout(net, (300, 300, 300), max_memory=budget)
    lean = infer.tile_layout(fast, (300, 300, 300), max_memory=budget)
    assert lean.lean and not plain.lean
    assert math.prod(lean.size) > math.prod(plain.size)


def test_tile_layout_names_the_forward_and_run_tiles_runs_it(rng: np.random.Generator) -> None:
    """The lean forward only where it buys fewer tiles; the layout says so and leaves the
    model as it was, and ``run_tiles`` runs the forward the layout names (the plain forward
    pools once per level and pass, the lean one once per slab)."""
    net = random_unet(3, 1, 2, depth=2, base=4, seed=7)
    fast = infer.inference_model(net)
    small = infer.tile_layout(fast, (20, 24, 20), max_memory=1 << 30)
    large = infer.tile_layout(fast, (300, 300, 300), max_memory=8 << 20)
    assert not small.lean and large.lean
    assert fast.lean  # tile_layout decides per layout; the copy keeps its capability
    pools: list[int] = []
    hook = fast.pool.register_forward_hook(lambda _m, _a, _y: pools.append(1))
    image = rng.normal(size=(1, 20, 24, 20)).astype(np.float32)
    for lean, calls in ((False, lambda n: n == 2), (True, lambda n: n > 2)):
        layout = infer.TileLayout(small.size, small.tiles[:1], 1, lean)
        pools.clear()
        infer.run_tiles(fast, image, layout, lambda _t, _o: None, prepare=False)
        assert calls(len(pools)), (lean, len(pools))
    hook.remove()


def test_2d_stack_keeps_one_heap_across_its_slices(
    image_volume: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2D model over a stack runs every slice in one kept heap: the heap is given back when
    the case starts and once after its last slice, not after every slice."""
    from medseg import heap

    if not heap.return_freed_memory():
        pytest.skip("no glibc mallopt on this platform")
    loaded = threshold_loaded(make_plan(dims=2), 100.0)
    shape = image_volume.array.shape
    layout = infer.tile_layout(loaded.model, shape[1:3], tile_size=8)
    assert layout.keep_heap and shape[3] > 2
    calls: list[str] = []
    give_back = heap._give_back

    def counted(*args: Any) -> bool:
        calls.append(args[-1])
        return give_back(*args)

    monkeypatch.setattr(heap, "_give_back", counted)
    pred = infer.predict_case([image_volume], loaded, tile_size=8)
    assert np.array_equal(pred.labels.array[0], (image_volume.array[0] > 100).astype(np.uint8))
    assert calls == ["return", "return"]
