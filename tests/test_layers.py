"""Dependencies point one way: protocol, then daemon, then clients, then connectors, then sim
and bench (CONTRIBUTING.md, "Layers").

Every import in the tree is read with ``ast`` (lazy imports inside functions included) and
checked against the table below. The shared modules directly under ``tokencake/`` (the
protocol, the KV layout, the arena segment, agent parameters, the admission guard...) are
the bottom layer: every side may import them, they import none of the sides. The daemon is
a separate process: clients and connectors reach it over the wire, never by importing it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SHARED = "tokencake"
"""The modules under ``tokencake/`` (not the folders linked there)."""

ALLOWED: dict[str, frozenset[str]] = {
    SHARED: frozenset({SHARED}),
    "daemon": frozenset({SHARED, "daemon"}),
    "clients": frozenset({SHARED, "clients"}),
    "connectors": frozenset({SHARED, "clients", "connectors"}),
    "sim": frozenset({SHARED, "daemon", "clients", "sim"}),
    "bench": frozenset({SHARED, "daemon", "clients", "connectors", "sim", "bench"}),
}
"""Layer -> the layers its modules may import. ``tests/`` may import anything."""

EXCEPTIONS: frozenset[tuple[str, str]] = frozenset(
    {
        # ``tokencake-ctl policies`` lists the policies a daemon installed here could run,
        # without a daemon: it reads the daemon's policy registry (a lazy import).
        ("clients/ctl.py", "tokencake.daemon.scheduler.policy"),
    }
)
"""(file, imported module) pairs allowed across the table, each with its reason."""

LAYERS = frozenset(ALLOWED) | {"tests"}


def _layer_of_module(module: str) -> str | None:
    """The layer an imported module belongs to; None for third-party and stdlib."""
    parts = module.split(".")
    if parts[0] == "tokencake":
        return parts[1] if len(parts) > 1 and parts[1] in LAYERS else SHARED
    return parts[0] if parts[0] in LAYERS else None


def _sources(layer: str) -> Iterator[Path]:
    if layer == SHARED:
        # Its own modules and real subpackages (tokencake/gpu/), not the linked folders.
        shared = (ROOT / "tokencake").rglob("*.py")
        yield from sorted(
            f for f in shared if f.relative_to(ROOT / "tokencake").parts[0] not in LAYERS
        )
    else:
        yield from sorted((ROOT / layer).rglob("*.py"))


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def violations(layer: str) -> list[str]:
    out = []
    for path in _sources(layer):
        rel = path.relative_to(ROOT).as_posix()
        for lineno, module in _imports(path):
            target = _layer_of_module(module)
            if target is None or target in ALLOWED[layer] or (rel, module) in EXCEPTIONS:
                continue
            out.append(f"{rel}:{lineno}: {layer} imports {module} ({target})")
    return out


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_point_down_the_layers(layer: str) -> None:
    assert violations(layer) == []


def test_every_exception_is_still_needed() -> None:
    """An exception whose import is gone is deleted from the table, not kept."""
    seen = set()
    for file, module in EXCEPTIONS:
        if any(m == module for _, m in _imports(ROOT / file)):
            seen.add((file, module))
    assert seen == EXCEPTIONS


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The walk finds lazy imports inside functions, and maps both spellings of a layer."""
    src = tmp_path / "m.py"
    src.write_text(
        "def f():\n    from tokencake.daemon.arena import Arena\n    import tests.procs\n"
    )
    found = [_layer_of_module(m) for _, m in _imports(src)]
    assert found == ["daemon", "tests"]
    assert _layer_of_module("tokencake.protocol") == SHARED
    assert _layer_of_module("daemon.server") == "daemon"
    assert _layer_of_module("numpy") is None
