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
                  "templates"]
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
