"""``TokenCakeScheduler``: vLLM's v1 ``Scheduler`` with the daemon's spatial decisions applied.

Configured with ``scheduler_cls`` (no fork)::

    vllm serve ... --scheduler-cls tokencake.connectors.vllm.scheduler.TokenCakeScheduler

(``TokenCakeAsyncScheduler`` where async scheduling is on, the GPU default). It needs the
``TokenCakeConnector``: it reads agent priorities through the daemon link of the connector's
scheduler side (``TokenCakeConnectorScheduler.link``: ``list_agents``, with the connector's
millisecond timeout), and without it, or with the daemon down, it behaves exactly like
vLLM's FCFS (or priority) scheduler.

What it applies, each through a documented seam of vLLM 0.32's scheduler:

- **Admission order** (the daemon's ``admission_order``): ``self.waiting`` is replaced by
  an ``AgentRankedQueue``: applications in registration order (older first), then the
  daemon's priority score of the request's agent (highest first); a request of no agent
  the daemon tracks ranks by its own arrival time, with the neutral score 1.0, as in the
  daemon; ties in vLLM's own order. The ranks are refreshed every ``priority_refresh_s``
  while requests wait, and the queue is re-sorted.
- **Critical-inversion guard** (the daemon's ``may_allocate``): the shared rule of
  ``tokencake.guard``, with the daemon's per-agent ``protect_blocks``
  (what a critical agent waiting, or in a tool call, needs kept free) summed over this
  engine's agents that rank ahead of the request (an older application or its own; a
  request of no tracked agent ranks behind all), capped at ``reserve_fraction`` of the
  pool, against vLLM's exact free block count. Critical agents are never deferred. Hooked
  into ``_handle_blocked_waiting_request``, the scheduler's per request "skip this step"
  test (a private method: checked at import).
- **Pins give way**: a request the guard admits that the free blocks cannot hold takes
  the blocks of pins the daemon asked for (``TokenCakeConnectorScheduler.make_room``): the
  pins whose agents return last are released first, each agent's KV copied to the host
  first, so a runnable request waits at most the step that copy takes, never a pin's
  time to live. Hooked into ``_handle_blocked_waiting_request`` too.
- **Preemption victim**: vLLM's FCFS scheduler preempts the last request of
  ``self.running``; before each step ``self.running`` is stably sorted by priority, so the
  victim is the lowest-priority agent's most recent request.
- **Preemption report**: ``_preempt_request`` (private: checked at import) reads the
  victim's blocks and computed tokens before vLLM frees them and resets the count, and hands
  them to the connector, which reports ``llm_call_preempted`` at the end of the step (the
  daemon's ``preempted`` write-through trigger).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import RequestQueue, SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from tokencake import guard
from tokencake.agent_params import AgentParams, agent_params

# The daemon's per-agent ranks need no vLLM: they live in ``tokencake.clients.priorities``
# (the simulator's live mode applies them too) and are re-exported here.
from tokencake.clients.priorities import NEUTRAL_SCORE as NEUTRAL_SCORE
from tokencake.clients.priorities import AgentPriorities
from tokencake.clients.priorities import AgentRank as AgentRank

# Under vLLM's "vllm" logger, so these lines appear in vLLM's output, in its format.
logger = logging.getLogger(f"vllm.{__name__}")

APP_IDLE_S = 300.0
"""An app with no request for this long is no longer asked about."""

# The private scheduler methods the guard and the running sort rely on.
_HOOKS = ("_handle_blocked_waiting_request", "_holds_kv_blocks")
_HOOKS_PRESENT = all(hasattr(Scheduler, name) for name in _HOOKS)
_PREEMPT_HOOK_PRESENT = hasattr(Scheduler, "_preempt_request")

Key = tuple[Any, ...]
Rank = float | tuple[Any, ...]
"""A queue's sort key for one request: smaller first; all of one queue's ranks compare."""


class AgentRankedQueue(RequestQueue):
    """vLLM's waiting queue, ordered by ``rank`` first and vLLM's own order second.

    With a constant ``rank`` it is exactly vLLM's queue for the same policy, whatever
    happened before: FCFS keeps a sequence number per entry (appends count up, prepends
    count down, so sequence order is the deque's order); PRIORITY orders by ``(priority,
    arrival_time, request_id)`` and "prepends" by inserting, as vLLM's heap does. The rank
    is computed on insertion and again by ``resort`` (the scheduler calls it when the
    daemon's scores change).
    """

    def __init__(self, policy: SchedulingPolicy, rank: Callable[[Request], Rank]) -> None:
        self._priority = policy == SchedulingPolicy.PRIORITY
        self._rank = rank
        self._items: list[Request] = []
        self._keys: dict[int, Key] = {}
        self._seq: dict[int, int] = {}
        self._back = 0
        self._front = 0

    def _key(self, request: Request) -> Key:
        rank = self._rank(request)
        if self._priority:
            # vLLM's heap order (priority, arrival_time, request_id), rank after priority.
            return (request.priority, rank, request.arrival_time, request.request_id)
        return (rank, self._seq[id(request)])

    def _stored_key(self, request: Request) -> Key:
        return self._keys[id(request)]

    def _insert(self, request: Request, *, front: bool) -> None:
        if front:
            self._front -= 1
            self._seq[id(request)] = self._front
        else:
            self._back += 1
            self._seq[id(request)] = self._back
        key = self._key(request)
        self._keys[id(request)] = key
        self._items.insert(bisect.bisect_left(self._items, key, key=self._stored_key), request)

    def _forget(self, request: Request) -> None:
        del self._keys[id(request)]
        del self._seq[id(request)]

    def resort(self) -> None:
        for request in self._items:
            self._keys[id(request)] = self._key(request)
        self._items.sort(key=self._stored_key)

    def add_request(self, request: Request) -> None:
        self._insert(request, front=False)

    def pop_request(self) -> Request:
        if not self._items:
            raise IndexError("pop from an empty queue")
        request = self._items.pop(0)
        self._forget(request)
        return request

    def peek_request(self) -> Request:
        if not self._items:
            raise IndexError("peek from an empty queue")
        return self._items[0]

    def prepend_request(self, request: Request) -> None:
        self._insert(request, front=not self._priority)

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.prepend_request(request)

    def remove_request(self, request: Request) -> None:
        self._items.remove(request)
        self._forget(request)

    def remove_requests(self, requests: Iterable[Request]) -> None:
        drop = {id(r) for r in requests}
        if not drop:
            return
        kept = []
        for request in self._items:
            if id(request) in drop:
                self._forget(request)
            else:
                kept.append(request)
        self._items = kept

    def __bool__(self) -> bool:
        return bool(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._items))


@dataclass(slots=True)
class SchedulerStats:
    """Counters a test or an operator reads from ``TokenCakeScheduler``."""

    refreshes: int = 0
    resorts: int = 0
    deferred: int = 0
    """Admissions the critical-inversion guard deferred (one per request and step)."""
    deferrals_expired: int = 0
    """Admissions let through because the request had been deferred for ``hold_max_s``."""


class TokenCakeScheduler(Scheduler):
    """See the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from tokencake.connectors.vllm.connector import TokenCakeConnector

        self.tc_stats = SchedulerStats()
        self.tc_priorities = AgentPriorities()
        self._tc_params: dict[str, AgentParams | None] = {}
        self._tc_apps: dict[str, float] = {}
        self._tc_agents: set[tuple[str, str]] = set()
        self._tc_next_refresh = 0.0
        self._tc_arrivals = False
        self._tc_deferred_since: dict[str, float] = {}
        self._tc_hold_max_s = 60.0
        connector = self.connector
        # The connector's scheduler side: its settings, its daemon link, its pool report.
        self._tc_conn = (
            connector.connector_scheduler if isinstance(connector, TokenCakeConnector) else None
        )
        if self._tc_conn is None:
            logger.warning(
                "TokenCakeScheduler without TokenCakeConnector: no agent priorities, "
                "scheduling as vLLM does"
            )
            return
        self._tc_refresh_s = self._tc_conn.cfg.priority_refresh_s
        self._tc_hold_max_s = self._tc_conn.cfg.hold_max_s
        self._tc_reserve_cap = guard.protect_cap(
            self._num_blocks(), self._tc_conn.cfg.reserve_fraction
        )
        if not _HOOKS_PRESENT:
            logger.warning("vLLM's Scheduler lacks %s: the admission guard is off", _HOOKS)
            self._tc_reserve_cap = 0
        if not _PREEMPT_HOOK_PRESENT:
            logger.warning("vLLM's Scheduler lacks _preempt_request: preemptions go unreported")
        self._tc_conn.set_queue_probe(self._tc_queue_sizes)
        # Both queues are empty here; vLLM only reaches them through RequestQueue's methods.
        self.waiting = AgentRankedQueue(self.policy, self._tc_rank)
        self.kv_holding_waiting = AgentRankedQueue(self.policy, self._tc_rank)

    def _tc_queue_sizes(self) -> tuple[int, int, int]:
        """(waiting, running, blocks the waiting requests still need): the pool state the
        connector reports; O(waiting), called at most once per ``state_report_s``."""
        bs = self.block_size
        need = 0
        for queue in (self.waiting, self.kv_holding_waiting):
            for r in queue:
                need += -(-(r.num_tokens - r.num_computed_tokens) // bs)
        return len(self.waiting) + len(self.kv_holding_waiting), len(self.running), need

    def _num_blocks(self) -> int:
        return int(self.kv_cache_config.num_blocks)

    # ------------------------------------------------------------------ ranks

    def _tc_agent(self, request: Request) -> AgentParams | None:
        req_id = request.request_id
        if req_id not in self._tc_params:
            self._tc_params[req_id] = agent_params(request.kv_transfer_params)
        return self._tc_params[req_id]

    def _tc_rank(self, request: Request) -> Rank:
        """Sort key of a request: the daemon's admission key (ascending sort, best first)."""
        return self.tc_priorities.order(self._tc_agent(request), request.arrival_time)

    def _tc_refresh(self, now: float) -> None:
        conn = self._tc_conn
        if conn is None:
            return
        waiting = bool(self.waiting) or bool(self.kv_holding_waiting)
        due = now >= self._tc_next_refresh or self._tc_arrivals
        if not (waiting and due):
            return
        self._tc_next_refresh = now + self._tc_refresh_s
        self._tc_arrivals = False
        for app_id, seen in list(self._tc_apps.items()):
            if now - seen > APP_IDLE_S:
                del self._tc_apps[app_id]
        self._tc_agents = {key for key in self._tc_agents if key[0] in self._tc_apps}
        self._tc_params = {k: v for k, v in self._tc_params.items() if k in self.requests}
        self._tc_deferred_since = {
            k: v for k, v in self._tc_deferred_since.items() if k in self.requests
        }
        apps = sorted(self._tc_apps, key=self._tc_apps.__getitem__, reverse=True)
        changed = self.tc_priorities.refresh(conn.link, apps)
        for app_id in self.tc_priorities.ended_apps:  # ended: stop asking about it
            self._tc_apps.pop(app_id, None)
        self.tc_stats.refreshes = self.tc_priorities.refreshes
        if changed:
            self.tc_stats.resorts += 1
            for queue in (self.waiting, self.kv_holding_waiting):
                if isinstance(queue, AgentRankedQueue):
                    queue.resort()

    # ------------------------------------------------------------------ vLLM hooks

    def add_request(self, request: Request) -> None:
        params = self._tc_agent(request) if self._tc_conn is not None else None
        if params is not None:
            self._tc_apps[params.app_id] = time.monotonic()
            self._tc_agents.add(params.key)
            self._tc_arrivals = True
        super().add_request(request)

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        if self._tc_conn is not None:
            self._tc_refresh(time.monotonic())
            if self.tc_priorities.ranks and len(self.running) > 1:
                # FCFS preempts self.running[-1]: keep the lowest priority last.
                self.running.sort(key=self._tc_rank)
        return super().schedule(throttle_prefills)

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any) -> None:
        conn = self._tc_conn
        if conn is None:
            super()._preempt_request(request, *args, **kwargs)
            return
        # Read before vLLM frees the blocks and sets num_computed_tokens to 0. This step's
        # tokens are not counted yet (``_update_after_schedule`` adds them): ``computed``
        # is KV that earlier steps write before any copy this step queues runs.
        blocks = list(self.kv_cache_manager.get_block_ids(request.request_id)[0])
        computed = request.num_computed_tokens
        super()._preempt_request(request, *args, **kwargs)
        conn.request_preempted(request, blocks, computed)

    def _handle_blocked_waiting_request(self, request: Request) -> bool:
        if not super()._handle_blocked_waiting_request(request):
            return False
        if not self._tc_admit(request):
            return False
        conn = self._tc_conn
        if conn is not None and conn.link_up:
            conn.make_room(request)  # pins held for the daemon give way to it
        return True

    def _tc_admit(self, request: Request) -> bool:
        """The critical-inversion guard: False defers ``request`` this step."""
        conn = self._tc_conn
        if self._tc_reserve_cap <= 0 or conn is None or self._holds_kv_blocks(request):
            return True
        if not conn.link_up:
            return True  # nothing is held back for a daemon that is not there
        params = self._tc_agent(request)
        prio = self.tc_priorities
        if prio.critical(params):
            return True
        ahead = prio.protected_blocks(params, self._tc_agents)
        protect = guard.total_protected((ahead,), self._tc_reserve_cap)
        if protect <= 0:
            return True
        need = -(-(request.num_tokens - request.num_computed_tokens) // self.block_size)
        free = self.kv_cache_manager.block_pool.get_num_free_blocks()
        if guard.verdict(critical=False, need=need, free=free, protect=protect).allowed:
            return True
        # A deferral is a hold taken for the daemon: it ends after hold_max_s, whatever
        # the daemon's ranks say.
        now = time.monotonic()
        since = self._tc_deferred_since.setdefault(request.request_id, now)
        if now - since >= self._tc_hold_max_s:
            self.tc_stats.deferrals_expired += 1
            return True
        self.tc_stats.deferred += 1
        logger.debug(
            "deferring %s: %d blocks of %d free, %d held for critical agents",
            request.request_id,
            need,
            free,
            protect,
        )
        return False


class TokenCakeAsyncScheduler(TokenCakeScheduler, AsyncScheduler):
    """``TokenCakeScheduler`` on vLLM's ``AsyncScheduler`` (async scheduling on; untested
    here: vLLM-CPU turns async scheduling off)."""
