"""Plug-in registries by entry points: the built-ins come from the installed package's
metadata, a third-party distribution on the path adds its own, ``register`` overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokencake.daemon import eviction
from tokencake.daemon.l2.backends import backend_names
from tokencake.daemon.scheduler.policy import list_policies
from tokencake.plugins import Registry


def test_builtins_are_declared_as_entry_points() -> None:
    assert Registry("tokencake.eviction").names() == ["lru"]
    assert set(backend_names()) == {"redis", "valkey", "redis-cluster", "valkey-cluster", "disk"}
    infos = {info.name: info for info in list_policies()}
    assert infos["kvflow"].class_name == "KvFlowPolicy" and infos["kvflow"].summary


def test_a_third_party_distribution_plugs_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dist = tmp_path / "tc_thirdparty-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tc-thirdparty\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[tokencake.eviction]\nfifo = tc_thirdparty:Fifo\n")
    (tmp_path / "tc_thirdparty.py").write_text(
        "from tokencake.daemon.eviction import LruPolicy\n\n\n"
        "class Fifo(LruPolicy):\n    name = 'fifo'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("tokencake.eviction")
    assert registry.names() == ["fifo", "lru"]
    fifo = registry.load("fifo")
    assert isinstance(fifo, type) and fifo.__name__ == "Fifo"


def test_register_overrides_and_unknown_names_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry("tokencake.eviction")
    registry.register("lru", "tokencake.daemon.eviction:EvictionPolicy")
    assert registry.load("lru") is eviction.EvictionPolicy
    with pytest.raises(ValueError, match="module:Attribute"):
        registry.register("x", "no_colon")
    with pytest.raises(KeyError):
        registry.load("nope")
    with pytest.raises(KeyError, match=r"eviction policy 'nope'; known: .*'lru'"):
        eviction.make_policy("nope")
