"""TokenCake: an agent-aware KV-cache sidecar for multi-agent LLM serving.

Top-level folders map into this namespace: ``daemon/`` is ``tokencake.daemon``,
``clients/`` is ``tokencake.clients``, ``connectors/`` is ``tokencake.connectors`` and
``sim/`` is ``tokencake.sim`` (through the symlinks in this folder). Code shared by every
side of the wire (the protocol and the KV layout) lives here.
"""

from __future__ import annotations

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", "__version__"]
