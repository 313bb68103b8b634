"""The layering the README describes, checked on the source: the pipeline steps and the encoders
never import the adapters (not even inside a function), so data flows one way, adapters in ->
pipeline -> adapters out, and no import loop runs between the two packages through them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Pure computation on arrays (README "Layout", layer 2).
PIPELINE_STEPS = ["flatten", "segment", "detect", "channel", "normalise", "descriptors", "match", "selection",
                  "templates", "lattice", "fewshot"]
#: Layer 1: data types, errors, configuration.
CORE = ["domain", "errors", "config", "jsonsafe"]


def imported_modules(path: Path) -> set[str]:
    """Every module an file imports, at the top or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("name", PIPELINE_STEPS + CORE)
def test_pipeline_steps_and_core_import_no_adapter(name):
    path = REPO / "agent" / f"{name}.py"
    if not path.exists():
        pytest.fail(f"{path} listed in tests/test_layering.py but missing: update the list")
    bad = sorted(m for m in imported_modules(path) if m.startswith("stm_agent.adapters"))
    assert not bad, f"agent/{name}.py imports {bad}: a pipeline step must not reach the outside world"


def test_core_imports_no_pipeline_step():
    for name in CORE:
        bad = sorted(m for m in imported_modules(REPO / "agent" / f"{name}.py")
                     if m.rsplit(".", 1)[-1] in PIPELINE_STEPS and m.startswith("stm_agent.agent"))
        assert not bad, f"agent/{name}.py imports {bad}"


@pytest.mark.parametrize("path", sorted((REPO / "models").glob("*.py")), ids=lambda p: p.name)
def test_encoders_import_no_adapter(path):
    bad = sorted(m for m in imported_modules(path) if m.startswith("stm_agent.adapters"))
    assert not bad, f"models/{path.name} imports {bad}"


@pytest.mark.parametrize("path", sorted((REPO / "adapters").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_adapters_import_no_daemon_cli_or_evaluation(path):
    top = ("daemon", "cli", "batch", "evaluation")
    bad = sorted(m for m in imported_modules(path)
                 if m.startswith("stm_agent.agent.") and m.split(".")[2].startswith(top))
    assert not bad, f"{path.relative_to(REPO)} imports {bad}: adapters are called by the daemon, never the reverse"


def _module_graph() -> dict[str, set[str]]:
    """stm_agent module -> the stm_agent modules it imports (at the top or inside functions)."""
    mods = {}
    for pkg in ("agent", "adapters", "models", "config"):
        for p in (REPO / pkg).rglob("*.py"):
            name = "stm_agent." + ".".join(p.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    graph = {}
    for name, p in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stm_agent"):
                deps |= {m for m in [node.module] + [f"{node.module}.{a.name}" for a in node.names] if m in mods}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
        graph[name] = deps - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_loop_between_agent_and_adapters():
    """No chain of imports (lazy ones included) leads from an adapter back to itself through the
    agent package, or the reverse: a reader never has to follow imports back and forth."""
    mixed = [sorted(c) for c in _cycles(_module_graph())
             if any(m.startswith("stm_agent.adapters") for m in c) and any(m.startswith("stm_agent.agent") for m in c)]
    assert not mixed, f"import loops between agent/ and adapters/: {mixed}"
