"""The lazy inference input (``medseg.preprocess.pipeline.prepare_for_inference`` /
``LazyImage``): tiles normalised from the stored scan equal, bit for bit, the same boxes of the
whole-volume ``preprocess_case`` image, which is the independent reference here."""

from __future__ import annotations

import numpy as np
import pytest

from medseg import tiling
from medseg.preprocess import pipeline
from medseg.preprocess.pipeline import LazyImage, prepare_for_inference, preprocess_case
from medseg.preprocess.plan import ChannelPlan, Plan
from medseg.volume import Box, Grid, Volume


def ct_like(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """int16 HU: air (-1024) around an ellipsoidal body of soft tissue, fat and bone."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    r = np.linalg.norm((ijk - (np.asarray(shape) - 1) / 2) / (np.asarray(shape) * 0.4), axis=-1)
    hu = np.full(shape, -1024.0)
    hu[r < 1.0] = 40 + 30 * rng.normal(size=int((r < 1.0).sum()))
    hu[(r > 0.8) & (r < 1.0)] = -100
    hu[r < 0.25] = 700 + 400 * rng.random(size=int((r < 0.25).sum()))
    return hu.astype(np.int16)


def lps_grid(shape: tuple[int, int, int]) -> Grid:
    """Axis-aligned LPS grid (as DICOM converters write CT): RAS reorientation flips I and J."""
    return Grid.from_spacing(shape, (0.8, 0.7, 2.0), (30.0, 20.0, -50.0), np.diag([-1.0, -1, 1]))


CHANNELS = {
    "ct": ChannelPlan("CT", "CT", "ct", (-958.0, 1200.0), 31.7, 412.3),
    "ct_unclipped": ChannelPlan("CT", "CT", "ct", None, -12.5, 300.0),
    "zscore": ChannelPlan("CT", "CT", "zscore"),
    "zscore_nonzero": ChannelPlan("CT", "CT", "zscore_nonzero"),
    "none": ChannelPlan("CT", "CT", "none"),
}


def make_plan(channels: list[ChannelPlan], **kw) -> Plan:
    base = dict(
        spatial_dims=3,
        channels=channels,
        label_values=[0, 1, 2],
        class_names=["bg", "a", "b"],
        network={},
        patch_output_size=(4, 4, 4),
        tile_output_size=(4, 4, 4),
        margin=(0, 0, 0),
        orientation=("R", "A", "S"),
        target_spacing=(0.8, 0.7, 2.0),
        crop_to_nonzero=True,
    )
    base.update(kw)
    return Plan(**base)  # type: ignore[arg-type]


def boxes(shape: tuple[int, ...], rng: np.random.Generator) -> list[Box]:
    """Boxes inside, across the border and larger than the image (mirrored gathers)."""
    out = [Box.from_shape(shape), Box((-3, -5, -2), tuple(n + 4 for n in shape))]
    for _ in range(6):
        start = tuple(int(rng.integers(-6, n)) for n in shape)
        out.append(Box(start, tuple(s + int(rng.integers(1, 14)) for s in start)))
    return out


@pytest.mark.parametrize("method", sorted(CHANNELS))
@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.float32, np.float64])
def test_lazy_tiles_equal_whole_volume_preprocessing_bit_for_bit(
    rng: np.random.Generator, method: str, dtype: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "LAZY_SLAB_VOXELS", 97)  # several slabs per tile
    shape = (21, 26, 13)
    hu = ct_like(shape, rng)
    arr = (hu + 1024).astype(dtype) if dtype == np.uint16 else hu.astype(dtype)
    vol = Volume(arr[None], lps_grid(shape), meta={"source": "ct.nii"})
    plan = make_plan([CHANNELS[method]])
    ref = preprocess_case([vol], plan)
    lazy = prepare_for_inference([vol], plan)
    assert isinstance(lazy.image, LazyImage)
    assert lazy.record.to_json() == ref.record.to_json()
    whole = ref.image.array
    assert whole.dtype == np.float32 and lazy.image.shape == whole.shape
    assert lazy.record.crop_box != Box.from_shape(shape)  # the crop is exercised
    for box in boxes(whole.shape[1:], rng):
        got = tiling.extract(lazy.image, box)
        want = tiling.extract(whole, box)
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), box


def test_zscore_nonzero_masks_each_tile_as_the_whole_scan_does(rng: np.random.Generator) -> None:
    """Two channels, one z-scored over the foreground of both: the per-tile mask must be the
    whole-scan ``foreground_mask`` (background values from the scan's corners, any channel)."""
    shape = (17, 19, 11)
    g = lps_grid(shape)
    hu = ct_like(shape, rng)
    other = np.where(hu > 300, hu, 0).astype(np.int16)  # background 0, foreground elsewhere
    vols = [Volume(hu[None], g, meta={"source": "a"}), Volume(other[None], g, meta={"source": "b"})]
    plan = make_plan([CHANNELS["none"], ChannelPlan("B", "MR", "zscore_nonzero")])
    ref = preprocess_case(vols, plan).image.array
    lazy = prepare_for_inference(vols, plan).image
    assert isinstance(lazy, LazyImage)
    for box in boxes(ref.shape[1:], rng):
        got, want = tiling.extract(lazy, box), tiling.extract(ref, box)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), box


def test_lazy_input_keeps_the_stored_int16_scan_without_copying(rng: np.random.Generator) -> None:
    shape = (15, 12, 9)
    vol = Volume(ct_like(shape, rng)[None], lps_grid(shape))
    lazy = prepare_for_inference([vol], make_plan([CHANNELS["ct"]])).image
    assert isinstance(lazy, LazyImage)
    assert lazy.raw.dtype == np.int16
    assert np.shares_memory(lazy.raw, vol.array)


def test_resampling_plan_falls_back_to_the_float32_image(rng: np.random.Generator) -> None:
    shape = (15, 12, 9)
    vol = Volume(ct_like(shape, rng)[None], lps_grid(shape))
    plan = make_plan([CHANNELS["ct"]], target_spacing=(1.0, 1.0, 1.5))
    got = prepare_for_inference([vol], plan)
    ref = preprocess_case([vol], plan)
    assert isinstance(got.image, Volume)
    assert np.array_equal(got.image.array, ref.image.array)
    assert got.record.to_json() == ref.record.to_json()
