"""The package's structure, read from its own source with `ast`: layers only look down, no import cycle.

Every import counts, including those inside functions (a lazy import of a heavy module is fine; one
that hides a cycle or reaches up a layer is not).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

PACKAGE = Path(os.environ.get("STRUCTURE_PACKAGE", Path(__file__).resolve().parents[1] / "instantid_lab"))

#: The core: the method itself. It never imports the miniature, the tiny stack or the UI.
CORE = ("errors", "types", "building", "data", "images", "keypoints", "embeddings", "adapter", "attention",
        "identitynet", "references", "checkpoint", "face_analysis", "pipeline", "loading")
#: Above the core: the miniature, the experiments, the tiny test stack, and the top (worlds, viz, widgets, notebooks).
UPPER = ("miniature", "experiments", "tiny", "worlds", "viz", "widgets", "notebooks")
#: The top: what notebooks and people call; nothing in the core, the miniature or the experiments imports it.
TOP = ("worlds", "viz", "widgets", "notebooks")
#: The miniature's own layers, bottom-up; a module imports only from its layer or below.
MINIATURE_LAYERS = [
    ("world",),
    ("recognizer", "inspector", "autoencoder", "base", "instantid", "objective"),
    ("evaluate", "analyzer"),
    ("training",),
    ("train", "curves", "demo"),
]
#: Hand-written modules may not exceed this many lines (the dlib ports follow dlib's own layout).
MAX_LINES, PORTS = 450, ("face_analysis.dlib_mmod", "face_analysis.dlib_resnet")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules an import statement of module `importer` names (third-party ones left out)."""
    if isinstance(node, ast.Import):
        return [n.name.removeprefix("instantid_lab.") for n in node.names if n.name.startswith("instantid_lab")]
    if node.level == 0:
        if not (node.module or "").startswith("instantid_lab"):
            return []
        base = node.module.removeprefix("instantid_lab").lstrip(".")
    else:
        here = importer.split(".") if importer else []
        is_package = MODULES.get(importer, Path()).name == "__init__.py"
        anchor = here if is_package else here[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    found = []
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        found.append(sub if sub in MODULES else base)
    return found


def imports_of(name: str) -> set[str]:
    tree = ast.parse(MODULES[name].read_text())
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            targets.update(t for t in resolve(name, node) if t != name)
    return targets


GRAPH = {name: imports_of(name) for name in MODULES}


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_import_reader_sees_the_package():
    assert {"pipeline.instantid", "miniature.training.loop", "face_analysis.registry", "worlds"} <= set(MODULES)
    assert "pipeline.instantid" in GRAPH["pipeline"]
    assert "miniature.objective" in GRAPH["miniature.training.instantid"]
    assert {"miniature.base", "miniature.instantid"} <= GRAPH["miniature.training.instantid"]


def test_the_package_has_no_import_cycle():
    state, stack, cycles = {}, [], []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if top(n) in CORE))
def test_the_core_imports_nothing_from_the_miniature_tiny_or_ui(name):
    upward = sorted(t for t in GRAPH[name] if top(t) in UPPER)
    assert upward == [], f"{name} imports {upward}"


def miniature_layer(name: str) -> int:
    part = name.split(".")[1]
    return next(k for k, layer in enumerate(MINIATURE_LAYERS) if part in layer)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("miniature.")))
def test_miniature_modules_import_only_their_layer_or_below(name):
    mine = miniature_layer(name)
    above = sorted(t for t in GRAPH[name] if t.startswith("miniature.") and miniature_layer(t) > mine)
    assert above == [], f"{name} (layer {mine}) imports {above}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if top(n) in ("miniature", "experiments")))
def test_the_miniature_and_the_experiments_never_import_the_top_or_tiny(name):
    assert not any(top(t) in (*TOP, "tiny") for t in GRAPH[name]), sorted(GRAPH[name])
    if top(name) == "miniature":
        assert not any(top(t) == "experiments" for t in GRAPH[name]), "the miniature sits below the experiments"


def test_every_module_is_in_a_layer():
    assert {top(n) for n in MODULES if n} <= set(CORE) | set(UPPER)
    assert all(miniature_layer(n) >= 0 for n in MODULES if n.startswith("miniature."))


def test_hand_written_modules_stay_short():
    long = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES and n not in PORTS} == {}


def test_the_pipeline_call_is_a_short_chain_of_stages():
    tree = ast.parse(MODULES["pipeline.instantid"].read_text())
    call = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__call__")
    body_start = call.body[1].lineno if ast.get_docstring(call) else call.body[0].lineno
    assert call.end_lineno - body_start + 1 <= 50
