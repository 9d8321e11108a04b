"""The fault matrix: every command against every bad input it can be given, and every output
fault it can meet, gives one line on stderr, the documented exit code, and leaves no new file.

Faults: a missing file, a truncated file, a text file named as the expected file, an empty
folder where a file is expected, an output on a read-only file system, an output that exists.
Output faults are also shown to strike before any scan is read (no computation is wasted).
A writer killed by SIGKILL in the middle of a write leaves a temporary that the next command
writing into that folder removes.

Tests run as root here, for whom permission bits do not stop a write; a read-only file system
is therefore simulated in this process (``EROFS`` from ``os.open``/``os.mkdir`` under one
folder), which is what the kernel answers for a read-only mount.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import run_cli as run
from tests.inference.helpers import make_plan, model_folder

REPO = Path(__file__).resolve().parents[1]
FAULTS = ("missing", "truncated", "text", "empty_folder")


# -- a small world of inputs -------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    root: Path  # everything the commands may read or write lives under it
    inp: Path  # good inputs and bad ones
    model: Path  # a model folder (plan.json, model.pt)


def _nifti(path: Path, arr: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(arr, np.diag([0.9, 0.8, 2.0, 1.0])), path)
    return path


def _bad_copies(good: Path, stem: str, suffix: str) -> None:
    """``missing``, ``truncated`` and ``text`` variants of ``good`` beside it."""
    data = good.read_bytes()
    (good.parent / f"truncated_{stem}{suffix}").write_bytes(data[: len(data) // 2])
    (good.parent / f"text_{stem}{suffix}").write_text("these are notes, not data\n" * 20)


@pytest.fixture
def world(tmp_path: Path) -> World:
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    img = rng.normal(100, 10, size=(12, 12, 8)).astype(np.float32)
    lab = np.zeros((12, 12, 8), np.uint8)
    lab[3:9, 3:9, 2:6] = 1
    _nifti(inp / "img.nii.gz", img)
    _nifti(inp / "lab.nii.gz", lab)
    _bad_copies(inp / "img.nii.gz", "img", ".nii.gz")
    (inp / "empty_folder").mkdir()
    manifest = {
        "name": "tiny",
        "channels": ["ct"],
        "labels": {"0": "background", "1": "fg"},
        "cases": [{"case_id": "c1", "images": ["img.nii.gz"], "label": "lab.nii.gz"}],
        "data_root": str(inp),
    }
    (inp / "m.json").write_text(json.dumps(manifest))
    _bad_copies(inp / "m.json", "m", ".json")
    msd = {
        "name": "tiny",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "fg"},
        "training": [{"image": "./img.nii.gz", "label": "./lab.nii.gz"}],
    }
    (inp / "dataset.json").write_text(json.dumps(msd))
    _bad_copies(inp / "dataset.json", "dataset", ".json")
    (inp / "p.toml").write_text(
        f'name = "tiny"\nmanifest = "{inp / "m.json"}"\nprep_dir = "{inp / "prep"}"\n'
    )
    _bad_copies(inp / "p.toml", "p", ".toml")
    for kind in ("good", "truncated", "text"):
        (inp / f"{kind}_images").mkdir()
        (inp / f"{kind}_labels").mkdir()
        _nifti(inp / f"{kind}_labels" / "c1.nii.gz", lab)
    _nifti(inp / "good_images" / "c1.nii.gz", img)
    (inp / "truncated_images" / "c1.nii.gz").write_bytes(
        (inp / "truncated_img.nii.gz").read_bytes()
    )
    (inp / "text_images" / "c1.nii.gz").write_text("these are notes, not data\n" * 20)
    run, _ = model_folder(inp, make_plan(dims=3, depth=2, base=2))
    return World(tmp_path, inp, run)


def _input(w: World, role: str, fault: str) -> Path:
    """The bad path given where the command expects a file of ``role``."""
    names = {"image": ("img", ".nii.gz"), "manifest": ("m", ".json"),
             "msd": ("dataset", ".json"), "pipeline": ("p", ".toml")}  # fmt: skip
    if fault == "empty_folder":
        return w.inp / "empty_folder"
    if role == "folder":
        return w.inp / ("missing_images" if fault == "missing" else f"{fault}_images")
    stem, suffix = names[role]
    return w.inp / f"{fault}_{stem}{suffix}"


def _good(w: World, role: str) -> Path:
    """A good input of ``role``."""
    names = {"image": "img.nii.gz", "manifest": "m.json", "msd": "dataset.json",
             "pipeline": "p.toml", "folder": "good_images"}  # fmt: skip
    return w.inp / names[role]


# Each command: the role of its input, and its argv for an input and an output path.
Argv = Callable[[World, Path, Path], list[str]]
COMMANDS: dict[str, tuple[str, Argv]] = {
    "inspect": ("image", lambda w, i, o: ["inspect", str(i)]),
    "convert": ("image", lambda w, i, o: ["convert", str(i), str(o / "x.nii.gz")]),
    "infer": (
        "image",
        lambda w, i, o: [
            "infer",
            "--volume",
            str(i),
            "--model",
            str(w.model),
            "--output",
            str(o / "pred.nii.gz"),
            "--device",
            "cpu",
        ],
    ),  # fmt: skip
    "evaluate": (
        "image",
        lambda w, i, o: [
            "evaluate",
            "--pred",
            str(w.inp / "lab.nii.gz"),
            "--ref",
            str(i),
            "--out",
            str(o / "report"),
            "--workers",
            "1",
        ],
    ),  # fmt: skip
    "manifest check": ("manifest", lambda w, i, o: ["manifest", "check", str(i)]),
    "manifest import-msd": (
        "msd",
        lambda w, i, o: ["manifest", "import-msd", str(i), "--out", str(o / "m.json")],
    ),
    "manifest import-folders": (
        "folder",
        lambda w, i, o: [
            "manifest",
            "import-folders",
            str(i),
            str(w.inp / "good_labels"),
            "--out",
            str(o / "m.json"),
        ],
    ),  # fmt: skip
    "preprocess": (
        "manifest",
        lambda w, i, o: ["preprocess", "--manifest", str(i), "--out", str(o / "prep")],
    ),
    "train": (
        "pipeline",
        lambda w, i, o: ["train", "--pipeline", str(i), "--out", str(o / "run"), "--device", "cpu"],
    ),  # fmt: skip
}

#: Inputs that are documented to fail as a case of a cohort rather than as the command: the
#: case is listed, the others evaluated (exit 1); evaluate's report then lists the failure.
COHORT_CASE_FAULTS = {("evaluate", "truncated"), ("evaluate", "text")}
#: Output of each writing command for the "exists" fault (None: rerunning is documented to
#: refresh it in place: evaluate rewrites its report, preprocess skips finished cases, train
#: refuses or resumes its run folder).
EXISTING = {
    "convert": "x.nii.gz",
    "infer": "pred.nii.gz",
    "manifest import-msd": "m.json",
    "manifest import-folders": "m.json",
}
WRITERS = ("convert", "infer", "evaluate", "manifest import-msd", "manifest import-folders")
WRITERS += ("preprocess", "train", "demo")


def tree(folder: Path) -> dict[str, str]:
    """SHA-256 of every file and an entry for every folder under ``folder``, by path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
    return out


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("medseg: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path/ro``: a folder on a (simulated) read-only file system for this process."""
    ro = (tmp_path / "ro").resolve()
    ro.mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path: object) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(ro)  # type: ignore[arg-type]
        except TypeError:
            return False

    def erofs(path: object) -> OSError:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))  # type: ignore[arg-type]

    def fake_open(path, flags, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
        if flags & os.O_CREAT and inside(path):
            raise erofs(path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def fake_mkdir(path, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
        if inside(path):
            raise erofs(path)
        return real_mkdir(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    return ro


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every scan read through ``medseg.io.read_volume`` while the test runs."""
    import medseg.io

    seen: list[Path] = []
    real = medseg.io.read_volume

    def counting(path, **kw):  # type: ignore[no-untyped-def]
        seen.append(Path(path))
        return real(path, **kw)

    monkeypatch.setattr(medseg.io, "read_volume", counting)
    return seen


# -- the matrix ------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_input_gives_one_line_naming_it_and_leaves_nothing(
    world: World, command: str, fault: str, capsys: pytest.CaptureFixture[str]
) -> None:
    role, argv = COMMANDS[command]
    bad = _input(world, role, fault)
    out = world.root / "out"
    out.mkdir()
    before = tree(world.root)
    code, _, err = run(argv(world, bad, out), capsys)
    if (command, fault) in COHORT_CASE_FAULTS:
        assert code == 1, err
        assert f"failed: {bad.name.split('.')[0]}" in err and "Traceback" not in err, err
        return
    assert code == 2, err
    line = one_line(err)
    assert bad.name in line, line
    assert tree(world.root) == before  # no new file, folder, lock or temporary; none changed


@pytest.mark.parametrize("command", WRITERS)
def test_unwritable_output_is_refused_before_any_scan_is_read(
    world: World,
    command: str,
    read_only: Path,
    reads: list[Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    role, argv = COMMANDS.get(command, ("image", lambda w, i, o: [command, "--out", str(o / "x")]))
    good = _good(world, role)
    before = tree(world.root)
    code, _, err = run(argv(world, good, read_only), capsys)
    assert code == 2, err
    line = one_line(err)
    assert str(read_only) in line and "read-only file system" in line, line
    assert reads == []  # refused before any work
    assert tree(world.root) == before


@pytest.mark.parametrize("command", list(EXISTING))
def test_existing_output_is_refused_without_overwrite_and_left_as_it_was(
    world: World, command: str, reads: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    role, argv = COMMANDS[command]
    good = _good(world, role)
    out = world.root / "out"
    out.mkdir()
    (out / EXISTING[command]).write_text("precious earlier result\n")
    before = tree(world.root)
    code, _, err = run(argv(world, good, out), capsys)
    assert code == 2, err
    line = one_line(err)
    assert EXISTING[command] in line and "--overwrite" in line, line
    assert reads == []
    assert tree(world.root) == before
    code, _, err = run([*argv(world, good, out), "--overwrite"], capsys)
    assert code == 0, err
    assert (out / EXISTING[command]).read_bytes() != b"precious earlier result\n"


# -- a writer killed mid-write ---------------------------------------------------------------
KILLED_WRITER = """
import sys, time
from pathlib import Path
from medseg import atomic
with atomic.atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half of a scan" * 1000)
    Path(sys.argv[2]).touch()
    time.sleep(600)
"""


def test_sigkill_mid_write_leaves_a_temporary_the_next_command_removes(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    out = world.root / "out"
    out.mkdir()
    target, ready = out / "x.nii.gz", world.root / "ready"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(target), str(ready)], env=env
    )
    try:
        while not ready.exists():
            assert writer.poll() is None, "the writer died before writing"
            time.sleep(0.05)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".x.nii.gz.{writer.pid}.") and ".tmp" in left[0]
    assert not target.exists()  # never half a file under the real name
    code, _, err = run(["convert", str(world.inp / "img.nii.gz"), str(out / "y.nii.gz")], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["y.nii.gz"]  # the dead writer's is gone


# -- settings checked against the model and the manifest before any case is read --------------
def _split_manifest(w: World) -> Path:
    m = json.loads((w.inp / "m.json").read_text())
    m["cases"][0]["split"] = "val"
    m["cases"].append({**m["cases"][0], "case_id": "c2", "split": "test"})
    path = w.inp / "splits.json"
    path.write_text(json.dumps(m))
    return path


@pytest.mark.parametrize("command", ["infer", "evaluate"])
def test_unknown_split_is_refused_listing_the_manifests_splits(
    world: World, command: str, reads: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _split_manifest(world)
    out = world.root / "out"
    out.mkdir()
    argv = {
        "infer": ["infer", "--manifest", str(manifest), "--model", str(world.model),
                  "--output", str(out), "--device", "cpu"],
        "evaluate": ["evaluate", "--manifest", str(manifest), "--pred", str(out),
                     "--out", str(world.root / "report")],
    }[command]  # fmt: skip
    before = tree(world.root)
    code, _, err = run([*argv, "--split", "bogus"], capsys)
    assert code == 2, err
    line = one_line(err)
    assert "'bogus'" in line and "splits: test, val" in line and manifest.name in line, line
    assert reads == [] and tree(world.root) == before


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--tile-size", "3", "give at least"),
        ("--tile-size", "16,16", "needs 1 or 3 sizes"),
        ("--max-memory", "10K", "give at least"),
    ],
)
def test_tile_size_and_memory_budget_that_cannot_work_are_refused_up_front(
    world: World,
    option: str,
    value: str,
    expected: str,
    reads: list[Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = world.root / "out"
    out.mkdir()
    volume = ["--volume", str(world.inp / "img.nii.gz"), "--output", str(out / "p.nii.gz")]
    cohort = ["--input-dir", str(world.inp / "good_images"), "--output", str(out)]
    for inputs in (volume, cohort):
        argv = ["infer", *inputs, "--model", str(world.model), "--device", "cpu"]
        before = tree(world.root)
        code, _, err = run([*argv, option, value], capsys)
        assert code == 2, err
        line = one_line(err)
        assert option in line and expected in line, line
        assert reads == [] and tree(world.root) == before


def test_every_test_docs_robustness_cites_exists() -> None:
    """docs/robustness.md proves each statement by a named test: the names must stay real."""
    import re

    cited = set(
        re.findall(r"\b(test_[a-z0-9_]+)(?![\w.])", (REPO / "docs/robustness.md").read_text())
    )
    defined = set()
    for path in (REPO / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"^def (test_[a-z0-9_]+)\(", path.read_text(), re.M))
    assert len(cited) >= 20 and cited <= defined, sorted(cited - defined)


# -- a full disk, NaN voxels ------------------------------------------------------------------
#: Exit code of each writing command when the disk is full: 2 where the command writes one
#: result, 1 where each case of a cohort fails on its own (preprocess's first write, its log,
#: is not a case: it fails the command).
FULL_DISK = {"convert": 2, "infer": 2, "evaluate": 2, "manifest import-msd": 2,
             "manifest import-folders": 2, "preprocess": 2}  # fmt: skip


@pytest.mark.parametrize("command", list(FULL_DISK))
def test_full_disk_is_one_line_and_leaves_no_file(
    world: World,
    command: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The disk fills while a result is written: a file system with delayed allocation says
    so when the file is synced (ENOSPC from ``fsync``), after the bytes were handed over."""
    role, argv = COMMANDS[command]
    good = _good(world, role)
    out = world.root / "out"
    out.mkdir()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    before = tree(world.root)
    code, _, err = run(argv(world, good, out), capsys)
    assert code == FULL_DISK[command], err
    line = one_line(err)
    assert "disk full while writing to" in line and str(out) in line, line
    assert tree(world.root) == before  # no temporary, no half file, no empty folder


def test_nan_voxels_are_named_by_every_command_that_reads_scans(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    img = nib.load(world.inp / "img.nii.gz").get_fdata().astype(np.float32)
    img[0, 0, 0] = np.nan
    img[1, 1, 1] = np.inf
    _nifti(world.inp / "img.nii.gz", img)  # the manifest's case now has them too
    out = world.root / "out"
    out.mkdir()
    code, _, err = run(["inspect", str(world.inp / "img.nii.gz")], capsys)
    assert code == 0 and "1 NaN, 1 infinite voxels" in err  # described, with a warning
    for command in ("infer", "manifest check"):
        argv = COMMANDS[command][1](world, world.inp / ("m.json" if "manifest" in command
                                                        else "img.nii.gz"), out)  # fmt: skip
        before = tree(world.root)
        code, _, err = run(argv, capsys)
        assert code == 2 and "NaN" in err and "img.nii.gz" in err, err
        assert tree(world.root) == before
    code, _, err = run(COMMANDS["preprocess"][1](world, world.inp / "m.json", out), capsys)
    assert code == 1 and "failed: c1: " in err and "NaN" in err  # the case fails, is named


@pytest.mark.parametrize("command", ["evaluate", "preprocess", "train", "infer cohort"])
def test_a_file_where_the_output_folder_should_be_is_refused_in_one_line(
    world: World, command: str, reads: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = world.root / "out"
    out.mkdir()
    (out / "taken").write_text("a file, not a folder\n")
    if command == "infer cohort":
        argv = ["infer", "--input-dir", str(world.inp / "good_images"), "--model",
                str(world.model), "--output", str(out / "taken"), "--device", "cpu"]  # fmt: skip
    else:
        role, make = COMMANDS[command]
        argv = make(world, _good(world, role), out)
        argv[argv.index("--out") + 1] = str(out / "taken")
    before = tree(world.root)
    code, _, err = run(argv, capsys)
    assert code == 2, err
    line = one_line(err)
    assert "taken: is a file" in line, line
    assert reads == [] and tree(world.root) == before
