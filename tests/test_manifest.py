"""Manifests: loading, data root resolution, validation that collects every problem, importers."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medseg.errors import ManifestError
from medseg.manifest import (
    assign_splits,
    import_folders,
    import_msd,
    import_nnunet,
    load_manifest,
    parse_manifest,
    read_case,
    sha256_file,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "data_manifests").glob("*.json"))


def _nii(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return path


# -- shipped manifests against the real data --------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_manifest_validates_on_real_data(path: Path, data_root: Path) -> None:
    m = load_manifest(path, data_root=data_root)
    m.validate(check_grids=True)
    assert {c.split for c in m.cases} == {"train", "val"}
    assert all(c.sha256 for c in m.cases)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_shipped_label_maps_name_exactly_the_values_in_the_files(data_root: Path) -> None:
    """Independent reads (PIL, nibabel): every value present is named, polarity included."""
    isbi = load_manifest(REPO / "data_manifests/isbi2012.json", data_root)
    assert isbi.labels == {0: "membrane", 255: "cell"}
    lab = _png(isbi.cases[0].label)  # type: ignore[arg-type]
    assert set(np.unique(lab).tolist()) == {0, 255}
    assert 0.1 < float(np.mean(lab == 0)) < 0.4  # membrane is the minority (~22 %)
    drive = load_manifest(REPO / "data_manifests/drive.json", data_root)
    assert drive.channels == ["R", "G", "B"] and len(drive.cases[0].images) == 1
    assert _png(drive.cases[0].images[0]).shape[2] == 3
    assert set(np.unique(_png(drive.cases[0].extras["fov"])).tolist()) == {0, 255}
    brats = load_manifest(REPO / "data_manifests/brats2013.json", data_root)
    assert brats.regions == {"whole": [1, 2, 3, 4], "core": [1, 3, 4], "enhancing": [4]}
    present = set()
    for c in brats.cases:
        present |= set(np.unique(np.asarray(nib.load(str(c.label)).dataobj)).astype(int).tolist())
    assert present <= set(brats.labels or {}) and {0, 4} <= present
    ct = load_manifest(REPO / "data_manifests/ct_examples.json", data_root)
    for c in ct.cases:
        values = np.unique(np.asarray(nib.load(str(c.label)).dataobj)).astype(int).tolist()
        assert set(values) <= set(ct.labels or {})


# -- validation --------------------------------------------------------------------------------


def _write_manifest(tmp_path: Path, cases: list[dict], channels: list[str]) -> Path:
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"name": "t", "channels": channels, "cases": cases}))
    return p


def test_validate_collects_every_problem_in_one_error(tmp_path: Path) -> None:
    grid = np.diag([1.5, 1.5, 2.0, 1.0])
    shifted = grid.copy()
    shifted[0, 3] = 0.5  # label half a millimetre off along x
    img = np.zeros((4, 5, 3), np.float32)
    lab = np.zeros((4, 5, 3), np.uint8)
    _nii(tmp_path / "a_img.nii.gz", img, grid)
    _nii(tmp_path / "a_lab.nii.gz", lab, shifted)
    _nii(tmp_path / "b_img.nii.gz", np.zeros((4, 5, 3, 2), np.float32), grid)  # 2 channels
    _nii(tmp_path / "b_lab.nii.gz", lab, grid)
    (tmp_path / "c_img.nii.gz").write_bytes(b"not gzip")
    _nii(tmp_path / "d_img.nii.gz", img, grid)
    cases = [
        {"case_id": "a", "images": ["a_img.nii.gz"], "label": "a_lab.nii.gz"},
        {"case_id": "b", "images": ["b_img.nii.gz"], "label": "b_lab.nii.gz"},
        {"case_id": "c", "images": ["c_img.nii.gz"]},
        {
            "case_id": "d",
            "images": ["d_img.nii.gz"],
            "label": "missing.nii.gz",
            "sha256": {"d_img.nii.gz": "0" * 64},
        },
        {"case_id": "a", "images": ["d_img.nii.gz"]},
    ]
    m = load_manifest(_write_manifest(tmp_path, cases, ["MR"]), data_root=tmp_path)
    with pytest.raises(ManifestError) as info:
        m.validate()
    lines = str(info.value).splitlines()
    assert "6 problem(s)" in lines[0] and "4 of 5 case(s)" in lines[0]
    body = "\n".join(lines[1:])
    assert "a: duplicate case_id" in body
    assert "differs from a_img.nii.gz by 0.5 mm" in body
    assert "images hold 2 channel(s), manifest names 1" in body
    assert "c: unreadable" in body and "c_img.nii.gz" in body
    assert "missing file" in body and "missing.nii.gz" in body
    assert "sha256 mismatch" in body
    assert len(lines) == 7


def test_validate_passes_good_manifest_with_correct_sha(tmp_path: Path) -> None:
    f = _nii(tmp_path / "img.nii.gz", np.ones((3, 3, 3), np.int16))
    lab = _nii(tmp_path / "lab.nii.gz", np.ones((3, 3, 3), np.uint8))
    cases = [
        {
            "case_id": "x",
            "images": ["img.nii.gz"],
            "label": "lab.nii.gz",
            "sha256": {"img.nii.gz": sha256_file(f), "lab.nii.gz": sha256_file(lab)},
        }
    ]
    seen = []
    m = load_manifest(_write_manifest(tmp_path, cases, ["CT"]), data_root=tmp_path)
    m.validate(progress=lambda done, total, cid: seen.append((done, total, cid)))
    assert seen == [(1, 1, "x")]
    assert m.cases[0].images == [f] and m.cases[0].label == lab
    images, label = read_case(m.cases[0])
    assert label is not None and label.is_label and label.array.dtype == np.uint8
    np.testing.assert_array_equal(images[0].array[0], np.asarray(nib.load(str(f)).dataobj))


def test_data_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = {"name": "t", "channels": ["a"], "cases": [{"case_id": "x", "images": ["i.png"]}]}
    p = tmp_path / "m.json"
    p.write_text(json.dumps(raw))
    monkeypatch.setenv("MEDSEG_DATA", str(tmp_path / "env"))
    assert load_manifest(p).cases[0].images[0] == (tmp_path / "env" / "i.png").resolve()
    p.write_text(json.dumps({**raw, "data_root": "rel"}))
    assert load_manifest(p).data_root == (tmp_path / "rel").resolve()
    assert load_manifest(p, data_root=tmp_path / "cli").data_root == (tmp_path / "cli").resolve()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"name": "t", "channels": ["a"]}, "missing required key 'cases'"),
        ({"name": "t", "channels": ["a"], "cases": [], "chanels": []}, "unknown key"),
        ({"name": "t", "channels": ["a"], "cases": [{"case_id": "x"}]}, "images"),
        ({"name": "t", "channels": ["a"], "labels": {"bg": "x"}, "cases": []}, "not an integer"),
        ({"name": "t", "channels": ["a", "b"], "modalities": ["MR"], "cases": []}, "modalities"),
    ],
)
def test_malformed_manifest_is_one_clear_error(raw: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(raw, tmp_path / "m.json", data_root=tmp_path)


def test_assign_splits_last_fraction_is_val() -> None:
    s = assign_splits([f"c{i}" for i in range(10)], 0.2)
    assert [k for k, v in s.items() if v == "val"] == ["c8", "c9"]
    assert set(assign_splits(["a", "b"], 0.0).values()) == {"train"}


# -- importers ---------------------------------------------------------------------------------


def test_import_msd_maps_4d_file_to_modality_channels(tmp_path: Path) -> None:
    task = tmp_path / "Task01"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    training = []
    for i in range(3):
        _nii(task / f"imagesTr/b_{i}.nii.gz", np.zeros((4, 4, 3, 2), np.float32))
        _nii(task / f"labelsTr/b_{i}.nii.gz", np.zeros((4, 4, 3), np.uint8))
        training.append({"image": f"./imagesTr/b_{i}.nii.gz", "label": f"./labelsTr/b_{i}.nii.gz"})
    (task / "dataset.json").write_text(
        json.dumps(
            {
                "name": "BrainTumour",
                "modality": {"1": "T1w", "0": "FLAIR"},
                "labels": {"0": "background", "1": "edema"},
                "training": training,
                "test": [],
            }
        )
    )
    obj = import_msd(task / "dataset.json")
    m = parse_manifest(obj, tmp_path / "out.json")
    assert m.channels == ["FLAIR", "T1w"] and m.modalities == ["MR", "MR"]
    assert m.labels == {0: "background", 1: "edema"}
    assert m.cases[0].images == [task / "imagesTr/b_0.nii.gz"]
    assert [c.split for c in m.cases] == ["train", "train", "val"]
    m.validate()  # 2 channels from one 4D file match 2 modality names


def test_import_nnunet_v2_labels_regions_and_channel_order(tmp_path: Path) -> None:
    raw = tmp_path / "Dataset001_X"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for cid in ("p1", "p2"):
        for ch in (1, 0):
            _nii(raw / f"imagesTr/{cid}_{ch:04d}.nii.gz", np.full((3, 3, 3), ch, np.int16))
        _nii(raw / f"labelsTr/{cid}.nii.gz", np.zeros((3, 3, 3), np.uint8))
    (raw / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT", "1": "PET"},
                "labels": {"background": 0, "lesion": 1, "edge": 2, "all": [1, 2]},
                "file_ending": ".nii.gz",
            }
        )
    )
    m = parse_manifest(import_nnunet(raw, val_fraction=0.5), tmp_path / "o.json")
    assert m.channels == ["CT", "PET"] and m.modalities == ["CT", "other"]
    assert m.labels == {0: "background", 1: "lesion", 2: "edge"}
    assert m.regions == {"all": [1, 2]}
    assert m.cases[0].images == [raw / "imagesTr/p1_0000.nii.gz", raw / "imagesTr/p1_0001.nii.gz"]
    m.validate()
    (raw / "labelsTr/p2.nii.gz").unlink()
    with pytest.raises(ManifestError, match="p2: no label"):
        import_nnunet(raw)


def test_import_folders_pairs_by_stem_and_lists_unmatched(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for cid in ("n1", "n2", "n3"):
        Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(tmp_path / f"images/{cid}.png")
        Image.fromarray(np.zeros((5, 6), np.uint16)).save(tmp_path / f"labels/{cid}.png")
    m = parse_manifest(
        import_folders(tmp_path / "images", tmp_path / "labels"), tmp_path / "o.json"
    )
    assert m.channels == ["R", "G", "B"] and len(m.cases) == 3
    assert m.cases[1].label == tmp_path / "labels/n2.png"
    m.validate()
    (tmp_path / "labels/n3.png").rename(tmp_path / "labels/n4.png")
    with pytest.raises(ManifestError, match="2 file\\(s\\) without a partner.*n3, n4"):
        import_folders(tmp_path / "images", tmp_path / "labels")


@pytest.mark.parametrize(("shift_mm", "ok"), [(0.004, True), (0.04, False)])
def test_case_grids_agree_within_the_one_grid_tolerance(
    tmp_path: Path, shift_mm: float, ok: bool
) -> None:
    """Image and label grids 4 micrometres apart (what rounded DICOM positions or a float32
    NIfTI header leave) are one grid; 40 micrometres apart they are not."""
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    moved = affine.copy()
    moved[0, 3] = shift_mm
    _nii(tmp_path / "a_img.nii.gz", np.zeros((4, 5, 6), np.float32), affine)
    _nii(tmp_path / "a_lab.nii.gz", np.zeros((4, 5, 6), np.uint8), moved)
    cases = [{"case_id": "a", "images": ["a_img.nii.gz"], "label": "a_lab.nii.gz"}]
    m = load_manifest(_write_manifest(tmp_path, cases, ["MR"]), data_root=tmp_path)
    if ok:
        m.validate()
    else:
        with pytest.raises(ManifestError, match="tolerance 0.01 mm"):
            m.validate()


def test_nan_and_infinite_voxels_are_problems_counted_per_channel(tmp_path: Path) -> None:
    img = np.ones((6, 5, 4), np.float32)
    img[0, 0, :3] = np.nan
    img[1, 1, 1] = -np.inf
    _nii(tmp_path / "bad.nii.gz", img)
    _nii(tmp_path / "good.nii.gz", np.ones((6, 5, 4), np.float32))
    _nii(tmp_path / "lab.nii.gz", np.zeros((6, 5, 4), np.uint8))
    cases = [{"case_id": c, "images": [f"{c}.nii.gz"], "label": "lab.nii.gz"}
             for c in ("good", "bad")]  # fmt: skip
    m = load_manifest(_write_manifest(tmp_path, cases, ["ct"]), tmp_path)
    with pytest.raises(ManifestError) as exc:
        m.validate()
    lines = str(exc.value).splitlines()
    assert "1 problem(s) in 1 of 2 case(s)" in lines[0]
    assert len(lines) == 2 and "bad: " in lines[1] and "bad.nii.gz" in lines[1]
    assert "channel 0: 3 NaN, 1 infinite voxels" in lines[1]  # counts as written above


def test_a_split_no_case_has_is_refused_naming_the_splits(tmp_path: Path) -> None:
    _nii(tmp_path / "a.nii.gz", np.ones((4, 4, 4), np.float32))
    cases = [{"case_id": c, "images": ["a.nii.gz"], "split": s}
             for c, s in (("x", "train"), ("y", "val"), ("z", None))]  # fmt: skip
    m = load_manifest(_write_manifest(tmp_path, cases, ["ct"]), tmp_path)
    assert [c.case_id for c in m.cases_of_split("val")] == ["y"]
    assert [c.case_id for c in m.cases_of_split(None)] == ["x", "y", "z"]
    with pytest.raises(ManifestError, match=r"m\.json: no case has split 'tset'; .*train, val$"):
        m.cases_of_split("tset")
