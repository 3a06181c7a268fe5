"""``AgentPriorities.refresh``: one app's failure affects that app only.

The link is a stand-in with the connector's ``DaemonLink`` surface (``up``, ``call``,
``last_error``); the daemon's side of ``list_agents`` is tested in the server tests.
"""

from __future__ import annotations

from typing import Any

from tokencake import protocol as p
from tokencake.agent_params import AgentParams
from tokencake.clients.priorities import AgentPriorities


def _agent(
    app_id: str, agent_id: str, priority: float, age: float = 1.0, lead: float = 0.0
) -> p.AgentInfo:
    return p.AgentInfo(
        app_id, agent_id, "t", "llm", 1.0, priority, False, 0, 0, "", None, 0.0, 0, age, lead
    )


class Link:
    """Answers ``list_agents`` per app; an app in ``refuse`` gets ``code``; ``down`` makes
    every call fail as a dead daemon does (the link goes down)."""

    def __init__(self, agents: dict[str, list[p.AgentInfo]]) -> None:
        self.agents = agents
        self.refuse: dict[str, str] = {}
        self.up = True
        self.last_error = ""
        self.asked: list[str] = []

    def call(self, req: Any) -> Any:
        self.asked.append(req.app_id)
        if not self.up:
            self.last_error = "unavailable"
            return None
        if req.app_id in self.refuse:
            self.last_error = self.refuse[req.app_id]
            return None
        self.last_error = ""
        return p.ListAgentsReply(self.agents.get(req.app_id, []))


def test_an_ended_app_loses_only_its_own_ranks() -> None:
    link = Link({"a": [_agent("a", "x", 2.0)], "b": [_agent("b", "y", 3.0)]})
    prio = AgentPriorities()
    assert prio.refresh(link, ["a", "b"])
    assert set(prio.ranks) == {("a", "x"), ("b", "y")}
    link.refuse["a"] = p.ErrorCode.UNKNOWN_APP  # app a ended on the daemon
    assert prio.refresh(link, ["a", "b"])
    assert set(prio.ranks) == {("b", "y")}
    assert prio.ended_apps == {"a"}


def test_another_refusal_keeps_the_other_apps_and_is_not_an_ending() -> None:
    link = Link({"a": [_agent("a", "x", 2.0)], "b": [_agent("b", "y", 3.0)]})
    prio = AgentPriorities()
    prio.refresh(link, ["a", "b"])
    link.refuse["b"] = p.ErrorCode.BAD_REQUEST
    prio.refresh(link, ["a", "b"])
    assert set(prio.ranks) == {("a", "x")}
    assert prio.ended_apps == set()


def test_a_daemon_that_is_gone_clears_every_rank() -> None:
    link = Link({"a": [_agent("a", "x", 2.0)], "b": [_agent("b", "y", 3.0)]})
    prio = AgentPriorities()
    prio.refresh(link, ["a", "b"])
    link.up = False
    assert prio.refresh(link, ["a", "b"])
    assert prio.ranks == {}
    assert prio.ended_apps == set()


def test_an_apps_lead_moves_it_ahead_as_in_the_daemons_order() -> None:
    """``app_lead_s`` (the tail guard) is subtracted from the registration: an app 3 s
    younger but 10 s ahead by its lead ranks first; without the lead, the older one."""
    params = {a: AgentParams(a, "x") for a in ("old", "new")}
    link = Link(
        {"old": [_agent("old", "x", 1.0, age=5.0)], "new": [_agent("new", "x", 1.0, 2.0, 10.0)]}
    )
    prio = AgentPriorities()
    prio.refresh(link, ["old", "new"])
    assert prio.order(params["new"], 0.0) < prio.order(params["old"], 0.0)
    link.agents["new"] = [_agent("new", "x", 1.0, age=2.0)]
    prio.refresh(link, ["old", "new"])
    assert prio.order(params["old"], 0.0) < prio.order(params["new"], 0.0)
