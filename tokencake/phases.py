"""An agent's phase, and the one machine that moves it between phases.

The phases::

    IDLE     registered, or between an LLM call and its next event
    WAITING  its LLM request waits in the engine's queue          (llm_call_start)
    RUNNING  the engine admitted the request: it holds GPU blocks (llm_call_admitted)
    TOOL     it waits on a tool call                              (tool_call_start)
    DONE     its application ended                                (app_end)

``llm_call_finish`` and ``tool_call_end`` bring it back to IDLE, ``llm_call_preempted`` (an
engine took a running request's blocks back) to WAITING. An agent event fits the phases in
``fits``: a second ``llm_call_start`` while a call is on, an admission of a call that is not
waiting, the end of a tool call the agent is not in, do not.

Early ends. A tool call's start and end often come from two senders: the engine connector
reports the start when the LLM call that asked for the tool finishes, the app reports the
end over its own socket. The daemon reads its peers' sockets in turn, so under load the end
can be read before the start. An idle agent's end that fits no tool call is then held
(``EarlyEnd``, at most ``MAX_EARLY_ENDS`` per agent, for ``EARLY_END_S``); a start that
comes while one is held is applied as a call that is over: the agent stays IDLE, the
policies learn its length and decide nothing for it (``ToolCallOver``). An end whose
``call_id`` is the agent's last ended call's is a duplicate, never held; an
``llm_call_start`` (the agent moved on), ``app_end`` or age drops what is held.

Who keeps a phase, and why these are not copies that can disagree:

* the daemon's registry (``daemon/agent_service.py``) keeps one per agent, whatever the
  engines: it is the owner. An event that does not fit is acknowledged as not accepted and
  goes no further, so every policy behind it only hears events that fit;
* each policy keeps one per agent in its engine (``daemon/scheduler/agents.py``), moved by
  ``after`` on the same events (a held end's call comes to it as ``ToolCallOver``), so for
  agent events it is the registry's phase. It must exist without a daemon (the simulator
  drives policies alone, its engine reporting preemptions to the policy directly, and the
  daemon has no policy while no engine is registered), so it cannot be a view of the
  registry;
* a connector or the gateway tracks its own requests (the vLLM connector, the blocks of an
  agent's last call and the tool call it reported; the gateway, each conversation it
  forwards), not the agent's phase: they are the senders of these events, not receivers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from tokencake import protocol as p

IDLE: Final = "idle"
WAITING: Final = "waiting"
RUNNING: Final = "running"
TOOL: Final = "tool"
DONE: Final = "done"

PHASES: Final = (IDLE, WAITING, RUNNING, TOOL, DONE)

PhaseEvent = (
    p.LlmCallStart
    | p.LlmCallAdmitted
    | p.LlmCallPreempted
    | p.LlmCallFinish
    | p.ToolCallStart
    | p.ToolCallEnd
)
"""The agent events that move one agent (``app_end`` moves every agent of the app)."""

_MOVES: Final[dict[type, tuple[frozenset[str], str]]] = {
    p.LlmCallStart: (frozenset({IDLE, TOOL}), WAITING),
    p.LlmCallAdmitted: (frozenset({WAITING}), RUNNING),
    p.LlmCallPreempted: (frozenset({RUNNING}), WAITING),
    p.LlmCallFinish: (frozenset({WAITING, RUNNING}), IDLE),
    p.ToolCallStart: (frozenset({IDLE, WAITING, RUNNING}), TOOL),
    p.ToolCallEnd: (frozenset({TOOL}), IDLE),
}


def fits(phase: str, event: PhaseEvent) -> bool:
    """May an agent in ``phase`` take ``event``? (A ``tool_call_start`` during a tool call
    does not fit; an ``llm_call_start`` during one does: it ends the tool call.)"""
    return phase in _MOVES[type(event)][0]


def after(event: PhaseEvent) -> str:
    """The phase ``event`` leads to."""
    return _MOVES[type(event)][1]


# ---------------------------------------------------------------------- early ends

EARLY_END_S: Final = 10.0
"""How long a held early ``tool_call_end`` waits for its ``tool_call_start``: the two
senders' lag into the daemon, seconds at most on a loaded host."""
MAX_EARLY_ENDS: Final = 4
"""Early ends held per agent; a fifth pushes the oldest out."""


@dataclass(slots=True, frozen=True)
class EarlyEnd:
    """A ``tool_call_end`` held for its ``tool_call_start``: ``at``, when it came; ``began``,
    when the agent became idle (its LLM call finished), which is when the tool call began as
    far as the daemon can tell."""

    call_id: str
    at: float
    began: float

    def ends(self, call_id: str) -> bool:
        """Does it end tool call ``call_id``? (The ids agree, or one of them is empty.)"""
        return not self.call_id or not call_id or self.call_id == call_id

    @property
    def duration_s(self) -> float:
        return max(self.at - self.began, 0.0)


def held_early(phase: str, end: p.ToolCallEnd, last_call_id: str) -> bool:
    """Is an end that does not fit ``phase`` held as early? For an idle agent only, and not
    when it names the agent's last tool call, which has ended (a duplicate)."""
    return phase == IDLE and not (end.call_id and end.call_id == last_call_id)


def hold(held: tuple[EarlyEnd, ...], end: EarlyEnd) -> tuple[tuple[EarlyEnd, ...], int]:
    """(``held`` with ``end`` added, how many older ends that pushed out)."""
    ends = (*held, end)
    out = max(len(ends) - MAX_EARLY_ENDS, 0)
    return ends[out:], out


def take(
    held: tuple[EarlyEnd, ...], call_id: str, now: float
) -> tuple[EarlyEnd | None, tuple[EarlyEnd, ...], int]:
    """Tool call ``call_id`` starts at ``now``: (the oldest held end that ends it, the ends
    still held, how many were dropped as older than ``EARLY_END_S``)."""
    fresh = tuple(e for e in held if now - e.at <= EARLY_END_S)
    for i, end in enumerate(fresh):
        if end.ends(call_id):
            return end, fresh[:i] + fresh[i + 1 :], len(held) - len(fresh)
    return None, fresh, len(held) - len(fresh)
