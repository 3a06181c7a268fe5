"""vLLM general plugin: makes ``kv_connector="TokenCakeConnector"`` resolve by name.

vLLM runs every ``vllm.general_plugins`` entry point in each process it starts (engine core
and workers) before it builds a KV connector, so registering the name with
``KVConnectorFactory`` here is enough; no ``kv_connector_module_path`` is then needed.
Installed through this entry point in ``pyproject.toml``::

    [project.entry-points."vllm.general_plugins"]
    tokencake = "tokencake.connectors.vllm.plugin:register"
"""

from __future__ import annotations

import logging

# Under vLLM's "vllm" logger, so these lines appear in vLLM's output, in its format.
logger = logging.getLogger(f"vllm.{__name__}")

CONNECTOR_NAME = "TokenCakeConnector"
CONNECTOR_MODULE = "tokencake.connectors.vllm.connector"


def register() -> None:
    """Register the connector by name (lazily imported). Safe to call more than once."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
    except ValueError:
        logger.debug("%s is registered already", CONNECTOR_NAME)
