"""``AgentRankedQueue`` against vLLM's own queues, and the pieces of the admission guard.

No engine: the queue only reads ``request_id``, ``priority`` and ``arrival_time``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("vllm")

from vllm.v1.core.sched.request_queue import (
    FCFSRequestQueue,
    PriorityRequestQueue,
    SchedulingPolicy,
)

from tokencake import protocol as p
from tokencake.agent_params import AgentParams
from tokencake.connectors.vllm.scheduler import (
    NEUTRAL_SCORE,
    AgentPriorities,
    AgentRankedQueue,
)
from tokencake.guard import PLAIN_HEAD_START_S

pytestmark = pytest.mark.vllm


@dataclass(eq=False)
class FakeRequest:
    request_id: str
    priority: int
    arrival_time: float
    score: float = NEUTRAL_SCORE
    extra: dict[str, Any] = field(default_factory=dict)

    def __lt__(self, other: FakeRequest) -> bool:  # vllm.v1.request.Request.__lt__
        return (self.priority, self.arrival_time, self.request_id) < (
            other.priority,
            other.arrival_time,
            other.request_id,
        )


def _drive(rng: random.Random, queues: list[Any], n_ops: int, scores: bool) -> None:
    """Apply the same random operation sequence to every queue, comparing as it goes."""
    live: list[FakeRequest] = []
    n = 0
    for _ in range(n_ops):
        op = rng.choice(["add", "add", "pop", "prepend", "prepend_many", "remove", "remove_many"])
        if op in ("add", "prepend"):
            n += 1
            req = FakeRequest(f"r{n}", rng.randrange(3), float(rng.randrange(50)))
            if scores:
                req.score = float(rng.randrange(3))
            for q in queues:
                (q.add_request if op == "add" else q.prepend_request)(req)
            live.append(req)
        elif op == "prepend_many":
            batch = []
            for _ in range(rng.randrange(4)):
                n += 1
                batch.append(FakeRequest(f"r{n}", rng.randrange(3), float(rng.randrange(50))))
            for q in queues:
                q.prepend_requests(list(batch))
            live += batch
        elif op == "pop" and live:
            popped = {id(q.pop_request()) for q in queues}
            assert len(popped) == 1
            live = [r for r in live if id(r) not in popped]
        elif op == "remove" and live:
            victim = rng.choice(live)
            for q in queues:
                q.remove_request(victim)
            live.remove(victim)
        elif op == "remove_many" and live:
            victims = rng.sample(live, rng.randrange(len(live) + 1))
            for q in queues:
                q.remove_requests(victims)
            live = [r for r in live if r not in victims]
        orders = [[r.request_id for r in q] for q in queues]
        assert all(o == orders[0] for o in orders), op
        assert all(len(q) == len(live) and bool(q) == bool(live) for q in queues)
        if live:
            assert len({id(q.peek_request()) for q in queues}) == 1


@pytest.mark.parametrize("seed", range(20))
def test_constant_rank_is_vllms_fcfs_queue(seed: int) -> None:
    ours = AgentRankedQueue(SchedulingPolicy.FCFS, lambda r: -NEUTRAL_SCORE)
    _drive(random.Random(seed), [ours, FCFSRequestQueue()], 300, scores=False)


@pytest.mark.parametrize("seed", range(20))
def test_constant_rank_is_vllms_priority_queue(seed: int) -> None:
    ours = AgentRankedQueue(SchedulingPolicy.PRIORITY, lambda r: -NEUTRAL_SCORE)
    _drive(random.Random(seed), [ours, PriorityRequestQueue()], 300, scores=False)


def test_rank_first_then_fcfs_and_resort_restores_fcfs() -> None:
    ranks: dict[str, float] = {}
    q: Any = AgentRankedQueue(SchedulingPolicy.FCFS, lambda r: ranks.get(r.request_id, -1.0))
    reqs = [FakeRequest(f"r{i}", 0, float(i)) for i in range(6)]
    ranks.update({"r3": -4.0, "r5": -3.0})
    for r in reqs[:5]:
        q.add_request(r)
    q.prepend_request(reqs[5])  # a preempted request goes to the front of its rank
    assert [r.request_id for r in q] == ["r3", "r5", "r0", "r1", "r2", "r4"]
    ranks.clear()  # the daemon is gone: every score is neutral again
    q.resort()
    assert [r.request_id for r in q] == ["r5", "r0", "r1", "r2", "r3", "r4"]
    with pytest.raises(IndexError):
        AgentRankedQueue(SchedulingPolicy.FCFS, lambda r: 0.0).pop_request()


class FakeLink:
    def __init__(self, agents: list[p.AgentInfo] | None) -> None:
        self.agents = agents
        self.calls: list[str] = []

    @property
    def up(self) -> bool:
        return self.agents is not None

    def call(self, req: Any) -> Any:
        self.calls.append(req.app_id)
        if self.agents is None:
            return None
        return p.ListAgentsReply([a for a in self.agents if a.app_id == req.app_id])


def _info(
    agent: str, priority: float, critical: bool, protect: int, app: str = "app", age: float = 5.0
) -> p.AgentInfo:
    return p.AgentInfo(
        app, agent, agent, "tool", 1.0, priority, critical, 0, 0, "", None, 0.0, protect, age
    )


def test_priorities_refresh_and_protected_blocks() -> None:
    prio = AgentPriorities()
    link = FakeLink(
        [
            _info("crit", 3.5, True, 4),
            _info("busy", 3.0, True, 0),  # running: the daemon protects nothing for it
            _info("side", 2.0, False, 0),
            _info("crit", 9.0, True, 6, app="newer", age=1.0),
            _info("side", 1.0, False, 0, app="newer", age=1.0),
        ]
    )
    assert prio.refresh(link, ["app", "newer"])
    assert not prio.refresh(link, ["app", "newer"])  # unchanged, whatever the call's latency
    crit, side = AgentParams("app", "crit"), AgentParams("app", "side")
    assert prio.score(crit) == 3.5 and prio.critical(crit)
    assert prio.score(side) == 2.0 and not prio.critical(side)
    assert prio.score(AgentParams("app", "unknown")) == NEUTRAL_SCORE
    assert prio.score(None) == NEUTRAL_SCORE
    everyone = [("app", "crit"), ("app", "busy"), ("app", "side"), ("newer", "crit")]
    # a side agent of the older app is held back by its own app's critical agent only
    assert prio.protected_blocks(side, everyone) == 4
    # a newer app's agent yields to both; a request of no tracked agent ranks behind all
    assert prio.protected_blocks(AgentParams("newer", "side"), everyone) == 10
    assert prio.protected_blocks(AgentParams("newer", "untracked"), everyone) == 10
    # plain traffic (no agent metadata) ranks as an app PLAIN_HEAD_START_S old: ahead of these
    assert prio.protected_blocks(None, everyone) == 0
    # an agent never protects blocks against itself
    assert prio.protected_blocks(crit, [("app", "crit")]) == 0
    # admission order: the older app first, then the score; untracked requests by arrival
    now = time.time()
    assert prio.order(side, now) < prio.order(AgentParams("newer", "crit"), now)
    assert prio.order(crit, now) < prio.order(side, now)
    untracked = AgentParams("newer", "untracked")
    assert prio.order(AgentParams("newer", "crit"), now) < prio.order(untracked, now)
    assert prio.order(untracked, now - 60) < prio.order(crit, now)
    assert prio.order(None, now) < prio.order(crit, now)  # plain: ahead of young apps
    assert prio.order(crit, now) < prio.order(None, now + PLAIN_HEAD_START_S + 60)
    link.agents = None  # daemon down: every rank is forgotten, vLLM's order comes back
    assert prio.refresh(link, ["app"])
    assert prio.score(crit) == NEUTRAL_SCORE and prio.protected_blocks(None, everyone) == 0
    assert prio.order(crit, now) == prio.order(None, now - 60)


def test_scheduler_config_keys_are_validated() -> None:
    from tokencake.connectors.vllm.config import ConnectorConfig

    cfg = ConnectorConfig.from_extra({"priority_refresh_s": 0.0, "reserve_fraction": 0.0})
    assert cfg.priority_refresh_s == 0.0 and cfg.reserve_fraction == 0.0
    with pytest.raises(ValueError):
        ConnectorConfig.from_extra({"reserve_fraction": 1.5})
    with pytest.raises(ValueError):
        ConnectorConfig.from_extra({"priority_refresh_s": -1})
