"""The daemon's per-agent ranks as an engine-side scheduler applies them (no engine needed).

An engine that orders its own admission (vLLM's ``TokenCakeScheduler``, the simulator's live
mode) reads what the daemon's policy says about each agent through ``list_agents``: its
priority score, whether it is on its application's critical path, the blocks the
critical-inversion guard keeps free for it (``protect_blocks``) and its application's age.
``AgentPriorities`` keeps the last answer and turns it into the daemon's admission key and
the guard's protected-block sum; ``tokencake.guard`` takes the verdict.
Nothing here imports an engine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tokencake import guard
from tokencake import protocol as p
from tokencake.agent_params import AgentParams

NEUTRAL_SCORE = 1.0
"""The daemon's score for a request whose agent it does not track (``admission_order``)."""
MAX_APP_QUERIES = 8
"""Above this many active apps, one unfiltered ``list_agents`` replaces the per-app calls."""
REGISTRATION_JITTER_S = 1.0
"""An app's registration time moves only when a refresh puts it further away than this."""


@dataclass(frozen=True, slots=True)
class AgentRank:
    """What the daemon said about one agent at the last refresh."""

    priority: float
    critical: bool
    protect_blocks: int
    app_registered: float
    """Where its application ranks: when it registered, on this process's wall clock
    (``time.time()``, the clock of vLLM's ``Request.arrival_time``), less the lead the
    daemon reported (``AgentInfo.app_lead_s``, the tail guard)."""


class AgentPriorities:
    """The daemon's per-agent priorities, as last fetched through the connector's link."""

    def __init__(self) -> None:
        self.ranks: dict[tuple[str, str], AgentRank] = {}
        self.refreshes = 0
        self.failures = 0
        self.ended_apps: set[str] = set()
        """Apps the daemon answered ``unknown_app`` for at the last refresh (ended, or never
        registered): the caller stops asking about them."""
        self._app_registered: dict[str, float] = {}

    def _registered(self, app_id: str, estimate: float) -> float:
        """An app's registration time, stable across refreshes: each reply's estimate
        (our clock minus the reported age) jitters by the call's latency, so it only moves
        when it changed by more than ``REGISTRATION_JITTER_S`` (the app re-registered)."""
        known = self._app_registered.get(app_id)
        if known is None or abs(known - estimate) > REGISTRATION_JITTER_S:
            self._app_registered[app_id] = known = estimate
        return known

    def _rank(self, params: AgentParams | None) -> AgentRank | None:
        return self.ranks.get(params.key) if params is not None else None

    def score(self, params: AgentParams | None) -> float:
        rank = self._rank(params)
        return rank.priority if rank is not None else NEUTRAL_SCORE

    def critical(self, params: AgentParams | None) -> bool:
        rank = self._rank(params)
        return rank is not None and rank.critical

    def order(self, params: AgentParams | None, arrival_time: float) -> tuple[float, str, float]:
        """The daemon's admission key: (application rank, negated score). An agent's app
        ranks by its registration less its lead (the tail guard); a request of no tracked
        agent by its own arrival, and plain traffic (``params`` None) PLAIN_HEAD_START_S
        earlier (``guard``)."""
        if not self.ranks:
            return (0.0, "", -NEUTRAL_SCORE)  # nothing known: vLLM's own order, exactly
        if params is None:  # plain traffic: see guard.PLAIN_HEAD_START_S
            return (guard.plain_rank(arrival_time), "", -NEUTRAL_SCORE)
        rank = self._rank(params)
        if rank is None:
            return (arrival_time, "", -NEUTRAL_SCORE)
        return (rank.app_registered, params.app_id, -rank.priority)

    def protected_blocks(
        self, requester: AgentParams | None, agents: Iterable[tuple[str, str]]
    ) -> int:
        """Blocks kept free for the critical agents among ``agents`` that rank ahead of
        ``requester`` (before the cap): ``guard.protected_blocks`` as the daemon reported
        it. A requester the daemon does not track ranks behind every application; plain
        traffic (no agent metadata: ``requester`` None) as an application registered
        ``guard.PLAIN_HEAD_START_S`` before now, as in the daemon's policy."""
        mine = self._rank(requester)
        me = requester.key if requester is not None else None
        limit: tuple[float, str] | None = None
        if requester is None:
            limit = (guard.plain_rank(time.time()), "")
        elif mine is not None:
            limit = (mine.app_registered, requester.app_id)
        total = 0
        for key in agents:
            rank = self.ranks.get(key)
            if rank is None or key == me or rank.protect_blocks <= 0:
                continue
            if limit is None or (rank.app_registered, key[0]) <= limit:
                total += rank.protect_blocks
        return total

    def refresh(self, link: Any, apps: list[str]) -> bool:
        """Fetch the ranks of ``apps``' agents. A daemon that cannot be reached forgets
        every rank (stock order); an app the daemon refuses loses only its own ranks.

        Returns True when the ranks changed.
        """
        self.ended_apps = set()
        if link is None or not link.up:
            return self._clear()
        queries = apps if len(apps) <= MAX_APP_QUERIES else [""]
        fresh: dict[tuple[str, str], AgentRank] = {}
        for app_id in queries:
            reply = link.call(p.ListAgents(app_id))
            if reply is None:
                self.failures += 1
                if not link.up:
                    return self._clear()
                if getattr(link, "last_error", "") == p.ErrorCode.UNKNOWN_APP:
                    self.ended_apps.add(app_id)
                continue
            now = time.time()
            for a in reply.agents:
                priority = a.priority if math.isfinite(a.priority) else NEUTRAL_SCORE
                age = a.app_age_s if math.isfinite(a.app_age_s) else 0.0
                lead = a.app_lead_s if math.isfinite(a.app_lead_s) else 0.0
                registered = self._registered(a.app_id, now - max(0.0, age)) - max(0.0, lead)
                fresh[(a.app_id, a.agent_id)] = AgentRank(
                    priority, a.on_critical_path, max(0, a.protect_blocks), registered
                )
        self.refreshes += 1
        # Apps no longer asked about are forgotten (a long-running engine sees many).
        apps_now = {key[0] for key in fresh}
        self._app_registered = {a: t for a, t in self._app_registered.items() if a in apps_now}
        changed = fresh != self.ranks
        self.ranks = fresh
        return changed

    def _clear(self) -> bool:
        changed = bool(self.ranks)
        self.ranks = {}
        self._app_registered = {}
        return changed
