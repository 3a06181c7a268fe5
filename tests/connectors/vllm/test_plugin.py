"""The ``vllm.general_plugins`` entry point, loaded the way vLLM loads it."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pytest

pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm


def test_general_plugin_makes_the_connector_findable_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import vllm.plugins
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from tokencake.connectors.vllm.connector import TokenCakeConnector

    entry = importlib.metadata.EntryPoint(
        name="tokencake",
        value="tokencake.connectors.vllm.plugin:register",
        group=vllm.plugins.DEFAULT_PLUGINS_GROUP,
    )
    real = importlib.metadata.entry_points

    def entry_points(**kw: str) -> Any:
        if kw.get("group") == vllm.plugins.DEFAULT_PLUGINS_GROUP:
            return importlib.metadata.EntryPoints([entry])
        return real(**kw)

    # What `pip install tokencake[vllm]` would put in the package metadata.
    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    # An engine built earlier in this process may have run the installed entry point already.
    registry = {k: v for k, v in KVConnectorFactory._registry.items() if k != "TokenCakeConnector"}
    monkeypatch.setattr(KVConnectorFactory, "_registry", registry)
    config = KVTransferConfig(kv_connector="TokenCakeConnector", kv_role="kv_both")
    with pytest.raises(ValueError, match="Unsupported connector"):
        KVConnectorFactory.get_connector_class(config)
    vllm.plugins.load_general_plugins()  # what EngineCore and each worker call at start
    assert KVConnectorFactory.get_connector_class(config) is TokenCakeConnector
    from tokencake.connectors.vllm.plugin import register

    register()  # a second load in the same process is harmless
