"""TokenCake: an agent-aware KV-cache sidecar for multi-agent LLM serving.

Top-level folders map into this namespace: ``daemon/`` is ``tokencake.daemon``,
``clients/`` is ``tokencake.clients``, ``connectors/`` is ``tokencake.connectors`` and
``sim/`` is ``tokencake.sim`` (through the symlinks in this folder; ``CONTRIBUTING.md`` says
why not setuptools' ``package-dir``). What every side shares lives here: the protocol, the KV
layout, the arena segment, agent parameters, the admission guard, CURVE client keys and the
default endpoint. These modules import none of the folders above (``tests/test_layers.py``).
"""

from __future__ import annotations

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", "__version__"]
