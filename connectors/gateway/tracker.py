"""Conversations, apps and the agent events the gateway infers from them.

``begin`` runs when a request arrives: it names the request's conversation (declared, else
``identity``'s prefix rules), ends the conversation's tool call if one is open (the request
carries its results), places a new conversation in an app and a DAG node, and returns the
``Plan`` the proxy forwards by. ``finish`` runs when the response has ended: a response that
ends in tool calls starts a tool call (kind: the function name; predicted duration: declared,
else learnt per (model, tool)).

Apps. A conversation belongs to the app its request declares; else to the app of the
conversations it follows, found by data flow: a new conversation whose prompt contains the
final answer of a tracked conversation follows it (that is how planners hand work to
workers and workers' results reach a joiner). Else it roots an app of its own. An app with no
request for ``app_idle_s`` is ended; its observed structure becomes the template registered
for the next app rooted at the same agent type. An agent the registered DAG has no node for
(the first instance, or a changed shape) is reported as an app of its own.

Pure bookkeeping: no I/O here except through the ``DaemonLink`` queue; time is passed in.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from tokencake import protocol as p
from tokencake.agent_params import kv_transfer_params
from tokencake.connectors.gateway import identity
from tokencake.connectors.gateway.hints import Declared, declared
from tokencake.connectors.gateway.learn import Structure, Structures, ToolDurations
from tokencake.connectors.gateway.link import DaemonLink
from tokencake.connectors.gateway.metrics import GatewayMetrics
from tokencake.connectors.gateway.observe import CHAT, COMPLETIONS, RESPONSES, Outcome
from tokencake.connectors.gateway.tenants import scope_declared

logger = logging.getLogger(__name__)

IDLE: Final = "idle"
LLM: Final = "llm"
TOOL: Final = "tool"

MIN_SNIPPET_CHARS: Final = 24
SNIPPET_CHARS: Final = 256
MAX_SNIPPETS: Final = 256
"""Final answers kept for the data-flow rule: a new conversation's prompt is searched for
each, so the most recent few only."""
MAX_SEARCH_CHARS: Final = 1 << 20
"""A new conversation's prompt longer than this is not searched for data flow."""


def _short(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def snippet(text: str) -> str:
    """The first ``SNIPPET_CHARS`` of ``text`` with its whitespace runs made one space and
    its ends stripped. Only a head of a long text is normalised: that of a prefix is a prefix
    of that of the whole (a cut word is a prefix of the word), so it answers once it is as
    long as the snippet."""
    head = " ".join(text[: 4 * SNIPPET_CHARS].split())
    if len(head) < SNIPPET_CHARS and len(text) > 4 * SNIPPET_CHARS:
        head = " ".join(text.split())
    return head[:SNIPPET_CHARS]


def _fit(name: str) -> str:
    """An id the daemon accepts (at most MAX_NAME_CHARS), hashed when longer."""
    if len(name) <= p.MAX_NAME_CHARS:
        return name
    return "gw-" + hashlib.blake2b(name.encode(), digest_size=16).hexdigest()


@dataclass(slots=True)
class DaemonApp:
    """One app as the daemon knows it: id, DAG and the registration's outcome."""

    app_id: str
    dag: p.AppDag
    reg: asyncio.Future[bool] | None = None


@dataclass(slots=True)
class App:
    app_id: str
    root_type: str
    main: DaemonApp
    observed: Structure = field(default_factory=Structure)
    free: dict[str, list[str]] = field(default_factory=dict)
    """Registered nodes no conversation holds yet, by agent type."""
    extra: list[DaemonApp] = field(default_factory=list)
    conversations: list[str] = field(default_factory=list)
    last_seen: float = 0.0


@dataclass(slots=True)
class Conversation:
    conv_id: str
    rule: str
    model: str
    agent_type: str
    app: App
    dapp: DaemonApp
    node: str
    observed_node: str
    importance: float = 1.0
    state: str = IDLE
    inflight: int = 0
    requests: int = 0
    tool_calls: int = 0
    tool_kind: str = ""
    tool_ids: tuple[str, ...] = ()
    tool_started: float = 0.0
    predicted_s: float | None = None
    last_tool_s: float | None = None
    last_seen: float = 0.0
    keys: list[bytes] = field(default_factory=list)
    tenant: str = ""

    def view(self, now: float) -> dict[str, Any]:
        return {
            "conversation": self.conv_id,
            "rule": self.rule,
            "app_id": self.dapp.app_id,
            "agent_id": self.node,
            "agent_type": self.agent_type,
            "model": self.model,
            "state": self.state,
            "requests": self.requests,
            "tool_calls": self.tool_calls,
            "tool_kind": self.tool_kind,
            "predicted_s": self.predicted_s,
            "last_tool_s": self.last_tool_s,
            "idle_s": round(now - self.last_seen, 3),
        }


@dataclass(slots=True)
class Plan:
    """What the proxy needs to forward one tracked request and report its outcome."""

    conv: Conversation
    kind: str
    request_id: str
    tags: dict[str, Any]
    registered: asyncio.Future[bool]
    hashes: list[bytes]
    tool_s: float | None
    started: float
    done: bool = False


class Tracker:
    def __init__(
        self,
        link: DaemonLink,
        metrics: GatewayMetrics,
        *,
        llm_events: bool = True,
        app_idle_s: float = 300.0,
        capacity: int = 65536,
    ) -> None:
        self.link = link
        self.metrics = metrics
        self.llm_events = llm_events
        self.app_idle_s = app_idle_s
        self.capacity = capacity
        self.durations = ToolDurations()
        self.structures = Structures()
        self.conversations: dict[str, Conversation] = {}
        self.apps: OrderedDict[str, App] = OrderedDict()
        """Least recently seen first: ``_touch`` moves an app to the end."""
        self._index = identity.PrefixIndex(capacity)
        self._responses: OrderedDict[str, str] = OrderedDict()
        self._steps: OrderedDict[str, str] = OrderedDict()
        self._outputs: OrderedDict[str, str] = OrderedDict()
        self._request_ids = itertools.count(1)

    # ------------------------------------------------------------------ request arrives

    def begin(
        self,
        kind: str,
        headers: Mapping[str, str],
        body: dict[str, Any],
        now: float,
        tenant: str = "",
    ) -> Plan | None:
        """The plan for a request, or None when it is forwarded untouched. Raises HintError.

        Everything is matched within ``tenant`` only (``tenants.py``)."""
        d = declared(headers, body)
        scope_declared(d, tenant)
        if d.managed:
            self.metrics.passthrough.labels("managed").inc()
            return None
        model = str(body.get("model", ""))
        messages = body.get("messages") if kind == CHAT else None
        if not isinstance(messages, list):
            messages = None
        hashes = identity.chain(messages, tenant.encode()) if messages else []
        conv = self._find(kind, d, body, hashes, messages)
        if conv is None:
            conv_id, rule = self._new_id(kind, d, body, hashes, messages)
            if not conv_id:
                self.metrics.passthrough.labels("untracked").inc()
                return None
            conv = self._start(conv_id, rule, model, d, body, messages, now)
        if conv.state == TOOL:
            self._end_tool(conv, kind, body, messages, now)
        conv.state = LLM
        conv.inflight += 1
        conv.requests += 1
        self._touch(conv, now)
        if hashes and conv.rule == "fingerprint":
            self._index.set_head(hashes[-1], conv.conv_id)
            conv.keys.append(hashes[-1])
        if d.step_id:
            self._remember(self._steps, d.step_id, conv.conv_id)
        request_id = f"gw-{next(self._request_ids)}"
        reg = self._ensure_registered(conv.dapp)
        if self.llm_events:
            self.link.event(p.LlmCallStart(conv.dapp.app_id, conv.node, request_id=request_id))
        tags = kv_transfer_params(
            conv.dapp.app_id, conv.node, node=conv.node, importance=conv.importance
        )
        return Plan(conv, kind, request_id, tags, reg, hashes, d.predicted_tool_s(), now)

    def _find(
        self,
        kind: str,
        d: Declared,
        body: dict[str, Any],
        hashes: list[bytes],
        messages: list[Any] | None,
    ) -> Conversation | None:
        conv: Conversation | None = None
        if d.conversation:
            conv = self.conversations.get(d.conversation)
        elif kind == RESPONSES:
            prev = body.get("previous_response_id")
            conv_id = self._responses.get(prev, "") if isinstance(prev, str) else ""
            conv = self.conversations.get(conv_id)
        elif messages:
            conv = self.conversations.get(self._index.find(hashes, messages))
        return conv if conv is not None and conv.tenant == d.tenant else None

    def _new_id(
        self,
        kind: str,
        d: Declared,
        body: dict[str, Any],
        hashes: list[bytes],
        messages: list[Any] | None,
    ) -> tuple[str, str]:
        if d.conversation:
            return d.conversation, d.rule
        if kind == RESPONSES and not body.get("previous_response_id"):
            return f"resp-{next(self._request_ids)}", "responses"
        if kind == CHAT and messages:
            base = "fp-" + hashes[identity.root_index(messages)].hex()[:16]
            conv_id, n = base, 1
            while conv_id in self.conversations:
                n += 1
                conv_id = f"{base}~{n}"
            return conv_id, "fingerprint"
        return "", ""

    def _start(
        self,
        conv_id: str,
        rule: str,
        model: str,
        d: Declared,
        body: dict[str, Any],
        messages: list[Any] | None,
        now: float,
    ) -> Conversation:
        agent_type = d.node or self._agent_type(body, messages)
        parents = self._parents(d, messages)
        app: App | None = None
        if d.app_id:
            app = self.apps.get(d.app_id)
        elif parents:
            app = parents[0].app
        if app is None:
            app = self._new_app(_fit(d.app_id or f"gw-{conv_id}"), agent_type, now)
        observed_node = app.observed.add_node(agent_type, d.node)
        for parent in parents:
            if parent.app is app:
                app.observed.add_edge(parent.observed_node, observed_node)
        importance = d.importance if d.importance is not None else 1.0
        free = app.free.get(agent_type)
        if free:
            node, dapp = free.pop(0), app.main
        elif not app.conversations and not app.main.dag.nodes:
            node, dapp = observed_node, app.main
            app.main.dag = p.AppDag(nodes=[self._dag_node(node, agent_type, importance)])
        else:
            # The registered DAG has no node for this agent: report it as an app of its own.
            node = observed_node
            dapp = DaemonApp(
                _fit(f"{app.app_id}/{node}"),
                p.AppDag(nodes=[self._dag_node(node, agent_type, importance)]),
            )
            app.extra.append(dapp)
        conv = Conversation(
            conv_id, rule, model, agent_type, app, dapp, node, observed_node, importance
        )
        conv.tenant = d.tenant
        app.conversations.append(conv_id)
        self.conversations[conv_id] = conv
        self.metrics.identity.labels(rule).inc()
        self.metrics.conversations.set(len(self.conversations))
        return conv

    def _new_app(self, app_id: str, root_type: str, now: float) -> App:
        template = self.structures.template(root_type)
        dag = p.AppDag(nodes=[])
        free: dict[str, list[str]] = {}
        if template is not None:
            dag = p.AppDag(
                nodes=[self._dag_node(n, t, 1.0) for n, t in template.nodes.items()],
                edges=list(template.edges),
            )
            for n, t in template.nodes.items():
                free.setdefault(t, []).append(n)
        app = App(app_id, root_type, DaemonApp(app_id, dag), free=free, last_seen=now)
        self.apps[app_id] = app
        return app

    def _dag_node(self, node: str, agent_type: str, importance: float) -> p.DagNode:
        return p.DagNode(
            id=node,
            agent_type=agent_type,
            importance=importance,
            expected_tool_s=self.durations.expected_for_type(agent_type),
        )

    @staticmethod
    def _agent_type(body: dict[str, Any], messages: list[Any] | None) -> str:
        """Agents of one type share a system prompt and a tool set."""
        system = ""
        for m in messages or ():
            if isinstance(m, dict) and m.get("role") in ("system", "developer"):
                system += identity.text_of(m.get("content"))
        if not system and isinstance(body.get("instructions"), str):
            system = body["instructions"]
        tools = sorted(
            str(t.get("function", {}).get("name", t.get("name", "")))
            for t in body.get("tools") or ()
            if isinstance(t, dict) and isinstance(t.get("function", {}), dict)
        )
        return "agent-" + _short(system + "\x00" + "\x00".join(tools))

    def _parents(self, d: Declared, messages: list[Any] | None) -> list[Conversation]:
        found: list[Conversation] = []
        for conv_id in d.parents:
            conv = self.conversations.get(conv_id)
            if conv is not None:
                found.append(conv)
        if d.parent_step:
            conv = self.conversations.get(self._steps.get(d.parent_step, ""))
            if conv is not None:
                found.append(conv)
        if found or not messages or not self._outputs:
            return [c for c in found if c.tenant == d.tenant]
        text = "\n".join(
            identity.text_of(m.get("content"))
            for m in messages
            if isinstance(m, dict) and m.get("role") != "assistant"
        )
        if len(text) > MAX_SEARCH_CHARS:
            return found
        for snippet, conv_id in self._outputs.items():
            conv = self.conversations.get(conv_id)
            if conv is not None and conv not in found and snippet in text:
                found.append(conv)
        return [c for c in found if c.tenant == d.tenant]

    def _ensure_registered(self, dapp: DaemonApp) -> asyncio.Future[bool]:
        reg = dapp.reg
        failed = reg is not None and reg.done() and (reg.cancelled() or not reg.result())
        if reg is None or (failed and not self.link.down):
            reg = dapp.reg = self.link.register(dapp.app_id, dapp.dag)
        return reg

    def _end_tool(
        self,
        conv: Conversation,
        kind: str,
        body: dict[str, Any],
        messages: list[Any] | None,
        now: float,
    ) -> None:
        actual = max(now - conv.tool_started, 0.0)
        self.durations.observe(conv.model, conv.tool_kind, actual, conv.agent_type)
        self.metrics.tool_seconds.observe(actual)
        if conv.predicted_s is not None:
            self.metrics.prediction_error.observe(abs(conv.predicted_s - actual))
        answered = self._answered(kind, body, messages)
        ok = bool(conv.tool_ids) and set(conv.tool_ids) <= answered
        call_id = f"{conv.conv_id}:{conv.tool_calls}"
        self.link.event(p.ToolCallEnd(conv.dapp.app_id, conv.node, call_id=call_id, ok=ok))
        conv.last_tool_s = actual
        conv.state = IDLE

    @staticmethod
    def _answered(kind: str, body: dict[str, Any], messages: list[Any] | None) -> set[str]:
        if kind == RESPONSES:
            items = body.get("input")
            return {
                str(i.get("call_id"))
                for i in (items if isinstance(items, list) else ())
                if isinstance(i, dict) and i.get("type") == "function_call_output"
            }
        return {
            str(m.get("tool_call_id"))
            for m in messages or ()
            if isinstance(m, dict) and m.get("role") == "tool"
        }

    # ------------------------------------------------------------------ response ended

    def finish(self, plan: Plan, outcome: Outcome | None, now: float) -> None:
        """The response ended: ``outcome`` is what it said, None when it failed or was cut.

        Only the first call for a plan counts."""
        if plan.done:
            return
        plan.done = True
        conv = plan.conv
        conv.inflight = max(conv.inflight - 1, 0)
        self._touch(conv, now)
        if self.llm_events:
            tokens = outcome.output_tokens if outcome is not None else 0
            self.link.event(
                p.LlmCallFinish(
                    conv.dapp.app_id, conv.node, request_id=plan.request_id, output_tokens=tokens
                )
            )
        if outcome is None or not outcome.finished:
            if conv.inflight == 0:
                conv.state = IDLE
            return
        if plan.hashes and conv.rule == "fingerprint":
            tip = identity.step(plan.hashes[-1], outcome.assistant_message())
            self._index.set_tip(tip, conv.conv_id)
            conv.keys.append(tip)
        if outcome.response_id:
            self._remember(self._responses, outcome.response_id, conv.conv_id)
        if outcome.tool_calls and plan.kind != COMPLETIONS:
            kind = outcome.tool_kind or "tool"
            predicted = plan.tool_s
            if predicted is None:
                predicted = self.durations.predict(conv.model, kind)
            conv.tool_calls += 1
            conv.state = TOOL
            conv.tool_kind = kind
            conv.tool_ids = tuple(c.id for c in outcome.tool_calls)
            conv.tool_started = now
            conv.predicted_s = predicted
            self.metrics.tool_calls.labels(kind).inc()
            call_id = f"{conv.conv_id}:{conv.tool_calls}"
            self.link.event(
                p.ToolCallStart(
                    conv.dapp.app_id, conv.node, kind, predicted_s=predicted, call_id=call_id
                )
            )
            return
        if conv.inflight == 0:
            conv.state = IDLE
        text = snippet(outcome.text)
        if len(text) >= MIN_SNIPPET_CHARS:
            self._remember(self._outputs, text, conv.conv_id, MAX_SNIPPETS)

    def _touch(self, conv: Conversation, now: float) -> None:
        conv.last_seen = conv.app.last_seen = now
        if conv.app.app_id in self.apps:
            self.apps.move_to_end(conv.app.app_id)

    def _remember(
        self, table: OrderedDict[str, str], key: str, conv_id: str, capacity: int = 0
    ) -> None:
        table[key] = conv_id
        table.move_to_end(key)
        while len(table) > (capacity or self.capacity):
            table.popitem(last=False)

    # ------------------------------------------------------------------ housekeeping

    def sweep(self, now: float) -> list[str]:
        """End the apps idle for ``app_idle_s`` (and, past ``capacity`` conversations, the
        least recently seen); learn their structure. Returns their ids."""
        ended = []
        excess = len(self.conversations) - self.capacity
        for _ in range(len(self.apps)):
            app = next(iter(self.apps.values()))
            if now - app.last_seen < self.app_idle_s and excess <= 0:
                break
            if any(self.conversations[c].inflight for c in app.conversations):
                self.apps.move_to_end(app.app_id)  # busy: look again next time
                continue
            excess -= len(app.conversations)
            self.structures.learn(app.root_type, app.observed)
            for dapp in [app.main, *app.extra]:
                reg = dapp.reg  # unanswered yet: the link ends it behind its registration
                if reg is not None and not (reg.done() and (reg.cancelled() or not reg.result())):
                    self.link.end_app(dapp.app_id)
            for conv_id in app.conversations:
                conv = self.conversations.pop(conv_id)
                self._index.forget(conv.keys)
            del self.apps[app.app_id]
            ended.append(app.app_id)
        self.metrics.conversations.set(len(self.conversations))
        return ended

    def view(self, now: float) -> dict[str, Any]:
        return {
            "conversations": [c.view(now) for c in self.conversations.values()],
            "apps": [
                {
                    "app_id": a.app_id,
                    "root_type": a.root_type,
                    "registered_nodes": [n.id for n in a.main.dag.nodes],
                    "registered_edges": [list(e) for e in a.main.dag.edges],
                    "observed_nodes": dict(a.observed.nodes),
                    "observed_edges": [list(e) for e in a.observed.edges],
                    "own_apps": [x.app_id for x in a.extra],
                    "idle_s": round(now - a.last_seen, 3),
                }
                for a in self.apps.values()
            ],
            "tool_durations": self.durations.table(),
            "structures": self.structures.table(),
            "daemon": {
                "down": self.link.down,
                "sent": self.link.sent,
                "missed": self.link.missed,
                "rejected": self.link.rejected,
                "inflight": self.link.inflight,
            },
        }
