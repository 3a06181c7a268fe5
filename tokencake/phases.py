"""An agent's phase, and the one machine that moves it between phases.

The phases::

    IDLE     registered, or between an LLM call and its next event
    WAITING  its LLM request waits in the engine's queue          (llm_call_start)
    RUNNING  the engine admitted the request: it holds GPU blocks (llm_call_admitted)
    TOOL     it waits on a tool call                              (tool_call_start)
    DONE     its application ended                                (app_end)

``llm_call_finish`` and ``tool_call_end`` bring it back to IDLE. An agent event fits the
phases in ``fits``: a second ``llm_call_start`` while a call is on, an admission of a call
that is not waiting, the end of a tool call the agent is not in, do not.

Who keeps a phase, and why these are not copies that can disagree:

* the daemon's registry (``daemon/agent_service.py``) keeps one per agent, whatever the
  engines: it is the owner. An event that does not fit is acknowledged as not accepted and
  goes no further, so every policy behind it only hears events that fit;
* each policy keeps one per agent in its engine (``daemon/scheduler/agents.py``), moved by
  ``after`` on the same events, so for agent events it is the registry's phase. It also
  moves on what only its engine knows (``LlmCallPreempted`` puts a RUNNING agent back to
  WAITING) and must exist without a daemon (the simulator drives policies alone, and the
  daemon has no policy while no engine is registered), so it cannot be a view of the
  registry;
* a connector or the gateway tracks its own requests (the vLLM connector, the blocks of an
  agent's last call and the tool call it reported; the gateway, each conversation it
  forwards), not the agent's phase: they are the senders of these events, not receivers.
"""

from __future__ import annotations

from typing import Final

from tokencake import protocol as p

IDLE: Final = "idle"
WAITING: Final = "waiting"
RUNNING: Final = "running"
TOOL: Final = "tool"
DONE: Final = "done"

PHASES: Final = (IDLE, WAITING, RUNNING, TOOL, DONE)

PhaseEvent = p.LlmCallStart | p.LlmCallAdmitted | p.LlmCallFinish | p.ToolCallStart | p.ToolCallEnd
"""The agent events that move one agent (``app_end`` moves every agent of the app)."""

_MOVES: Final[dict[type, tuple[frozenset[str], str]]] = {
    p.LlmCallStart: (frozenset({IDLE, TOOL}), WAITING),
    p.LlmCallAdmitted: (frozenset({WAITING}), RUNNING),
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
