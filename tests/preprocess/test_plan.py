"""Plan: label mapping, derivation from a fingerprint (spacing rule, 2D/3D, valid sizes that fit
the memory budget), TOML overrides and their validation."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import PlanError
from medseg.model import shapes
from medseg.preprocess.fingerprint import CaseFingerprint, ChannelStats, Fingerprint
from medseg.preprocess.plan import ChannelPlan, Plan, make_plan
from medseg.volume import Box, Grid


def fingerprint(shapes_spacings, *, modality="MR", labels=None, lps=True) -> Fingerprint:
    cases = []
    for n, (shape, spacing) in enumerate(shapes_spacings):
        direction = np.diag([-1.0, -1.0, 1.0]) if lps else None
        grid = Grid.from_spacing(shape, spacing, direction=direction)
        cases.append(CaseFingerprint(f"c{n}", grid, 1, Box.from_shape(shape), {0: 100, 1: 10}))
    stats = [ChannelStats("ch", 40.0, 100.0, -900.0, 1200.0, -1024.0, 3000.0, 1000)]
    return Fingerprint("d", ["ch"], [modality], labels or {0: "bg", 1: "fg"}, None, cases, stats)


def small_plan(**kw) -> Plan:
    base = dict(
        spatial_dims=3,
        channels=[ChannelPlan("x")],
        label_values=[0, 2, 7],
        class_names=["bg", "a", "b"],
        network={},
        patch_output_size=(4, 4, 4),
        tile_output_size=(4, 4, 4),
        margin=(0, 0, 0),
    )
    base.update(kw)
    return Plan(**base)


def test_labels_to_classes_and_back_with_ignore() -> None:
    plan = small_plan(ignore_value=255)
    lab = np.array([[0, 2, 7], [255, 7, 0]], dtype=np.uint8)
    cls = plan.labels_to_classes(lab)
    assert cls.dtype == np.int16
    np.testing.assert_array_equal(cls, [[0, 1, 2], [-1, 2, 0]])
    back = plan.classes_to_labels(cls)
    np.testing.assert_array_equal(back, lab)
    assert back.dtype == np.uint8


def test_undeclared_label_value_names_the_file() -> None:
    with pytest.raises(PlanError, match=r"seg.nii.gz: label values \[3, 9\]"):
        small_plan().labels_to_classes(np.array([0, 3, 9, 2]), source="seg.nii.gz")


def test_median_spacing_for_isotropic_data() -> None:
    fp = fingerprint(
        [
            ((60, 60, 50), (1.0, 1.0, 1.2)),
            ((64, 60, 50), (0.8, 0.8, 1.0)),
            ((50, 50, 40), (1.2, 1.2, 1.4)),
        ]
    )
    plan = make_plan(fp)
    assert plan.target_spacing == pytest.approx((1.0, 1.0, 1.2))
    assert plan.spatial_dims == 3 and plan.orientation == ("R", "A", "S")


def test_anisotropic_coarse_axis_takes_its_10th_percentile() -> None:
    spacings = [
        (0.78, 0.78, 6.5),
        (0.78, 0.78, 6.5),
        (0.7, 0.7, 5.0),
        (0.8, 0.8, 2.1),
        (0.78, 0.78, 6.5),
    ]
    fp = fingerprint([((256, 256, 24), s) for s in spacings])
    plan = make_plan(fp)
    z = np.percentile([s[2] for s in spacings], 10)
    assert plan.target_spacing == pytest.approx((0.78, 0.78, z))
    assert plan.target_spacing[2] > 2 * plan.target_spacing[0]  # coarse axis stays coarse


def test_spacing_follows_the_reoriented_axes() -> None:
    # a sagittal scan stored with axes (A, S, R): spacing must be permuted into RAS order
    d = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    grid = Grid.from_spacing((40, 50, 30), (1.0, 1.0, 3.0), direction=d)
    fp = fingerprint([((40, 50, 30), (1.0, 1.0, 3.0))])
    fp.cases[0] = CaseFingerprint("c0", grid, 1, Box.from_shape(grid.shape), {0: 1, 1: 1})
    plan = make_plan(fp)
    assert plan.target_spacing == pytest.approx((3.0, 1.0, 1.0))


def test_2d_data_gives_a_2d_network_without_reorientation() -> None:
    fp = fingerprint([((512, 512, 1), (1.0, 1.0, 1.0))] * 3)
    plan = make_plan(fp)
    assert plan.spatial_dims == 2 and plan.orientation is None
    assert len(plan.patch_output_size) == 2 and plan.network["spatial_dims"] == 2
    assert plan.network["depth"] == 4


def test_network_rebuilds_and_sizes_are_valid() -> None:
    torch = pytest.importorskip("torch")
    from medseg.model import UNet

    fp = fingerprint([((90, 100, 80), (1.0, 1.0, 1.0))] * 3)
    plan = make_plan(fp, memory_budget_gb=0.5)
    net = plan.network
    d, n = net["depth"], net["convs_per_level"]
    assert plan.margin == (shapes.margin(d, n),) * 3
    for s in (*plan.patch_output_size, *plan.tile_output_size):
        assert shapes.is_valid_output(s, d, n)
    assert all(p <= 100 for p in plan.patch_output_size)
    model = UNet(**{**net, "base_channels": 2})
    with torch.no_grad():
        size = [shapes.input_size(s, d, n) for s in (12, 12, 12)]
        out = model(torch.zeros(1, 1, *size))
    assert tuple(out.shape[2:]) == (12, 12, 12)


def test_smaller_memory_budget_gives_smaller_patches() -> None:
    fp = fingerprint([((160, 160, 120), (1.0, 1.0, 1.0))] * 3)
    big = make_plan(fp, memory_budget_gb=8.0)
    small = make_plan(fp, memory_budget_gb=0.25)
    assert np.prod(small.patch_output_size) < np.prod(big.patch_output_size)
    assert all(s <= b for s, b in zip(small.patch_output_size, big.patch_output_size, strict=True))


def test_ct_channel_gets_dataset_clip_and_statistics() -> None:
    plan = make_plan(fingerprint([((60, 60, 40), (1.0, 1.0, 1.0))], modality="CT"))
    ch = plan.channels[0]
    assert (ch.normalisation, ch.clip, ch.mean, ch.std) == ("ct", (-900.0, 1200.0), 40.0, 100.0)
    mr = make_plan(fingerprint([((60, 60, 40), (1.0, 1.0, 1.0))], modality="MR"))
    assert mr.channels[0].normalisation == "zscore_nonzero"


def test_overrides_merge_and_are_validated() -> None:
    fp = fingerprint([((90, 100, 80), (1.0, 1.0, 1.0))] * 3)
    plan = make_plan(
        fp,
        {
            "network": {"base_channels": 8, "depth": 2},
            "target_spacing": [2.0, 2.0, 2.0],
            "channels": [{"normalisation": "zscore"}],
            "ignore_value": 255,
        },
    )
    assert plan.network["base_channels"] == 8 and plan.margin == (shapes.margin(2),) * 3
    assert plan.target_spacing == (2.0, 2.0, 2.0) and plan.ignore_value == 255
    assert plan.channels[0].normalisation == "zscore"
    with pytest.raises(PlanError, match="pipelines/x.toml.*unknown plan keys \\['spacing'\\]"):
        make_plan(fp, {"spacing": [1, 1, 1]}, source="pipelines/x.toml [plan]")
    with pytest.raises(PlanError, match="unknown network keys"):
        make_plan(fp, {"network": {"widths": 3}})
    with pytest.raises(PlanError, match="not valid for depth"):
        make_plan(fp, {"network": {"depth": 2}, "patch_output_size": [13, 13, 13]})


def test_plan_json_round_trip(tmp_path) -> None:
    plan = make_plan(fingerprint([((60, 60, 40), (1.0, 1.0, 1.0))]))
    plan.save(tmp_path / "plan.json")
    back = Plan.load(tmp_path / "plan.json")
    assert back.to_json() == plan.to_json()
