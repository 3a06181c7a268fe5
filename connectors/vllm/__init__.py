"""TokenCake's vLLM connector (out of tree, ``KVConnectorBase_V1``).

Load it with::

    --kv-transfer-config '{"kv_connector": "TokenCakeConnector",
                           "kv_connector_module_path": "tokencake.connectors.vllm.connector",
                           "kv_role": "kv_both"}'

This package imports vLLM only from ``connector`` and ``worker``, so the parameter helpers in
``params`` work (and are tested) without vLLM installed.
"""

from __future__ import annotations

from tokencake.connectors.vllm.params import AgentParams, ToolHint, agent_params, kv_transfer_params

__all__ = ["AgentParams", "ToolHint", "agent_params", "kv_transfer_params"]
