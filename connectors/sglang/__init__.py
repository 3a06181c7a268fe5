"""TokenCake's SGLang connector: a HiCache storage backend and agent-event reporting.

Load the backend with::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "tokencake",
        "module_path": "tokencake.connectors.sglang.backend",
        "class_name": "TokenCakeStorage", "interface_v1": 1}'

Only ``backend`` imports SGLang; the agent-metadata helpers in ``hints`` and the page
copies in ``pages`` work (and are tested) without it. See docs/sglang.md.
"""

from __future__ import annotations

from tokencake.connectors.sglang.hints import (
    AgentCall,
    AgentEventReporter,
    agent_call,
    strip_hints,
)

__all__ = ["AgentCall", "AgentEventReporter", "agent_call", "strip_hints"]
