"""preprocess_case / restore_*: geometry survives the round trip; the cohort command finishes
good cases, lists bad ones, skips unchanged ones; real data maps back onto its label."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import CohortError, GeometryError, PlanError, ReadError
from medseg.preprocess import cache
from medseg.preprocess.cohort import Options, preprocess_cohort
from medseg.preprocess.pipeline import (
    CaseRecord,
    preprocess_case,
    restore_classes,
    restore_labels,
    restore_probabilities,
    restore_resamples,
)
from medseg.preprocess.plan import ChannelPlan, Plan
from medseg.volume import Box, Grid, Volume


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def make_plan(**kw) -> Plan:
    base = dict(
        spatial_dims=3,
        channels=[ChannelPlan("T1", "MR", "zscore_nonzero"), ChannelPlan("T2", "MR", "none")],
        label_values=[0, 1, 4],
        class_names=["bg", "a", "b"],
        network={},
        patch_output_size=(4, 4, 4),
        tile_output_size=(4, 4, 4),
        margin=(0, 0, 0),
        crop_to_nonzero=True,
    )
    base.update(kw)
    return Plan(**base)


@pytest.fixture
def scan(oblique_grid: Grid, rng) -> tuple[list[Volume], Volume]:
    """Two channels that are zero outside a head-like ellipsoid, and a two-class label."""
    g = oblique_grid
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij"), -1)
    xyz = g.world(ijk)
    centre = g.world(np.array(g.shape) / 2.0)
    r = np.linalg.norm((xyz - centre) / [8.0, 9.0, 12.0], axis=-1)
    head = r < 1.0
    t1 = np.where(head, 200 + 30 * rng.normal(size=g.shape), 0).astype(np.float32)
    t2 = np.where(head, 50 + xyz[..., 2], 0).astype(np.float32)
    lab = np.zeros(g.shape, np.uint8)
    lab[r < 0.7] = 1
    lab[r < 0.4] = 4
    images = [
        Volume(t1[None], g, meta={"source": "t1.nii.gz"}),
        Volume(t2[None], g, meta={"source": "t2.nii.gz"}),
    ]
    return images, Volume(lab[None], g, True, {"source": "seg.nii.gz"})


def test_output_is_on_the_plan_grid(scan) -> None:
    images, label = scan
    plan = make_plan(target_spacing=(1.0, 1.0, 1.5))
    out = preprocess_case(images, plan, label)
    assert out.image.array.dtype == np.float32 and out.image.array.shape[0] == 2
    assert out.image.grid.orientation == ("R", "A", "S")
    assert out.image.grid.spacing == pytest.approx((1.0, 1.0, 1.5))
    assert out.label is not None and out.label.array.dtype == np.int16
    assert set(np.unique(out.label.array)) == {0, 1, 2}
    assert out.image.grid == out.label.grid == out.record.grid
    rec = CaseRecord.from_json(json.loads(json.dumps(out.record.to_json())))
    assert rec.to_json() == out.record.to_json()


def test_crop_and_reorient_then_restore_is_exact(scan) -> None:
    images, label = scan
    out = preprocess_case(images, make_plan(), label)  # no resampling
    assert out.record.crop_box.shape != out.record.original_grid.shape  # it did crop
    restored = restore_labels(out.label.array[0], out.record)
    np.testing.assert_array_equal(restored, make_plan().labels_to_classes(label.array[0]))


def test_reorientation_keeps_world_coordinates(scan) -> None:
    images, label = scan
    out = preprocess_case(images, make_plan(), label)
    g, src = out.image.grid, images[1]
    for ijk in [(2, 3, 4), (5, 1, 7), (0, 0, 0)]:
        src_ijk = np.round(src.grid.index(g.world(ijk))).astype(int)
        assert np.allclose(src.grid.world(src_ijk), g.world(ijk), atol=1e-6)
        assert out.image.array[(1, *ijk)] == pytest.approx(src.array[(0, *src_ijk)])


def test_resampled_label_maps_back_with_high_dice(scan) -> None:
    images, label = scan
    out = preprocess_case(images, make_plan(target_spacing=(0.5, 0.5, 0.8)), label)
    restored = restore_labels(out.label.array[0], out.record)
    orig = make_plan().labels_to_classes(label.array[0])
    assert restored.shape == label.grid.shape
    for c in (1, 2):
        assert dice(restored == c, orig == c) >= 0.99


def test_probabilities_restore_onto_the_original_grid(scan) -> None:
    images, label = scan
    out = preprocess_case(images, make_plan(target_spacing=(0.5, 0.5, 0.8)), label)
    onehot = np.stack([(out.label.array[0] == c) for c in range(3)]).astype(np.float32)
    p = restore_probabilities(onehot, out.record)
    assert p.shape == (3, *label.grid.shape)
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)
    outside = ~np.any(np.stack([im.array[0] != 0 for im in images]), axis=0)
    assert outside.any() and np.all(p[0][outside] == 1.0)
    orig = make_plan().labels_to_classes(label.array[0])
    for c in (1, 2):
        assert dice(p.argmax(0) == c, orig == c) >= 0.95


@pytest.mark.parametrize("spacing", [(0.5, 0.5, 0.8), (2.0, 1.5, 3.0)])
def test_restore_classes_is_the_argmax_of_the_restored_probabilities(scan, spacing) -> None:
    images, label = scan
    out = preprocess_case(images, make_plan(target_spacing=spacing), label)
    assert restore_resamples(out.record)
    rng = np.random.default_rng(3)
    # background probability 0 on the plan grid: class 0 only outside the crop
    fg = rng.dirichlet(np.ones(2), size=out.record.grid.shape).astype(np.float32)
    probs = np.concatenate([np.zeros((1, *fg.shape[:-1]), np.float32), np.moveaxis(fg, -1, 0)])
    want = restore_probabilities(probs, out.record).argmax(0)
    got = restore_classes(probs, out.record)
    assert got.dtype == np.int8 and got.shape == label.grid.shape
    assert np.array_equal(got, want)
    head = np.any(np.stack([im.array[0] != 0 for im in images]), axis=0)
    assert (got == 0).any() and not np.any((got == 0) & head)
    assert np.isin(got[head], (1, 2)).all() and (got == 1).any() and (got == 2).any()


def test_restore_classes_skips_classes_that_never_win(scan) -> None:
    """A class that holds no probability anywhere may be left out: same labels."""
    images, label = scan
    out = preprocess_case(images, make_plan(target_spacing=(2.0, 1.5, 3.0)), label)
    rng = np.random.default_rng(4)
    two = np.moveaxis(rng.dirichlet(np.ones(2), size=out.record.grid.shape), -1, 0)
    probs = np.concatenate([two, np.zeros((1, *two.shape[1:]))]).astype(np.float32)
    full = restore_classes(probs, out.record)
    assert np.array_equal(restore_classes(probs, out.record, classes=[1]), full)
    assert (full == 1).any() and not (full == 2).any()


def test_crop_and_flip_alone_do_not_resample(scan) -> None:
    images, label = scan
    out = preprocess_case(images, make_plan(orientation=("L", "P", "S")), label)
    assert out.record.crop_box.shape != label.grid.shape or out.record.orientation is not None
    assert not restore_resamples(out.record)


def test_a_half_voxel_shift_at_the_same_spacing_resamples() -> None:
    g = Grid((10, 12, 8), np.diag([1.5, 1.5, 3.0, 1.0]))
    shifted = np.diag([1.5, 1.5, 3.0, 1.0])
    shifted[:3, 3] = (0.75, 0.0, 0.0)
    box = Box((0, 0, 0), g.shape)
    assert not restore_resamples(CaseRecord(g, None, box, g, g, [], []))
    assert restore_resamples(CaseRecord(g, None, box, g, Grid(g.shape, shifted), [], []))


@pytest.mark.parametrize("case", ["brats_2013_pat0001_1", "brats_2013_pat0005_1"])
def test_restored_fractions_beat_nearest_on_brats_labels_at_2mm(data_root: Path, case) -> None:
    """Reference whole-tumour masks taken to 2 mm (linear: the tumour fraction of each 2 mm
    voxel) and back to 1 mm: from the fractions (restore_classes) they keep more of their
    Dice than the nearest-neighbour copy of the 2 mm argmax (restore_labels)."""
    from medseg.io import read_volume
    from medseg.preprocess.resample import resample_array

    ref = read_volume(data_root / "brats2013" / case / "OTMultiClass.nii.gz", label=True)
    g = ref.grid
    coarse = g.with_spacing((2.0, 2.0, 2.0))
    record = CaseRecord(g, None, Box((0, 0, 0), g.shape), g, coarse, [], [])
    tumour = ref.array[0] > 0
    frac = resample_array(tumour[None].astype(np.float32), g, coarse, order=1)[0]
    probs = np.stack([1.0 - frac, frac])
    from_fractions = restore_classes(probs, record) == 1
    nearest = restore_labels((frac > 0.5).astype(np.int8), record) == 1
    assert dice(from_fractions, tumour) >= 0.96
    assert dice(from_fractions, tumour) > dice(nearest, tumour) + 0.01


def test_bad_inputs_name_the_file(scan) -> None:
    images, label = scan
    plan = make_plan()
    nan = images[1].array.copy()
    nan[0, 3, 3, 3] = np.nan
    with pytest.raises(ReadError, match="t2.nii.gz: channel T2 has 1 NaN"):
        preprocess_case([images[0], images[1].with_array(nan)], plan, label)
    bad = label.with_array(np.where(label.array == 4, 9, label.array).astype(np.uint8))
    with pytest.raises(PlanError, match=r"seg.nii.gz: label values \[9\]"):
        preprocess_case(images, plan, bad)
    g = label.grid
    moved = Grid(g.shape, g.affine + np.pad(np.ones((3, 1)), ((0, 1), (3, 0))))
    with pytest.raises(GeometryError, match="seg.nii.gz vs t1.nii.gz.*1.73"):
        preprocess_case(images, plan, Volume(label.array, moved, True, label.meta))
    with pytest.raises(GeometryError, match="expects 2"):
        preprocess_case(images[:1], plan, label)


# -- cohort ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    case_id: str
    images: list[Path]
    label: Path | None
    split: str | None = None
    extras: dict = field(default_factory=dict)


@dataclass
class FakeManifest:
    cases: list[Case]
    name: str = "synthetic"
    channels: tuple = ("T1",)
    modalities: tuple = ("MR",)
    labels: dict | None = field(default_factory=lambda: {0: "bg", 1: "fg"})
    regions: dict | None = None


def write_case(folder: Path, cid: str, rng, *, label_value: int = 1) -> Case:
    aff = np.diag([-1.0, -1.0, 2.0, 1.0])
    img = np.zeros((20, 22, 10), np.float32)
    img[4:16, 3:19, 2:8] = rng.normal(100, 10, size=(12, 16, 6))
    lab = np.zeros(img.shape, np.uint8)
    lab[6:12, 6:14, 3:6] = label_value
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(img, aff), folder / f"{cid}_img.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), folder / f"{cid}_seg.nii.gz")
    return Case(cid, [folder / f"{cid}_img.nii.gz"], folder / f"{cid}_seg.nii.gz")


def test_cohort_finishes_good_cases_lists_bad_ones_and_resumes(tmp_path, rng) -> None:
    data = tmp_path / "data"
    good = [write_case(data, f"c{i}", rng) for i in range(3)]
    broken = data / "broken_img.nii.gz"
    broken.write_bytes(b"not a nifti file")
    bad_read = Case("broken", [broken], None)
    bad_label = write_case(data, "badlab", rng, label_value=7)
    m = FakeManifest([good[0], bad_read, good[1], bad_label, good[2]])
    prep = tmp_path / "prep"
    lines: list[str] = []
    events: list = []
    with pytest.raises(CohortError) as err:
        preprocess_cohort(
            m, prep, report=lines.append, plan_overrides={"target_spacing": [1, 1, 1]},
            on_event=events.append,
        )  # fmt: skip
    assert set(err.value.failures) == {"broken", "badlab"}
    assert "label values [7]" in err.value.failures["badlab"]
    assert cache.list_cases(prep) == ["c0", "c1", "c2"]
    done = {(e.stage, e.key) for e in events if e.status == "done"}
    assert ("preprocess", "c1") in done and ("fingerprint", "broken") not in done

    # rerun of the good cases: nothing to do; a touched input is redone
    m2 = FakeManifest(good)
    res = preprocess_cohort(
        m2, prep, report=lines.append, plan_overrides={"target_spacing": [1, 1, 1]}
    )
    assert sorted(res.skipped) == ["c0", "c1", "c2"] and not res.done
    os.utime(good[1].images[0], ns=(1, 2 * 10**9))
    res = preprocess_cohort(
        m2, prep, report=lines.append, plan_overrides={"target_spacing": [1, 1, 1]}
    )
    assert list(res.done) == ["c1"]
    # a run killed while writing c2 (before its case.json) redoes only c2
    (cache.case_dir(prep, "c2") / "case.json").unlink()
    (cache.case_dir(prep, "c2") / "label.npy").write_bytes(b"half a file")
    res = preprocess_cohort(m2, prep, plan_overrides={"target_spacing": [1, 1, 1]})
    assert list(res.done) == ["c2"]
    assert cache.load_case(prep, "c2").label.shape[0] == 1
    res = preprocess_cohort(m2, prep, overwrite=True, plan_overrides={"target_spacing": [1, 1, 1]})
    assert sorted(res.done) == ["c0", "c1", "c2"]
    # a changed plan redoes everything
    res = preprocess_cohort(m2, prep, plan_overrides={"target_spacing": [1.5, 1.5, 1.5]})
    assert sorted(res.done) == ["c0", "c1", "c2"]


def test_cohort_writes_border_weights_from_instance_labels(tmp_path, rng) -> None:
    data = tmp_path / "data"
    aff = np.eye(4)
    img = rng.normal(size=(30, 30, 1)).astype(np.float32)
    inst = np.zeros((30, 30, 1), np.uint16)
    inst[5:12, 5:12] = 1
    inst[5:12, 12:20] = 2  # touching instance
    data.mkdir()
    nib.save(nib.Nifti1Image(img, aff), data / "i.nii.gz")
    nib.save(nib.Nifti1Image(inst, aff), data / "l.nii.gz")
    m = FakeManifest([Case("n1", [data / "i.nii.gz"], data / "l.nii.gz")], modalities=("EM",))
    opts = Options.from_dict({"border_weights": {"instances": "label"}})
    preprocess_cohort(m, tmp_path / "prep", options=opts, report=lambda s: None)
    got = cache.load_case(tmp_path / "prep", "n1")
    assert got.weights is not None and got.weights.shape == (1, 30, 30, 1)
    assert set(np.unique(got.label)) == {0, 1}
    # the background pixel just past the shared edge's end sits between both instances
    assert got.weights[0, 12, 12, 0] > got.weights[0, 25, 25, 0] + 5


def test_cli_exit_codes(tmp_path, rng) -> None:
    from medseg.cli import main

    data = tmp_path / "data"
    write_case(data, "c0", rng)
    man = {
        "name": "t",
        "channels": ["T1"],
        "modalities": ["MR"],
        "labels": {"0": "bg", "1": "fg"},
        "cases": [
            {"case_id": "c0", "images": ["c0_img.nii.gz"], "label": "c0_seg.nii.gz"},
            {"case_id": "gone", "images": ["gone.nii.gz"], "label": None},
        ],
    }
    (tmp_path / "m.json").write_text(json.dumps(man))
    pipe = tmp_path / "p.toml"
    pipe.write_text("[plan]\nspacing = [1, 1, 1]\n")
    args = [
        "preprocess",
        "--manifest",
        str(tmp_path / "m.json"),
        "--out",
        str(tmp_path / "o"),
        "--data-root",
        str(data),
    ]
    with pytest.raises(SystemExit) as ex:
        main([*args, "--pipeline", str(pipe)])
    assert ex.value.code == 2  # unknown [plan] key, nothing written
    assert not (tmp_path / "o" / "cases" / "c0").exists()
    with pytest.raises(SystemExit) as ex:
        main(args)
    assert ex.value.code == 1
    assert cache.list_cases(tmp_path / "o") == ["c0"]


# -- real data ------------------------------------------------------------------------------


def test_nrrd_cache_maps_back_onto_the_original_label(data_root: Path, tmp_path) -> None:
    from medseg.io import read_volume
    from medseg.manifest import load_manifest

    manifest_path = Path(__file__).resolve().parents[2] / "data_manifests" / "nrrd.json"
    m = load_manifest(manifest_path, data_root)
    res = preprocess_cohort(m, tmp_path, report=lambda s: None)
    plan = res.plan
    assert plan.spatial_dims == 3 and plan.orientation == ("R", "A", "S")
    sx, sy, sz = plan.target_spacing
    assert sx == pytest.approx(0.78125) and 2.0 < sz < 6.5  # coarse axis kept coarse
    for case in m.cases:
        got = cache.load_case(tmp_path, case.case_id)
        assert got.image.shape[1:] == got.record.grid.shape
        assert got.locations[1].shape[0] > 0
        restored = restore_labels(np.asarray(got.label[0]), got.record)
        ref = read_volume(case.label, label=True)
        assert restored.shape == ref.grid.shape
        d = dice(restored == 1, ref.array[0] == 1)
        # world centroid of the lesion: geometry (flips, shifts) must be right in every case
        cw = [ref.grid.world(np.argwhere(a == 1).mean(0)) for a in (restored, ref.array[0])]
        assert np.linalg.norm(cw[0] - cw[1]) < 0.5, case.case_id
        if case.case_id.startswith("brain"):  # target finer than the scan: exact round trip
            assert d >= 0.99, case.case_id
        else:
            # breast1 (0.66 x 0.66 x 2.1 mm) is downsampled to the data set's median spacing;
            # its 143-voxel lesion, 3 slices thick, loses sub-voxel detail on the way.
            assert d >= 0.85, case.case_id
