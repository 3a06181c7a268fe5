"""Agent metadata on SGLang requests, and the daemon events it stands for.

SGLang 0.5.23 hands a storage backend page keys and host indices only: no request id, no
session, no hints. So agent events reach the daemon from the app's side of SGLang. This
module reads an agent's metadata from the request body the app sends to SGLang, in either
vocabulary, and reports the events with the client library's session helper
(``tokencake.clients.client``):

- TokenCake's own keys, as the vLLM connector reads them from ``kv_transfer_params``::

      {"tokencake": {"app_id": "app-1", "agent_id": "coder", "importance": 2.0,
                     "tool": {"kind": "pytest", "predicted_s": 8.0}}}

- SGLang's proposed ``agent_hints`` (sgl-project/sglang PR #29174, not merged in 0.5.23),
  at the top level or under ``nvext``::

      {"agent_hints": {"workflow_id": "app-1", "agent_id": "coder", "step_id": "s3",
                       "parent_step_id": "s2", "expected_tool_duration_ms": 8000,
                       "cache_ttl_ms": 60000, "reuse_hint": "keep"}}

  ``workflow_id`` is the app, ``step_id`` the request id, and ``expected_tool_duration_ms``
  says the call ends in a tool call of about that length. ``cache_ttl_ms``, ``reuse_hint``
  and ``parent_step_id`` are read and kept on the ``AgentCall``; no daemon op takes them
  yet, so they change nothing.

- An SGLang session (``session_params.id``) names the agent when the hints name none.

SGLang's OpenAI endpoints ignore unknown top-level fields; its ``/generate`` endpoint
refuses them, so send ``strip_hints(body)`` there.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from tokencake import protocol as p
from tokencake.agent_params import MAX_ID_CHARS, AgentParams, ToolHint, agent_params
from tokencake.clients.client import AgentSession, AppSession, LlmCallHandle, TokenCakeClient

logger = logging.getLogger(__name__)

HINT_KEYS: Final = ("tokencake", "agent_hints")
DEFAULT_TOOL_KIND: Final = "tool"


@dataclass(frozen=True, slots=True)
class AgentCall:
    """One LLM call's agent metadata, in TokenCake's terms."""

    params: AgentParams
    request_id: str = ""
    parent_step_id: str = ""
    cache_ttl_ms: float | None = None
    reuse_hint: str = ""
    source: str = "tokencake"


def _id(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise ValueError(f"agent_hints.{name} must be a string of 1..{MAX_ID_CHARS} characters")
    return value


def _opt_id(value: Any, name: str) -> str:
    return "" if value is None else _id(value, name)


def _ms(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"agent_hints.{name} must be a number")
    ms = float(value)
    if not math.isfinite(ms) or ms < 0:
        raise ValueError(f"agent_hints.{name} must be a finite number >= 0")
    return ms


def _session_id(body: Mapping[str, Any]) -> str:
    session = body.get("session_params")
    sid = session.get("id") if isinstance(session, Mapping) else None
    return sid if isinstance(sid, str) and 0 < len(sid) <= MAX_ID_CHARS else ""


def _from_agent_hints(raw: Any, body: Mapping[str, Any]) -> AgentCall:
    if not isinstance(raw, Mapping):
        raise ValueError("agent_hints must be an object")
    agent = raw.get("agent_id")
    agent_id = _id(agent, "agent_id") if agent is not None else _session_id(body)
    if not agent_id:
        raise ValueError("agent_hints needs agent_id (or session_params.id)")
    tool_ms = _ms(raw.get("expected_tool_duration_ms"), "expected_tool_duration_ms")
    tool = ToolHint(DEFAULT_TOOL_KIND, tool_ms / 1000.0) if tool_ms is not None else None
    reuse = raw.get("reuse_hint")
    if reuse is not None and not isinstance(reuse, str):
        raise ValueError("agent_hints.reuse_hint must be a string")
    rid = body.get("rid")
    return AgentCall(
        params=AgentParams(_id(raw.get("workflow_id"), "workflow_id"), agent_id, tool=tool),
        request_id=_opt_id(raw.get("step_id"), "step_id") or (rid if isinstance(rid, str) else ""),
        parent_step_id=_opt_id(raw.get("parent_step_id"), "parent_step_id"),
        cache_ttl_ms=_ms(raw.get("cache_ttl_ms"), "cache_ttl_ms"),
        reuse_hint=reuse or "",
        source="agent_hints",
    )


def agent_call(body: Mapping[str, Any]) -> AgentCall | None:
    """The agent metadata of one SGLang request body; None when it carries none.

    TokenCake's ``tokencake`` key wins over ``agent_hints``, which wins over
    ``nvext.agent_hints``. Malformed metadata is logged and ignored, as the vLLM connector
    does: the request is still served, without agent-aware treatment.
    """
    if body.get("tokencake") is not None:
        params = agent_params({"tokencake": body["tokencake"]})
        if params is None:
            return None
        rid = body.get("rid")
        return AgentCall(params, request_id=rid if isinstance(rid, str) else "")
    raw = body.get("agent_hints")
    if raw is None:
        nvext = body.get("nvext")
        raw = nvext.get("agent_hints") if isinstance(nvext, Mapping) else None
    if raw is None:
        return None
    try:
        return _from_agent_hints(raw, body)
    except (TypeError, ValueError) as exc:
        logger.warning("ignoring malformed agent_hints: %s", exc)
        return None


def strip_hints(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``body`` without the agent metadata keys, for SGLang's ``/generate``."""
    out = {k: v for k, v in body.items() if k not in HINT_KEYS}
    nvext = out.get("nvext")
    if isinstance(nvext, Mapping) and "agent_hints" in nvext:
        rest = {k: v for k, v in nvext.items() if k != "agent_hints"}
        if rest:
            out["nvext"] = rest
        else:
            del out["nvext"]
    return out


class AgentEventReporter:
    """Reports the agent events of an app's SGLang requests to the daemon.

        reporter = AgentEventReporter(client, dags={"app-1": dag})
        with reporter.request(body) as call:
            response = requests.post(url, json=strip_hints(body)).json()
            if call is not None:
                call.output_tokens = response["meta_info"]["completion_tokens"]

    Per request: ``tool_call_end`` for the agent's open tool call (its next request means
    the tool returned), ``llm_call_start``, then ``llm_call_finish`` when the block exits,
    and ``tool_call_start`` when the metadata announces a tool call. A workflow in ``dags``
    is one app with that DAG; any other agent is a one-node app ``<app_id>/<agent_id>``, so
    hint-only apps need no DAG. Events go through ``AppSession``: a daemon that is down
    costs a missed event (counted on the session), never an error.
    """

    _calls = itertools.count(1)

    def __init__(
        self,
        client: TokenCakeClient,
        *,
        dags: Mapping[str, p.AppDag] | None = None,
        tenant: str = "",
        strict: bool = False,
    ) -> None:
        self.client = client
        self.dags = dict(dags or {})
        self.tenant = tenant
        self.strict = strict
        self.apps: dict[str, AppSession] = {}
        self._agents: dict[tuple[str, str], AgentSession] = {}
        self._open_tools: dict[tuple[str, str], str] = {}

    def agent(self, params: AgentParams) -> AgentSession:
        """The session of ``params``'s agent; its app is declared on first use."""
        declared = params.app_id in self.dags
        app_id = params.app_id if declared else f"{params.app_id}/{params.agent_id}"[:256]
        key = (app_id, params.agent_id)
        session = self._agents.get(key)
        if session is not None:
            return session
        app = self.apps.get(app_id)
        if app is None:
            dag = self.dags.get(params.app_id) or p.AppDag(
                nodes=[p.DagNode(id=params.agent_id, importance=params.importance)]
            )
            app = AppSession(self.client, app_id, dag, tenant=self.tenant, strict=self.strict)
            self.apps[app_id] = app
        session = self._agents[key] = app.agent(params.agent_id)
        return session

    @contextmanager
    def request(self, body: Mapping[str, Any]) -> Iterator[LlmCallHandle | None]:
        """Report one request's events around the block that sends it to SGLang."""
        call = agent_call(body)
        if call is None:
            yield None
            return
        agent = self.agent(call.params)
        app, key = agent.app, (agent.app.app_id, agent.agent_id)
        open_tool = self._open_tools.pop(key, "")
        if open_tool:
            app._send(p.ToolCallEnd(app.app_id, agent.agent_id, open_tool))
        with agent.llm_call(request_id=call.request_id) as handle:
            yield handle
        tool = call.params.tool
        if tool is not None:
            call_id = call.request_id or f"{agent.agent_id}-{next(self._calls)}"
            app._send(
                p.ToolCallStart(app.app_id, agent.agent_id, tool.kind, tool.predicted_s, call_id)
            )
            self._open_tools[key] = call_id

    def close(self) -> None:
        """End every app this reporter declared."""
        for app in self.apps.values():
            app.end()
        self.apps.clear()
        self._agents.clear()
        self._open_tools.clear()
