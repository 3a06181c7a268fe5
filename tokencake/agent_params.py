"""Agent metadata carried in a request's ``kv_transfer_params``: who a request belongs to.

Shared by every side that reads or writes it: the vLLM connector and scheduler, the SGLang
hints, the gateway, the client library's priorities and the simulator's live mode.

vLLM passes ``kv_transfer_params`` through untouched from the OpenAI request body (or from
``SamplingParams(extra_args={"kv_transfer_params": ...})``) to the connector, so it is the
one channel an agent app has into the connector without a fork. TokenCake's keys live under
one namespace key, ``"tokencake"``, so they never collide with other connectors' keys (vLLM's
own P/D keys ``do_remote_prefill`` / ``remote_prefill_cached_tokens`` are left alone).

    {"tokencake": {"app_id": "app-1", "agent_id": "coder", "node": "coder",
                   "importance": 2.0,
                   "tool": {"kind": "pytest", "predicted_s": 8.0}}}

``tool`` says the LLM call ends in a tool call: the connector reports ``tool_call_start``
when the request finishes, and ``tool_call_end`` when the same agent's next request arrives
(or the app reports both itself through ``tokencake.clients.client``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Final

logger = logging.getLogger(__name__)

NAMESPACE: Final = "tokencake"
MAX_ID_CHARS: Final = 256


@dataclass(frozen=True, slots=True)
class ToolHint:
    """The tool call that follows this LLM call."""

    kind: str
    predicted_s: float | None = None


@dataclass(frozen=True, slots=True)
class AgentParams:
    """Who a request belongs to. ``app_id`` and ``agent_id`` are both needed for events."""

    app_id: str
    agent_id: str
    node: str = ""
    importance: float = 1.0
    tool: ToolHint | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.app_id, self.agent_id)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise ValueError(f"{NAMESPACE}.{name} must be a string of 1..{MAX_ID_CHARS} characters")
    return value


def agent_params(kv_transfer_params: dict[str, Any] | None) -> AgentParams | None:
    """Parse the ``tokencake`` namespace; None when absent or malformed.

    Malformed metadata is logged and ignored rather than failing the request: the request is
    still served, only without agent-aware treatment.
    """
    if not kv_transfer_params:
        return None
    raw = kv_transfer_params.get(NAMESPACE)
    if raw is None:
        return None
    try:
        if not isinstance(raw, dict):
            raise ValueError(f"{NAMESPACE} must be an object")
        tool = None
        raw_tool = raw.get("tool")
        if raw_tool is not None:
            if not isinstance(raw_tool, dict):
                raise ValueError(f"{NAMESPACE}.tool must be an object")
            predicted = raw_tool.get("predicted_s")
            if predicted is not None:
                predicted = float(predicted)
                if not math.isfinite(predicted) or predicted < 0:
                    raise ValueError(f"{NAMESPACE}.tool.predicted_s must be >= 0")
            tool = ToolHint(kind=_text(raw_tool.get("kind"), "tool.kind"), predicted_s=predicted)
        importance = float(raw.get("importance", 1.0))
        if not math.isfinite(importance) or importance < 0:
            raise ValueError(f"{NAMESPACE}.importance must be a finite number >= 0")
        node = raw.get("node", "")
        return AgentParams(
            app_id=_text(raw.get("app_id"), "app_id"),
            agent_id=_text(raw.get("agent_id"), "agent_id"),
            node=node if isinstance(node, str) else "",
            importance=importance,
            tool=tool,
        )
    except (TypeError, ValueError) as exc:
        logger.warning("ignoring malformed %s kv_transfer_params: %s", NAMESPACE, exc)
        return None


def kv_transfer_params(
    app_id: str,
    agent_id: str,
    *,
    node: str = "",
    importance: float = 1.0,
    tool_kind: str = "",
    tool_predicted_s: float | None = None,
) -> dict[str, Any]:
    """Build the ``kv_transfer_params`` value for one request.

    Use it as ``extra_body={"kv_transfer_params": kv_transfer_params(...)}`` with the
    ``openai`` client, or ``SamplingParams(extra_args={"kv_transfer_params": ...})`` offline.
    """
    body: dict[str, Any] = {"app_id": app_id, "agent_id": agent_id, "importance": importance}
    if node:
        body["node"] = node
    if tool_kind:
        tool: dict[str, Any] = {"kind": tool_kind}
        if tool_predicted_s is not None:
            tool["predicted_s"] = tool_predicted_s
        body["tool"] = tool
    return {NAMESPACE: body}
