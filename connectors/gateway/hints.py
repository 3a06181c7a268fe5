"""What an app may declare about a request, in TokenCake's own fields or the upstream proposals'.

Declared beats inferred: a conversation id, app id, DAG node, importance or predicted tool
time given here wins over what the gateway would infer. Sources, highest precedence first:

1. TokenCake's headers: ``X-TokenCake-Conversation``, ``X-TokenCake-App``,
   ``X-TokenCake-Node``, ``X-TokenCake-Importance``, ``X-TokenCake-Tool-Time`` (seconds),
   ``X-TokenCake-Parent`` (comma-separated conversation ids this one follows).
2. vLLM's proposals: ``agent_hint`` (session id, parent session id, ``cache_control.ttl``)
   and the retention directives (``retention_directives[].priority``/``duration``,
   ``retention_scope``).
3. SGLang's ``agent_hints`` (``workflow_id``, ``agent_id``, ``step_id``, ``parent_step_id``,
   ``expected_tool_duration_ms``, ``cache_ttl_ms``), top level or under ``nvext``, read by
   the SGLang connector's parser (``connectors/sglang/hints.py``).
4. ``nvext.agent_hints``'s own fields (``priority``, NeMo Agent Toolkit's ``prefix_id``) and
   Dynamo's ``X-Dynamo-Session-ID`` header.
5. The OpenAI ``user`` field, then ``metadata.conversation_id`` / ``metadata.session_id``.

A request whose ``kv_transfer_params`` already carries the ``tokencake`` namespace is managed
by the app itself (``tokencake/agent_params.py``): the gateway forwards it untouched and sends
no events for it, so nothing is reported twice.

Malformed TokenCake headers are the client's error (``HintError``: HTTP 400). Malformed
upstream-proposal fields belong to the engine, which judges them itself: they are ignored here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from tokencake.agent_params import MAX_ID_CHARS, NAMESPACE
from tokencake.connectors.sglang.hints import AgentCall, agent_call

logger = logging.getLogger(__name__)

H_CONVERSATION: Final = "X-TokenCake-Conversation"
H_APP: Final = "X-TokenCake-App"
H_NODE: Final = "X-TokenCake-Node"
H_IMPORTANCE: Final = "X-TokenCake-Importance"
H_TOOL_TIME: Final = "X-TokenCake-Tool-Time"
H_PARENT: Final = "X-TokenCake-Parent"
H_DYNAMO_SESSION: Final = "X-Dynamo-Session-ID"

RETENTION_PRIORITY_PER_IMPORTANCE: Final = 50.0
"""vLLM retention priority (0..100) per unit of TokenCake importance: 50 is the default 1.0."""
NVEXT_PRIORITY_PER_IMPORTANCE: Final = 10.0
"""``nvext.agent_hints.priority`` p maps to importance 1 + p / 10."""


class HintError(ValueError):
    """A TokenCake header the gateway cannot read; the client gets HTTP 400."""


@dataclass(slots=True)
class Declared:
    conversation: str = ""
    rule: str = ""
    """Where ``conversation`` came from: header, agent_hint, retention_scope, agent_hints,
    nvext, user, metadata (empty: not declared)."""
    app_id: str = ""
    node: str = ""
    importance: float | None = None
    tool_s: float | None = None
    """Predicted duration of the tool call this LLM call may end in."""
    ttl_s: float | None = None
    """How long the app asks the KV be kept (retention TTL): a bound on the tool time."""
    parents: tuple[str, ...] = ()
    """Conversation ids this conversation follows (declared DAG edges)."""
    step_id: str = ""
    parent_step: str = ""
    managed: bool = False
    tenant: str = ""
    """Whose request this is (``tenants.py``); set by the tracker, not declared."""

    def predicted_tool_s(self) -> float | None:
        return self.tool_s if self.tool_s is not None else self.ttl_s


def _id(value: Any) -> str:
    """A usable id (non-empty string or integer, at most MAX_ID_CHARS), else ''."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return ""
    text = str(value).strip()
    return text if 0 < len(text) <= MAX_ID_CHARS else ""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def _header_number(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        number = float(raw)
    except ValueError:
        raise HintError(f"{name} must be a number, got {raw[:32]!r}") from None
    if not math.isfinite(number) or number < 0:
        raise HintError(f"{name} must be a finite number >= 0, got {raw[:32]!r}")
    return number


def _header_id(headers: Mapping[str, str], name: str) -> str:
    raw = headers.get(name)
    if raw is None:
        return ""
    value = _id(raw)
    if not value:
        raise HintError(f"{name} must be 1..{MAX_ID_CHARS} characters")
    return value


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _sglang(body: dict[str, Any], nvext_hints: dict[str, Any]) -> AgentCall | None:
    """SGLang's ``agent_hints`` (top level, or SGLang-style under ``nvext``), read by the
    SGLang connector's own parser so both read them alike."""
    raw = body.get("agent_hints")
    if raw is None and "workflow_id" not in nvext_hints:
        return None  # Dynamo's own nvext hints (priority, osl...) are read in declared()
    sub: dict[str, Any] = {"agent_hints": raw if raw is not None else nvext_hints}
    for key in ("session_params", "rid"):
        if key in body:
            sub[key] = body[key]
    return agent_call(sub)


def declared(headers: Mapping[str, str], body: dict[str, Any]) -> Declared:
    """Everything ``headers`` and ``body`` declare; raises HintError on a bad TokenCake header.

    Lowest precedence first; each later source overwrites what it names.
    """
    d = Declared()
    d.managed = NAMESPACE in _obj(body.get("kv_transfer_params"))
    nv = _from_metadata_and_dynamo(d, headers, body)
    _from_sglang(d, body, nv)
    _from_retention(d, body)
    _from_agent_hint(d, body)
    _from_headers(d, headers)
    return d


def _from_metadata_and_dynamo(
    d: Declared, headers: Mapping[str, str], body: dict[str, Any]
) -> dict[str, Any]:
    """OpenAI's ``metadata`` and ``user``, then Dynamo's ``nvext`` hints and session header;
    returns the ``nvext.agent_hints`` object."""
    metadata = _obj(body.get("metadata"))
    for key in ("conversation_id", "session_id"):
        if _id(metadata.get(key)):
            d.conversation, d.rule = _id(metadata.get(key)), "metadata"
            break
    if _id(body.get("user")):
        d.conversation, d.rule = _id(body.get("user")), "user"
    nv = _obj(_obj(body.get("nvext")).get("agent_hints"))
    if _id(nv.get("prefix_id")):
        d.conversation, d.rule = _id(nv.get("prefix_id")), "nvext"
    priority = _number(nv.get("priority"))
    if priority is not None:
        d.importance = 1.0 + priority / NVEXT_PRIORITY_PER_IMPORTANCE
    if _id(headers.get(H_DYNAMO_SESSION)):
        d.conversation, d.rule = _id(headers.get(H_DYNAMO_SESSION)), "header"
    return nv


def _from_sglang(d: Declared, body: dict[str, Any], nv: dict[str, Any]) -> None:
    sg = _sglang(body, nv)
    if sg is None:
        return
    d.app_id, d.node = sg.params.app_id, sg.params.agent_id
    d.conversation, d.rule = f"{d.app_id}/{d.node}", "agent_hints"
    d.step_id, d.parent_step = sg.request_id, sg.parent_step_id
    if sg.params.tool is not None and sg.params.tool.predicted_s is not None:
        d.tool_s = sg.params.tool.predicted_s
    if sg.cache_ttl_ms is not None:
        d.ttl_s = sg.cache_ttl_ms / 1000.0


def _from_retention(d: Declared, body: dict[str, Any]) -> None:
    directives = body.get("retention_directives")
    if isinstance(directives, list) and directives:
        priorities = [_number(_obj(x).get("priority")) for x in directives]
        durations = [_number(_obj(x).get("duration")) for x in directives]
        top = max((x for x in priorities if x is not None), default=None)
        if top is not None:
            d.importance = top / RETENTION_PRIORITY_PER_IMPORTANCE
        ttl = max((x for x in durations if x is not None), default=None)
        if ttl is not None:
            d.ttl_s = ttl
    if _id(body.get("retention_scope")):
        d.conversation, d.rule = _id(body.get("retention_scope")), "retention_scope"


def _from_agent_hint(d: Declared, body: dict[str, Any]) -> None:
    vh = _obj(body.get("agent_hint"))
    if _id(vh.get("session_id")):
        d.conversation, d.rule = _id(vh.get("session_id")), "agent_hint"
    if _id(vh.get("parent_session_id")):
        d.parents = (_id(vh.get("parent_session_id")),)
    ttl = _number(_obj(vh.get("cache_control")).get("ttl"))
    if ttl is not None:
        d.ttl_s = ttl


def _from_headers(d: Declared, headers: Mapping[str, str]) -> None:
    """TokenCake's own headers, the highest precedence; a malformed one is a HintError."""
    conversation = _header_id(headers, H_CONVERSATION)
    if conversation:
        d.conversation, d.rule = conversation, "header"
    d.app_id = _header_id(headers, H_APP) or d.app_id
    d.node = _header_id(headers, H_NODE) or d.node
    importance = _header_number(headers, H_IMPORTANCE)
    if importance is not None:
        d.importance = importance
    tool_s = _header_number(headers, H_TOOL_TIME)
    if tool_s is not None:
        d.tool_s = tool_s
    raw_parents = headers.get(H_PARENT)
    if raw_parents is not None:
        parents = tuple(_id(x) for x in raw_parents.split(",") if x.strip())
        if not parents or not all(parents):
            raise HintError(f"{H_PARENT} must be comma-separated ids of 1..{MAX_ID_CHARS} chars")
        d.parents = parents
