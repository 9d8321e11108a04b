"""The layout of docs/architecture.md, checked on the source: layers import downward only, no
import circles, torch only where tensors are, short functions, process-wide state at the edge,
and a layout picture that names every module."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medseg"

#: Each top-level part of medseg and its layer: a part may import only parts of lower layers.
LAYERS: dict[str, int] = {
    "errors": 0,
    "volume": 1,
    "runtime": 1,
    "config": 1,
    "heap": 1,
    "atomic": 1,
    "io": 2,
    "resample": 2,
    "metrics": 2,
    "runinfo": 2,
    "cohort": 2,
    "manifest": 3,
    "postprocess": 3,
    "model": 3,
    "demo_data": 3,
    "tiling": 4,
    "preprocess": 4,
    "report": 4,
    "inference": 5,
    "training": 6,
    "demo": 7,
    "cli": 8,
}

#: Where ``import torch`` may appear (the rest of medseg starts without it).
TORCH_PARTS = {"model", "inference", "training", "runtime"}

#: Library modules that must not switch the process allocator (the command opts in).
NO_HEAP_SWITCH = ("medseg/training/", "medseg/inference/case.py", "medseg/inference/tiled.py",
                  "medseg/preprocess/")  # fmt: skip


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function, relative ones resolved."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {
        m: {i for i in _imports(p, m) if i in mods and i != m and not m.startswith(f"{i}.")}
        for m, p in mods.items()
    }


def test_every_part_has_a_layer() -> None:
    parts = {_part(m) for m in _modules() if m != "medseg"}
    assert parts <= set(LAYERS), f"add to LAYERS and docs/architecture.md: {parts - set(LAYERS)}"


def test_parts_import_only_lower_layers(graph: dict[str, set[str]]) -> None:
    upward = [
        f"{m} -> {i}"
        for m, deps in graph.items()
        for i in deps
        if m != "medseg" and _part(i) != _part(m) and LAYERS[_part(i)] >= LAYERS[_part(m)]
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(sorted(upward))


def test_no_import_circles_between_modules(graph: dict[str, set[str]]) -> None:
    # a package's __init__ re-exporting its modules is not a circle of its own
    edges = {m: {i for i in d if not i.startswith(f"{m}.")} for m, d in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for i in sorted(edges.get(m, ())):
            if state.get(i) == 1:
                cycles.append([*stack[stack.index(i) :], i])
            elif i not in state:
                visit(i, [*stack, i])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_torch_only_where_tensors_are() -> None:
    users = sorted(
        m
        for m, p in _modules().items()
        if any(i == "torch" or i.startswith("torch.") for i in _imports(p, m))
        and _part(m) not in TORCH_PARTS
    )
    assert not users, f"torch imported outside {sorted(TORCH_PARTS)}: {users}"


def test_nothing_below_the_command_line_imports_it(graph: dict[str, set[str]]) -> None:
    bad = sorted(
        m for m, d in graph.items() if _part(m) != "cli" and any(_part(i) == "cli" for i in d)
    )
    assert not bad, f"library modules importing medseg.cli: {bad}"


def test_no_function_longer_than_120_lines() -> None:
    long = [
        f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for p in _modules().values()
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        and (n.end_lineno or n.lineno) - n.lineno + 1 > 120
    ]
    assert not long, "cut these into steps:\n" + "\n".join(long)


def test_library_does_not_switch_the_allocator() -> None:
    calls = re.compile(r"\b(?:heap\.)?(kept_freed_memory|return_freed_memory)\(")
    bad = []
    for p in _modules().values():
        rel = p.relative_to(ROOT).as_posix()
        if rel.startswith(NO_HEAP_SWITCH):
            code = "\n".join(
                line for line in p.read_text().splitlines() if not line.lstrip().startswith("#")
            )
            bad += [f"{rel}: {m.group(0)}" for m in calls.finditer(_strip_docstrings(code))]
    assert not bad, bad


def _strip_docstrings(code: str) -> str:
    return re.sub(r'"""[\s\S]*?"""', "", code)


def _layout_paths() -> set[str]:
    """The files of the Layout tree in docs/architecture.md, as paths below medseg/ (two
    spaces of indent per folder level; ``name/`` opens a folder)."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    block = doc.split("## Layout", 1)[1].split("```")[1]
    folders: list[str] = []
    paths = set()
    for line in block.splitlines():
        m = re.match(r"^( *)([A-Za-z_0-9]+(?:\.py|/))(\s|$)", line)
        if not m:
            continue
        level = len(m.group(1)) // 2
        folders = folders[:level]
        if m.group(2).endswith("/"):
            folders.append(m.group(2)[:-1])
        else:
            paths.add("/".join([*folders, m.group(2)]))
    return paths


def test_layout_picture_names_every_module() -> None:
    listed = _layout_paths()
    missing = sorted(
        p.relative_to(ROOT).as_posix()
        for p in _modules().values()
        if p.name not in ("__init__.py", "__main__.py")
        and p.relative_to(ROOT).as_posix() not in listed
    )
    assert not missing, f"docs/architecture.md Layout does not show: {missing}"


def test_no_module_in_the_picture_that_does_not_exist() -> None:
    absent = sorted(p for p in _layout_paths() if not (ROOT / p).is_file())
    assert not absent, f"shown in docs/architecture.md but absent: {absent}"


def test_repository_text_is_not_dated_by_work_period() -> None:
    """The project's text speaks of the project: no work periods ("session", "sprint") in the
    README, docs, pipelines, benchmarks or the package; in tests none numbered."""
    shipped = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/*")]
    shipped += [*ROOT.glob("pipelines/*"), *PACKAGE.rglob("*.py")]
    word = re.compile(r"\bsessions?\b|\bwork period\b|\bsprint\b", re.IGNORECASE)
    numbered = re.compile(r"\bsession\s+\d+|\bwork period\b", re.IGNORECASE)
    tests = [f for f in (ROOT / "tests").rglob("*.py") if f.name != "test_architecture.py"]
    hits = [
        f"{f.relative_to(ROOT)}: {m.group(0)}"
        for files, pattern in ((shipped, word), (tests, numbered))
        for f in files
        if f.is_file()
        for m in pattern.finditer(f.read_text(errors="replace"))
    ]
    assert not hits, hits


def test_readme_is_a_short_user_guide() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"


def test_layers_table_matches_the_package() -> None:
    """A part listed in LAYERS that no longer exists would let the checks above pass vacuously."""
    parts = defaultdict(int)
    for m in _modules():
        parts[_part(m)] += 1
    assert set(LAYERS) <= set(parts), set(LAYERS) - set(parts)
