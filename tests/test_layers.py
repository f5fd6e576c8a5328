"""The package's imports go one way, down ../shared/DESIGN.md's layer table, and no modules import each other.

Reads every ``import`` of ``pipeline/`` and ``jobs/`` with ``ast`` (function-local ones too:
they are dependencies all the same) and fails on an import of a higher layer or a cycle.

Layers, lowest first. DESIGN.md's table puts eval beside train; here eval sits below
mining, because the miner's refresh embeds exemplar shards with eval's ``Embedder``
(``pipeline/eval/embed.py``) and nothing in eval needs the miner or the trainer.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [
    {"pipeline.config", "pipeline.deps"},
    {"pipeline.runtime", "pipeline.tracking"},
    {"pipeline.data"},
    {"pipeline.models"},
    {"pipeline.losses"},
    {"pipeline.eval"},
    {"pipeline.mining"},
    {"pipeline.train"},
    {"jobs"},
]


def _layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    if module == "pipeline":
        return 0
    raise AssertionError(f"module {module} is in no layer of tests/test_layers.py")


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("pipeline", "jobs"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in known:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(p, known) - {m} for m, p in mods.items()}


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
              for m, deps in _graph().items() for d in sorted(deps) if _layer(d) > _layer(m)]
    assert upward == []


def test_no_import_cycles():
    graph = {m: {d for d in deps if not graph_key_is_package(d, m)} for m, deps in _graph().items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def graph_key_is_package(dep: str, importer: str) -> bool:
    """A package's ``__init__`` re-exports its modules; a module importing its own package's
    name (``from pipeline.losses import ...`` inside ``pipeline.losses.x``) is not a cycle of design."""
    return importer.startswith(dep + ".")


def test_the_checker_sees_a_known_import():
    # Guards against a checker that finds nothing: the driver imports the stream.
    assert "pipeline.data.stream" in _graph()["pipeline.train.driver"]
