"""The documents cannot drift from the CLI: the README walk-through runs exactly as printed, and
every ``medseg`` command shown in README.md and docs/*.md names a real subcommand and options.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer

from medseg.cli import app
from medseg.demo_data import make_case
from medseg.io import read_volume, write_volume
from medseg.volume import Grid, Volume

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
COMMAND_PAGES = ("inspect-convert", "dicom", "manifest", "preprocess", "train", "infer")
COMMAND_PAGES += ("evaluate", "demo", "export")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def walkthrough() -> str:
    """The first ```bash block after ``<!-- walkthrough -->`` in README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    marker = text.index("<!-- walkthrough -->")
    m = _FENCE.search(text, marker)
    assert m is not None and m.group(1) == "bash", "README: no ```bash block after the marker"
    return m.group(2)


def _half(v: Volume) -> Volume:
    """Every second voxel, the affine scaled to match: a phantom small enough to train fast."""
    affine = v.grid.affine.copy()
    affine[:3, :3] *= 2
    arr = np.ascontiguousarray(v.array[:, ::2, ::2, ::2])
    return Volume(arr, Grid(arr.shape[1:], affine), is_label=v.is_label, meta=v.meta)


@pytest.fixture
def scans(tmp_path: Path) -> Path:
    """``scans/images`` and ``scans/labels``: five small demo phantoms (classes 0, 1, 2)."""
    for sub in ("images", "labels"):
        (tmp_path / "scans" / sub).mkdir(parents=True)
    for i in range(5):
        image, label = make_case(0, i)
        write_volume(_half(image), tmp_path / "scans" / "images" / f"case{i:02d}.nii.gz")
        write_volume(_half(label), tmp_path / "scans" / "labels" / f"case{i:02d}.nii.gz")
    return tmp_path


def _medseg_on_path(folder: Path) -> dict[str, str]:
    """An environment whose ``medseg`` runs this checkout's code (not an installed copy)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    shim = bin_dir / "medseg"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m medseg.cli "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def test_readme_walkthrough_runs_as_printed(scans: Path, tmp_path: Path) -> None:
    script = walkthrough()
    env = _medseg_on_path(tmp_path / "tools")
    # one shell for the block (its heredoc spans lines), stopping at the first failing line
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=scans,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f"walk-through failed:\n{done.stdout}\n{done.stderr}"
    assert (scans / "runs" / "mine" / "model.pt").is_file()
    for i in range(5):
        pred = read_volume(scans / "preds" / f"case{i:02d}.nii.gz")
        ref = read_volume(scans / "scans" / "labels" / f"case{i:02d}.nii.gz")
        assert pred.shape == ref.shape and np.allclose(pred.grid.affine, ref.grid.affine)
    summary = json.loads((scans / "report" / "summary.json").read_text())
    assert not summary.get("failed") and (scans / "report" / "report.html").is_file()


def _shell_lines(text: str) -> list[str]:
    """Lines of the ```bash blocks, backslash continuations joined, comments dropped."""
    lines: list[str] = []
    for m in _FENCE.finditer(text):
        if m.group(1) != "bash":
            continue
        for line in m.group(2).replace("\\\n", " ").splitlines():
            lines.append(line.split(" #")[0].strip())
    return lines


def _documented_commands() -> list[tuple[str, list[str]]]:
    """``(file, argv after medseg)`` of every medseg command in README.md and docs/*.md."""
    found = []
    for path in [REPO / "README.md", *DOCS]:
        for line in _shell_lines(path.read_text(encoding="utf-8")):
            words = shlex.split(line) if line else []
            for k, w in enumerate(words):
                if w == "medseg" or (w == "medseg.cli" and k > 0 and words[k - 1] == "-m"):
                    found.append((path.name, words[k + 1 :]))
                    break
    return found


def _resolve(argv: list[str]) -> tuple[Any, list[str]]:
    """The command an argv names (descending into groups) and the words after it."""
    cmd: Any = typer.main.get_command(app)  # typer's own click command objects
    rest = list(argv)
    while hasattr(cmd, "commands"):
        assert rest, f"medseg {' '.join(argv)}: no subcommand"
        sub = cmd.commands.get(rest[0])
        assert sub is not None, f"medseg {' '.join(argv)}: no subcommand {rest[0]!r}"
        cmd, rest = sub, rest[1:]
    return cmd, rest


def test_docs_show_every_command_page_with_commands() -> None:
    pages = {p.stem for p in DOCS}
    assert set(COMMAND_PAGES) <= pages
    shown = {Path(f).stem for f, _ in _documented_commands()}
    assert set(COMMAND_PAGES) <= shown


def test_readme_links_every_docs_page() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    unlinked = [p.name for p in DOCS if f"](docs/{p.name})" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_documented_commands_use_real_subcommands_and_options() -> None:
    commands = _documented_commands()
    assert len(commands) > 30
    for source, argv in commands:
        cmd, rest = _resolve(argv)
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for word in rest:
            if word.startswith("-") and word != "-":
                option = word.split("=")[0]
                assert option in known, f"{source}: medseg {' '.join(argv)}: no option {option}"
