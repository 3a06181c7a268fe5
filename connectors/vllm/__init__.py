"""TokenCake's vLLM connector (out of tree, ``KVConnectorBase_V1``).

Load it with::

    --kv-transfer-config '{"kv_connector": "TokenCakeConnector",
                           "kv_connector_module_path": "tokencake.connectors.vllm.connector",
                           "kv_role": "kv_both"}'

The agent parameters an app attaches to a request (``kv_transfer_params``) are shared by
every connector and live in ``tokencake.agent_params``; they are re-exported here, and work
without vLLM installed.
"""

from __future__ import annotations

from tokencake.agent_params import AgentParams, ToolHint, agent_params, kv_transfer_params

__all__ = ["AgentParams", "ToolHint", "agent_params", "kv_transfer_params"]
