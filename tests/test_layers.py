"""The house's rules, enforced (REDESIGN.md, "Import rules"): layers import only downward, stage
packages only earlier stages, Prefect only at the edges, and no module grows past 450 lines.

Read from the source with ``ast`` (every import, also one inside a function), so a rule broken
anywhere fails here, not in a reviewer's head.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top to bottom; a module may import its own package and anything on a lower layer.
LAYERS: list[set[str]] = [
    {"cli"},
    {"deployments"},
    {"flows"},
    {"tasks"},
    {"ingest", "embed", "reminders", "training", "evaluation", "memory"},
    {"llmcalls"},
    {"storage"},
    {"schemas"},
]
LAYER = {pkg: depth for depth, pkgs in enumerate(LAYERS) for pkg in pkgs}
# Stages in DAG order: each may import the stages before it. memory sits beside them and may use embed.
STAGE_ORDER = ["ingest", "embed", "reminders", "training", "evaluation"]
STAGE_MAY_USE = {s: set(STAGE_ORDER[:i]) for i, s in enumerate(STAGE_ORDER)} | {"memory": {"ingest", "embed"}}
PREFECT_ALLOWED = {"flows", "tasks", "deployments", "cli"}
MAX_LINES = 450


def _modules(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


PACKAGES = sorted(LAYER)


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_down_the_layers_only(package):
    wrong = []
    for path in _modules(package):
        for line, name in _imports(path):
            top = name.split(".")[0]
            if top not in LAYER or top == package:
                continue
            same_layer = LAYER[top] == LAYER[package]
            upward = LAYER[top] < LAYER[package]
            if upward or (same_layer and top not in STAGE_MAY_USE.get(package, set())):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


@pytest.mark.parametrize("package", sorted(set(PACKAGES) - PREFECT_ALLOWED))
def test_prefect_stays_at_the_edges(package):
    wrong = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in _modules(package)
             for line, name in _imports(p) if name.split(".")[0] in ("prefect", "prefect_dask")]
    assert not wrong, "Prefect imported in a pure package:\n" + "\n".join(wrong)


def test_no_module_is_longer_than_the_rule():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in _modules(*PACKAGES, "tests", "benchmarks")
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines (split them by job):\n" + "\n".join(long)


def test_no_move_is_half_done():
    shims = [str(p.relative_to(ROOT)) for p in _modules(*PACKAGES, "tests", "benchmarks")
             if p.read_text().startswith("# SHIM")]
    assert not shims, f"modules that only re-export moved names: {shims}"


def test_the_rules_catch_a_violation(tmp_path, monkeypatch):
    """The checks above can fail: a planted upward import and a planted Prefect import are found."""
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "bad.py").write_text("from tasks.runtime import logger\nimport prefect\n")
    with pytest.raises(AssertionError, match="storage/bad.py:1 imports tasks.runtime"):
        test_imports_go_down_the_layers_only("storage")
    with pytest.raises(AssertionError, match="storage/bad.py:2 imports prefect"):
        test_prefect_stays_at_the_edges("storage")
