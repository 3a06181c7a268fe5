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


# ---------------------------------------------------------------------- within the vLLM connector

VLLM_FREE = ("tokencake.connectors.vllm.connector_worker", "tokencake.connectors.vllm.lending")
"""The vLLM worker side and its copy paths: ``scripts/gpu-check.sh`` imports and tests them on
a GPU machine that has no vLLM, so nothing they load at import time may import it. vLLM's
message classes are the facade's and ``jobs.py``'s; the worker side only reads them."""

WORKER_FROM_JOBS = frozenset({"CopyJob", "TokenCakeMetadata"})
"""All the worker side takes from ``jobs.py`` (for type checking only): the shipped jobs, not
the scheduler side's book of them."""


def _module_file(module: str) -> Path | None:
    """The file a ``tokencake.`` module loads from; None outside the tree."""
    parts = module.split(".")
    if parts[0] != "tokencake":
        return None
    base = ROOT / parts[1] if len(parts) > 1 and parts[1] in ALLOWED else ROOT / "tokencake"
    rest = parts[2:] if base.name != "tokencake" else parts[1:]
    path = base.joinpath(*rest)
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _import_time_modules(path: Path) -> Iterator[str]:
    """Modules ``path`` imports when it is loaded: not in functions, not for type checkers."""
    stack: list[ast.stmt] = list(ast.parse(path.read_text(), str(path)).body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                stack.extend(node.body)
            stack.extend(node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend([*node.body, *node.orelse, *node.finalbody])
            for handler in node.handlers:
                stack.extend(handler.body)
        elif isinstance(node, ast.ClassDef | ast.With):
            stack.extend(node.body)


def loaded_with(module: str) -> set[str]:
    """Every module importing ``module`` loads, its packages' ``__init__`` included."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in seen:
                continue
            path = _module_file(prefix)
            if path is None and parts[0] == "tokencake":
                continue  # a name imported from a module, not a module
            seen.add(prefix)
            if path is not None:
                todo.extend(_import_time_modules(path))
    return seen


@pytest.mark.parametrize("module", VLLM_FREE)
def test_the_worker_copy_path_loads_without_vllm(module: str) -> None:
    loaded = loaded_with(module)
    assert "tokencake.clients.kv_arena" in loaded  # the walk follows the tree's imports
    assert sorted(m for m in loaded if m.split(".")[0] == "vllm") == []


def test_the_worker_side_takes_only_the_messages_from_jobs() -> None:
    path = ROOT / "connectors/vllm/connector_worker.py"
    taken = {
        alias.name
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "tokencake.connectors.vllm.jobs"
        for alias in node.names
    }
    assert taken == WORKER_FROM_JOBS
    sides = {"tokencake.connectors.vllm.connector_scheduler", "tokencake.connectors.vllm.holds"}
    assert not sides & {m for _, m in _imports(path)}
    assert "tokencake.connectors.vllm.jobs" not in loaded_with(VLLM_FREE[0])


def test_the_import_walk_sees_vllm_through_the_tree() -> None:
    """The walk follows the tree's imports: the facade loads vLLM through ``jobs.py`` (its
    messages' base classes), so a worker side that imported ``jobs.py`` at load time would
    fail the test above."""
    loaded = loaded_with("tokencake.connectors.vllm.connector")
    assert {
        "tokencake.connectors.vllm.jobs",
        "tokencake.connectors.vllm.connector_worker",
    } <= loaded
    assert any(m.split(".")[0] == "vllm" for m in loaded_with("tokencake.connectors.vllm.jobs"))
