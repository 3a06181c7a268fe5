"""Agent-side helpers: report an app's agents, LLM calls and tool calls in a few lines.

    with AppSession(client, "app-1", dag) as app:
        planner = app.agent("planner")
        with planner.llm_call(prompt_tokens=1200):
            ...                                  # the request to the engine
        with planner.tool_call("search", predicted_s=4.0):
            ...                                  # the tool runs; TokenCake may offload

Events are hints to the scheduler, so a daemon that is down must not break the agent app:
``DaemonUnavailable`` is logged and counted (``missed_events``), never raised, unless the
session is ``strict``. A daemon that restarted has forgotten the app: the session declares
its DAG again and resends the event. Other error replies (an unknown agent, a bad DAG) are
raised: they are bugs in the caller.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tokencake import protocol as p
from tokencake.clients.client import DaemonUnavailable, TokenCakeClient

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class LlmCallHandle:
    """Filled in by the caller inside ``llm_call`` and reported when the block exits."""

    output_tokens: int = 0
    kv_blocks: int = 0


class AppSession:
    def __init__(
        self,
        client: TokenCakeClient,
        app_id: str,
        dag: p.AppDag,
        *,
        tenant: str = "",
        strict: bool = False,
    ) -> None:
        self.client = client
        self.app_id = app_id
        self.dag = dag
        self.tenant = tenant
        self.strict = strict
        self.missed_events = 0
        self.reregistrations = 0
        self._send(p.RegisterApp(app_id, dag, tenant))

    def agent(self, agent_id: str, engine_id: str = "") -> AgentSession:
        if all(node.id != agent_id for node in self.dag.nodes):
            raise KeyError(f"agent {agent_id!r} is not a node of app {self.app_id!r}")
        return AgentSession(self, agent_id, engine_id)

    def end(self) -> None:
        self._send(p.AppEnd(self.app_id))

    def __enter__(self) -> AppSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.end()

    def _send(self, req: p.Request[p.EventAck]) -> bool:
        try:
            try:
                return self.client.call(req).accepted
            except p.RemoteError as exc:
                # A restarted daemon has forgotten the app (its state is a cache): declare
                # the DAG again and resend, once.
                if exc.code != p.ErrorCode.UNKNOWN_APP or isinstance(req, p.RegisterApp):
                    raise
                self.client.call(p.RegisterApp(self.app_id, self.dag, self.tenant))
                self.reregistrations += 1
                return self.client.call(req).accepted
        except DaemonUnavailable as exc:
            self.missed_events += 1
            if self.strict:
                raise
            logger.debug("event not delivered: %s", exc)
            return False


class AgentSession:
    _call_ids = itertools.count(1)

    def __init__(self, app: AppSession, agent_id: str, engine_id: str = "") -> None:
        self.app = app
        self.agent_id = agent_id
        self.engine_id = engine_id

    @contextmanager
    def llm_call(self, prompt_tokens: int = 0, request_id: str = "") -> Iterator[LlmCallHandle]:
        handle = LlmCallHandle()
        self.app._send(
            p.LlmCallStart(
                self.app.app_id, self.agent_id, self.engine_id, request_id, prompt_tokens
            )
        )
        try:
            yield handle
        finally:
            self.app._send(
                p.LlmCallFinish(
                    self.app.app_id,
                    self.agent_id,
                    request_id,
                    handle.output_tokens,
                    handle.kv_blocks,
                )
            )

    @contextmanager
    def tool_call(self, kind: str, predicted_s: float | None = None) -> Iterator[str]:
        """Reports the tool's start and end; ``ok`` is False when the block raised."""
        call_id = f"{self.agent_id}-{next(self._call_ids)}"
        self.app._send(p.ToolCallStart(self.app.app_id, self.agent_id, kind, predicted_s, call_id))
        ok = False
        try:
            yield call_id
            ok = True
        finally:
            self.app._send(p.ToolCallEnd(self.app.app_id, self.agent_id, call_id, ok))
