"""Live mode: the simulator's engine replays a workload against a real ``tokencaked``.

In a pure simulation the engine asks a policy object in its own process. In live mode it
asks a running daemon instead, over the daemon's ZeroMQ socket, on a compressed clock: the
engine model plays the part that vLLM, ``TokenCakeConnector`` and ``TokenCakeScheduler`` play
in production, so the whole daemon (protocol, validation, the scheduler bridge, the policy,
its timers and its pushes) runs under a replayed load.

``DaemonPolicy`` is the one concept here: a ``Policy`` the existing ``Simulator`` drives
like any other, which decides nothing itself.

* **Events** become the ops an agent app and a connector send: ``register_app`` with the
  DAG, ``llm_call_start`` (naming this engine), ``llm_call_admitted`` (the blocks the
  request holds once scheduled) and ``llm_call_finish``, ``tool_call_start``
  with the predicted duration, ``tool_call_end``, ``app_end``, and ``engine_heartbeat`` with
  the engine's free block count every ``state_report_s`` simulated seconds (the connector
  reports it at most that often, when it changed; here also unchanged, so that the
  daemon's policy, which runs its timers on the events it gets, sees time pass at the
  replay's pace) and at least every second of wall time (which notices a dead daemon).
  The protocol has no op for a preemption or an eviction; the daemon learns of them
  through the free block count, as it does from vLLM.
* **Copies** are reported with real host-slot ops, as the connector does: the engine's
  copy observer (``Simulator(copies=...)``) calls ``copy_submitted`` when a copy enters the
  host link and ``copy_done`` when it completes. An offload ``reserve``s its blocks' chain
  keys (attributed to the agent) and ``commit``s them; an upload or an on-demand load pins
  them with ``load_begin`` and releases them with ``load_end``. The daemon turns these into
  ``TransferDone`` for its policy and measures the copy from the wall time between the two
  ops, so its cost model learns the replay's (scaled) link. No KV bytes are written: the
  engine registers a minimal layout (``bytes_per_block`` = 2 x block tokens), so a host store
  as large as the profile's takes a few MiB of arena.
* **Decisions** are the daemon's pushes. They are collected whenever the proxy talks to the
  daemon or paces, and returned, with this replay's app ids and simulated time, from the
  next ``on_event`` or ``tick``: the same typed structs an in-process policy returns, which
  the ``Simulator``'s ``_apply`` carries out. Pins are honoured the way the connector
  honours them (the agent's cached blocks are held until the pin's TTL or an unpin).
* **Queries** are answered as ``TokenCakeScheduler`` answers them, from ``list_agents``
  (``tokencake.clients.priorities.AgentPriorities``, refreshed every ``refresh_s`` simulated
  seconds while requests wait, and sooner after a new request): ``admission_order`` by
  application age, then the daemon's priority; ``may_allocate`` by ``guard.verdict`` with
  the engine's own free count and the protected blocks of the critical agents ranking ahead.
  ``eviction_order`` is LRU (least recently used first): vLLM evicts LRU and the protocol
  has no eviction query.

Time: ``scale`` wall seconds per simulated second. ``on_event`` and ``tick`` sleep until
the wall clock reaches ``start + (now - first) * scale`` (the ``Simulator`` ticks every 10 ms
of simulated time); when the replay falls behind it does not sleep, and the largest delay is
reported as ``max_lag_s``. Durations sent to the daemon (DAG expected times, tool hints) are
multiplied by ``scale``; durations that come back (an upload's ``start_in_s``, a pin's TTL) are
divided by it. The daemon's own timers are wall-clock ones: its policy ticks every 0.5 s of
wall time, i.e. every ``0.5 / scale`` simulated seconds.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from tokencake import guard
from tokencake import protocol as p
from tokencake.agent_params import AgentParams
from tokencake.clients.client import DaemonUnavailable, TokenCakeClient
from tokencake.clients.priorities import AgentPriorities
from tokencake.daemon.scheduler import (
    AgentEvent,
    CachedKv,
    EngineState,
    Event,
    Policy,
    WaitingRequest,
)
from tokencake.layout import KvLayout
from tokencake.segment import SLOT_BASE_OFFSET
from tokencake.sim.engine import EngineResult, SimulationError, Simulator
from tokencake.sim.profiles import Profile
from tokencake.sim.workload import Trace

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=msgspec.Struct)

LIVE_HEARTBEAT_S = 1.0
"""Wall seconds between heartbeats at most: keeps leases and notices a dead daemon."""


class LiveError(SimulationError):
    """Live mode could not run: the daemon refused the engine, or runs another policy."""


class DaemonLost(LiveError):
    """The daemon stopped answering (died, hung, or restarted and forgot this engine)."""


@dataclass(slots=True)
class LiveStats:
    """What one live replay exchanged with the daemon."""

    requests: int = 0
    events_sent: int = 0
    events_refused: int = 0
    """Agent events the daemon answered with an error (hints: the replay goes on)."""
    events_not_accepted: int = 0
    """Agent events the daemon acknowledged with ``accepted=false`` (did not fit the state)."""
    heartbeats: int = 0
    refreshes: int = 0
    deferred: int = 0
    """Admissions the critical-inversion guard deferred (one per request and step)."""
    pushes: dict[str, int] = field(default_factory=dict)
    """Decisions the daemon pushed to this engine, by kind."""
    slots_reserved: int = 0
    slots_committed: int = 0
    slots_loaded: int = 0
    max_lag_s: float = 0.0
    """Largest wall-clock delay behind the scaled schedule."""
    wall_s: float = 0.0


class _Link:
    """What ``AgentPriorities.refresh`` needs of a daemon link; failures raise (typed)."""

    up = True

    def __init__(self, call: Callable[[p.Request[Any]], Any]) -> None:
        self.call = call


def sim_layout(profile: Profile) -> KvLayout:
    """The smallest valid layout with the profile's block size: live mode copies no bytes."""
    return KvLayout(
        model_id=f"tokencake-sim:{profile.name}",
        num_layers=1,
        block_size=profile.block_tokens,
        num_kv_heads=1,
        head_dim=1,
        dtype="uint8",
        bytes_per_block=2 * profile.block_tokens,
    )


def arena_bytes_for(profile: Profile) -> int:
    """An arena whose slots of ``sim_layout`` hold the profile's whole host store."""
    need = SLOT_BASE_OFFSET + profile.host_blocks * sim_layout(profile).bytes_per_block
    mib = 1 << 20
    return max(mib, -(-need // mib) * mib)


def _hash(key: int) -> bytes:
    """A simulator chain key (a signed 64-bit int) as the 8-byte chain hash on the wire."""
    return (key & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "big")


class DaemonPolicy(Policy):
    """A ``Policy`` whose decisions come from a running ``tokencaked`` (module docstring).

    Registers one engine on construction; ``simulator(trace)`` builds the ``Simulator``
    wired to it (as policy and copy observer); ``close()`` unregisters the engine.
    """

    name = "daemon"

    def __init__(
        self,
        client: TokenCakeClient,
        profile: Profile,
        *,
        scale: float,
        app_prefix: str = "",
        engine_name: str = "",
        refresh_s: float = 0.1,
        state_report_s: float = 0.05,
        reserve_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        if not 0 < scale <= 1000:
            raise ValueError(f"time scale must be in (0, 1000], got {scale!r}")
        self.client = client
        self.profile = profile
        self.scale = scale
        self.app_prefix = app_prefix
        self.refresh_s = refresh_s
        self.state_report_s = state_report_s
        self.stats = LiveStats()
        self.priorities = AgentPriorities()
        self._cap = guard.protect_cap(profile.gpu_blocks, reserve_fraction)
        self._inbox: list[p.DecisionRecord] = []
        self._origin: tuple[float, float, float] | None = None  # (sim, monotonic, epoch)
        self._started = time.monotonic()
        self._sim: Simulator | None = None
        self._apps: dict[str, float] = {}  # wire app id -> last request (sim time)
        self._agents: set[tuple[str, str]] = set()
        self._copies: dict[int, tuple[str, list[int]]] = {}
        self._state: tuple[int, int, int, int] | None = None
        self._next_report = 0.0
        self._next_refresh = 0.0
        self._arrivals = False
        self._last_heartbeat = 0.0
        self._link = _Link(self._call)
        name = engine_name or f"tokencake-sim-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        reg = self._call(p.RegisterEngine(name, sim_layout(profile), profile.gpu_blocks))
        self.engine_id = reg.engine_id
        self._heartbeat_s = min(reg.heartbeat_s, LIVE_HEARTBEAT_S)
        self._last_heartbeat = time.monotonic()
        config = self._call(p.GetConfig()).config
        self.daemon_policy = str(config.get("policy", ""))

    # ------------------------------------------------------------------ wiring

    def simulator(self, trace: Trace, **kwargs: Any) -> Simulator:
        """A ``Simulator`` of ``trace`` on this policy's profile, reporting copies here."""
        sim = Simulator(trace, self, self.profile, copies=self, **kwargs)
        self._sim = sim
        return sim

    def close(self) -> None:
        """Unregister the engine (its unfinished reservations and pins are released)."""
        self.stats.wall_s = time.monotonic() - self._started
        try:
            self.client.call(p.UnregisterEngine(self.engine_id))
        except (DaemonUnavailable, p.RemoteError) as exc:
            logger.debug("unregister_engine failed: %s", exc)

    # ------------------------------------------------------------------ daemon calls

    def _call(self, req: p.Request[R]) -> R:
        self.stats.requests += 1
        try:
            reply = self.client.call(req)
        except DaemonUnavailable as exc:
            raise DaemonLost(f"tokencaked stopped answering during {req.op}: {exc}") from exc
        except p.RemoteError as exc:
            if exc.code == p.ErrorCode.UNKNOWN_ENGINE:
                raise DaemonLost(
                    f"tokencaked no longer knows engine {getattr(self, 'engine_id', '?')!r} "
                    f"(restarted?): {exc}"
                ) from exc
            raise
        self._drain()
        return reply

    def _drain(self) -> None:
        if self.client.pushes:
            self._inbox.extend(self.client.pushes)
            self.client.pushes.clear()

    def _event(self, req: p.Request) -> None:
        try:
            ack = self._call(req)
        except p.RemoteError as exc:
            self.stats.events_refused += 1
            logger.debug("tokencaked refused %s: %s", req.op, exc)
            return
        self.stats.events_sent += 1
        if not ack.accepted:
            self.stats.events_not_accepted += 1

    def _heartbeat(self, free: int, waiting: int, running: int, waiting_blocks: int) -> None:
        self._call(
            p.EngineHeartbeat(self.engine_id, free, waiting, running, waiting_blocks),
        )
        self.stats.heartbeats += 1
        self._last_heartbeat = time.monotonic()

    # ------------------------------------------------------------------ clock

    def _pace(self, now: float) -> None:
        """Wait until the wall clock reaches ``now`` on the scaled schedule (pushes that
        arrive meanwhile are collected)."""
        if self._origin is None:
            self._origin = (now, time.monotonic(), time.time())
            return
        target = self._origin[1] + (now - self._origin[0]) * self.scale
        while True:
            left = target - time.monotonic()
            if left <= 0:
                break
            if left < 0.001:
                time.sleep(left)
                break
            self._inbox.extend(self.client.poll_pushes(left))
        lag = time.monotonic() - target
        if lag > self.stats.max_lag_s:
            self.stats.max_lag_s = lag

    def _wall_epoch(self, sim_s: float) -> float:
        """A simulated instant on ``time.time()``'s clock (vLLM's ``arrival_time`` clock)."""
        if self._origin is None:
            return time.time()
        return self._origin[2] + (sim_s - self._origin[0]) * self.scale

    # ------------------------------------------------------------------ Policy

    def on_event(self, event: Event, now: float) -> list[p.DecisionRecord]:
        self._pace(now)
        if isinstance(event, EngineState):
            self._state = (
                event.gpu_blocks_free,
                event.num_waiting,
                event.num_running,
                event.waiting_blocks,
            )
            self._report_state(now)
        elif isinstance(event, AgentEvent):
            self._send(event, now)
        # LlmCallPreempted, KvEvicted: no op exists (the daemon sees them in the free count).
        # TransferDone, TransferMeasured: reported through the host-slot ops of
        # copy_submitted / copy_done.
        return self._decisions(now)

    def _send(self, event: AgentEvent, now: float) -> None:
        """The agent event as the simulated app or connector sends it: its app under this
        run's prefix, the simulated seconds it carries stretched to wall seconds."""
        wire = self.app_prefix + event.app_id
        s = self.scale
        sent: AgentEvent = event
        if isinstance(event, p.RegisterApp):
            nodes = [
                msgspec.structs.replace(
                    n, expected_llm_s=n.expected_llm_s * s, expected_tool_s=n.expected_tool_s * s
                )
                for n in event.dag.nodes
            ]
            sent = msgspec.structs.replace(
                event, dag=p.AppDag(nodes=nodes, edges=list(event.dag.edges))
            )
        elif isinstance(event, p.LlmCallStart):
            self._apps[wire] = now
            self._agents.add((wire, event.agent_id))
            self._arrivals = True
            # A connector names its engine, and cannot know the blocks a request needs
            # before vLLM schedules it: the daemon derives them from the prompt.
            sent = msgspec.structs.replace(event, engine_id=self.engine_id, blocks=0)
        elif isinstance(event, p.ToolCallStart) and event.predicted_s is not None:
            sent = msgspec.structs.replace(event, predicted_s=event.predicted_s * s)
        self._event(msgspec.structs.replace(sent, app_id=wire))
        if isinstance(event, p.AppEnd):
            self._apps.pop(wire, None)
            self._agents = {k for k in self._agents if k[0] != wire}

    def tick(self, now: float) -> list[p.DecisionRecord]:
        self._pace(now)
        self._report_state(now)
        if time.monotonic() - self._last_heartbeat >= self._heartbeat_s:
            self._heartbeat(*(self._state or (-1, 0, 0, 0)))
        self._inbox.extend(self.client.poll_pushes())
        return self._decisions(now)

    def _report_state(self, now: float) -> None:
        """A heartbeat with the engine's state every ``state_report_s`` simulated seconds,
        changed or not: the daemon's policy runs its timers (predictive uploads, pin TTLs,
        deadlines) on the events it gets, and its own tick (0.5 s of wall time) is too
        coarse on a compressed clock."""
        if self._state is None or now < self._next_report:
            return
        self._next_report = now + self.state_report_s
        self._heartbeat(*self._state)

    def _decisions(self, now: float) -> list[p.DecisionRecord]:
        self._drain()
        if not self._inbox:
            return []
        records, self._inbox = self._inbox, []
        out: list[p.DecisionRecord] = []
        for rec in records:
            d = self._decision(rec, now)
            if d is not None:
                out.append(d)
        return out

    def _decision(self, rec: p.DecisionRecord, now: float) -> p.DecisionRecord | None:
        """A pushed decision as the simulator takes it: this replay's app id, simulated time
        and durations (the daemon's are wall seconds)."""
        if rec.engine_id != self.engine_id or not rec.app_id.startswith(self.app_prefix):
            return None
        self.stats.pushes[rec.kind] = self.stats.pushes.get(rec.kind, 0) + 1
        rec = msgspec.structs.replace(rec, at_s=now, app_id=rec.app_id[len(self.app_prefix) :])
        if isinstance(rec, p.UploadDecision):
            rec.start_in_s = max(0.0, rec.start_in_s) / self.scale
        elif isinstance(rec, p.PinDecision):
            rec.ttl_s = max(0.0, rec.ttl_s) / self.scale
        return rec

    # ------------------------------------------------------------------ queries

    def _refresh(self, now: float) -> None:
        if now < self._next_refresh and not self._arrivals:
            return
        self._next_refresh = now + self.refresh_s
        self._arrivals = False
        apps = sorted(self._apps, key=self._apps.__getitem__, reverse=True)
        try:
            self.priorities.refresh(self._link, apps)
        except p.RemoteError as exc:
            raise LiveError(f"list_agents failed: {exc}") from exc
        self.stats.refreshes = self.priorities.refreshes

    def _params(self, app_id: str, agent_id: str) -> AgentParams | None:
        """The request's agent metadata; None for plain traffic, which carries none (as a
        vLLM request without TokenCake's ``kv_transfer_params``)."""
        sim = self._sim
        if sim is not None and app_id in sim.plain_apps:
            return None
        return AgentParams(self.app_prefix + app_id, agent_id)

    def admission_order(
        self, waiting: Sequence[WaitingRequest], now: float
    ) -> list[WaitingRequest]:
        if not waiting:
            return []
        self._refresh(now)
        prio = self.priorities
        return sorted(
            waiting,
            key=lambda w: prio.order(
                self._params(w.app_id, w.agent_id), self._wall_epoch(w.arrival_s)
            ),
        )

    def may_allocate(self, app_id: str, agent_id: str, n_blocks: int, now: float) -> bool:
        if self._cap <= 0:
            return True
        params = self._params(app_id, agent_id)
        prio = self.priorities
        if prio.critical(params):
            return True
        protect = guard.total_protected((prio.protected_blocks(params, self._agents),), self._cap)
        if protect <= 0:
            return True
        sim = self._sim
        free = sim.free_blocks() if sim is not None else 0
        if guard.verdict(critical=False, need=n_blocks, free=free, protect=protect).allowed:
            return True
        self.stats.deferred += 1
        return False

    def eviction_order(self, candidates: Sequence[CachedKv], now: float) -> list[CachedKv]:
        """LRU, as vLLM evicts; agents under a pushed pin are held, as the connector does
        (the engine keeps the pins: ``Simulator.lru_order``)."""
        return self._sim.lru_order(candidates) if self._sim is not None else []

    # ------------------------------------------------------------------ copy observer

    def copy_submitted(
        self, seq: int, kind: str, app_id: str, agent_id: str, keys: list[int]
    ) -> None:
        if not keys:
            return
        if self._sim is not None:
            self._pace(self._sim.now)
        hashes = [_hash(k) for k in keys]
        wire = self.app_prefix + app_id
        try:
            if kind == "offload":
                slots = self._call(
                    p.Reserve(self.engine_id, hashes, app_id=wire, agent_id=agent_id),
                ).slots
                writes = [s for s in slots if s >= 0]
                self.stats.slots_reserved += len(writes)
                self._copies[seq] = ("store", writes)
            else:
                reads = self._call(
                    p.LoadBegin(self.engine_id, hashes, app_id=wire, agent_id=agent_id),
                ).slots
                self._copies[seq] = ("load", reads)
        except p.RemoteError as exc:  # e.g. no_space: the copy goes unreported
            logger.debug("tokencaked refused the slots of copy %d: %s", seq, exc)

    def copy_done(self, seq: int) -> None:
        op, slots = self._copies.pop(seq, ("", []))
        if not slots:
            return
        if self._sim is not None:
            self._pace(self._sim.now)
        try:
            if op == "store":
                n = self._call(p.Commit(self.engine_id, slots)).committed
                self.stats.slots_committed += n
            else:
                n = self._call(p.LoadEnd(self.engine_id, slots)).released
                self.stats.slots_loaded += n
        except p.RemoteError as exc:  # a lease ran out: the daemon released the slots
            logger.debug("tokencaked refused to finish copy %d: %s", seq, exc)


@dataclass(slots=True)
class LiveResult:
    result: EngineResult
    stats: LiveStats
    daemon_policy: str
    engine_id: str


def run_live(
    trace: Trace,
    profile: Profile,
    endpoint: str,
    *,
    scale: float,
    app_prefix: str = "",
    timeout_s: float = 2.0,
    **policy_kwargs: Any,
) -> LiveResult:
    """Replay ``trace`` against the daemon at ``endpoint``. Raises ``DaemonLost`` when the
    daemon stops answering, ``SimulationError`` when the replay cannot finish."""
    with TokenCakeClient(endpoint, timeout_s=timeout_s) as client:
        policy = DaemonPolicy(client, profile, scale=scale, app_prefix=app_prefix, **policy_kwargs)
        try:
            sim = policy.simulator(trace)
            res = sim.run()
        finally:
            policy.close()
    return LiveResult(res, policy.stats, policy.daemon_policy, policy.engine_id)
