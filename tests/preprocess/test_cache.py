"""Cache: arrays come back memory-mapped and equal, locations sample their class, incomplete
cases are not listed, a full disk leaves no corrupt file."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from medseg.errors import WriteError
from medseg.preprocess import cache
from medseg.preprocess.pipeline import CaseRecord
from medseg.volume import Box, Grid


@pytest.fixture
def record() -> CaseRecord:
    g = Grid.from_spacing((6, 7, 5), (1.0, 1.0, 2.0))
    return CaseRecord(
        g, ("R", "A", "S"), Box.from_shape(g.shape), g, g, [{"method": "none"}], ["a"]
    )


@pytest.fixture
def arrays(rng):
    image = rng.normal(size=(2, 6, 7, 5)).astype(np.float32)
    label = rng.integers(-1, 3, size=(1, 6, 7, 5)).astype(np.int16)
    return image, label


def test_round_trip_is_memory_mapped_and_exact(tmp_path, record, arrays) -> None:
    image, label = arrays
    locs = cache.sample_locations(label[0], 3, "c1")
    weights = np.ones((1, 6, 7, 5), np.float32)
    cache.write_case(
        tmp_path,
        "c1",
        image=image,
        label=label,
        weights=weights,
        locations=locs,
        record=record,
        digest="x",
    )
    got = cache.load_case(tmp_path, "c1")
    assert isinstance(got.image, np.memmap) and isinstance(got.label, np.memmap)
    np.testing.assert_array_equal(got.image, image)
    np.testing.assert_array_equal(got.label, label)
    np.testing.assert_array_equal(got.weights, weights)
    assert got.record.to_json() == record.to_json()
    assert set(got.locations) == {0, 1, 2}
    for c, xyz in got.locations.items():
        assert xyz.dtype == np.int32 and xyz.shape[1] == 3
        assert len(xyz) == np.count_nonzero(label == c)
        assert np.all(label[0][tuple(xyz.T)] == c)
    assert cache.list_cases(tmp_path) == ["c1"]


def test_locations_are_capped_and_seeded() -> None:
    lab = np.zeros((40, 30, 20), dtype=np.int16)
    a = cache.sample_locations(lab, 2, "x")
    b = cache.sample_locations(lab, 2, "x")
    assert len(a[0]) == cache.MAX_LOCATIONS and len(a[1]) == 0
    np.testing.assert_array_equal(a[0], b[0])
    assert len(np.unique(a[0], axis=0)) == cache.MAX_LOCATIONS


def test_case_without_case_json_is_incomplete(tmp_path, record, arrays) -> None:
    image, label = arrays
    cache.write_case(
        tmp_path,
        "c1",
        image=image,
        label=label,
        weights=None,
        locations=None,
        record=record,
        digest="x",
    )
    (cache.case_dir(tmp_path, "c1") / "case.json").unlink()
    assert cache.list_cases(tmp_path) == []
    assert not cache.is_current(tmp_path, "c1", "x")


def test_input_hash_changes_with_file_and_settings(tmp_path) -> None:
    f = tmp_path / "scan.nii.gz"
    f.write_bytes(b"abc")
    h = cache.input_hash([f], {"plan": 1})
    assert cache.input_hash([f], {"plan": 1}) == h
    assert cache.input_hash([f], {"plan": 2}) != h
    os.utime(f, ns=(1, 10**9))
    assert cache.input_hash([f], {"plan": 1}) != h


def test_disk_full_leaves_no_file_of_the_case_and_no_empty_folder(
    tmp_path, record, arrays, monkeypatch
) -> None:
    image, label = arrays
    cache.write_case(
        tmp_path,
        "c1",
        image=image,
        label=label,
        weights=None,
        locations=None,
        record=record,
        digest="old",
    )
    real_save = np.save

    def full_disk(path, arr, *a, **k):
        real_save(path, arr[: max(1, len(arr) // 2)])  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(WriteError, match="disk full"):
        cache.write_case(
            tmp_path,
            "c1",
            image=image * 2,
            label=label,
            weights=None,
            locations=None,
            record=record,
            digest="new",
        )
    d = cache.case_dir(tmp_path, "c1")
    # the case is redone whole or not at all: no half file, no temporary, no stale file of
    # the old case beside a missing case.json, no empty folder
    assert not d.exists() and not d.parent.exists()  # nor an empty cases/ folder
    assert cache.list_cases(tmp_path) == []  # not complete: will be redone
