"""The daemon's decisions applied to this engine's GPU blocks, and the holds they take.

Daemon decisions (pushes) are applied once per step: ``offload`` (store the agent's cached
GPU blocks; with ``free_gpu`` drop them from the GPU prefix cache and put them first in line
for reuse), ``drop`` (gpu), ``pin``/``unpin`` (hold the agent's cached blocks with a
reference so vLLM cannot evict them) and ``upload`` (the KV is staged on the host: with
``preload`` it is copied into free GPU blocks a chunk per step, otherwise the agent's next
request loads it).

Every hold is bounded by the connector's own clock (``hold_max_s``) and by the daemon's
liveness: when the link goes down, nothing is held a moment longer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tokencake import protocol as p
from tokencake.agent_params import AgentParams
from tokencake.connectors.vllm import preload
from tokencake.connectors.vllm.jobs import CopyJob, CopyJobs, Job, SchedulerSide, resident

# Under vLLM's "vllm" logger, so these lines appear in vLLM's output, in its format.
logger = logging.getLogger(f"vllm.{__name__}")

AgentKey = tuple[str, str]
QueueProbe = Callable[[], tuple[int, int, int]]


@dataclass(slots=True)
class AgentKv:
    """The engine blocks of an agent's last finished call, in prefix order."""

    blocks: list[int]
    hashes: list[bytes]
    open_tool: str = ""
    pinned: list[int] = field(default_factory=list)
    pin_until: float = 0.0
    watch_until: float = 0.0
    """While in a tool call: until when the engine keeps stepping for this agent's
    decisions when it has no requests (0: not watched)."""


class AgentHolds:
    """Agents' KV in this engine, and what the daemon's decisions hold of it."""

    def __init__(self, side: SchedulerSide, copies: CopyJobs) -> None:
        self.side = side
        self.copies = copies
        self.agents: dict[AgentKey, AgentKv] = {}
        self.preloads: dict[AgentKey, preload.Preload] = {}
        self.queue_probe: QueueProbe | None = None
        """(waiting requests, running requests, blocks the waiting requests need), set by
        ``TokenCakeScheduler``; without it all three are taken as 0."""
        copies.on_preload_done = self._preload_done
        side.link.on_down.append(self.release)

    def probe(self) -> tuple[int, int, int]:
        return self.queue_probe() if self.queue_probe is not None else (0, 0, 0)

    def watched(self, now: float) -> bool:
        """Some agent of this engine may still get a decision the engine should step for."""
        return any(now < a.watch_until for a in self.agents.values())

    def held(self) -> int:
        """Engine blocks held for the daemon now: pins (an offload's copy holds its blocks
        too, but only until the worker's copy ends, which needs no daemon)."""
        return sum(len(a.pinned) for a in self.agents.values())

    # ------------------------------------------------------------------ decisions

    def apply_pushes(self, now: float) -> None:
        """Carry out the decisions the daemon pushed since the last call, expire pins."""
        link = self.side.link
        for decision in link.pushes():
            if not link.up:
                break  # went down on the way: hold nothing more for a daemon that is gone
            self.apply(decision)
        self.expire(now)

    def apply(self, decision: p.DecisionRecord) -> None:
        """Apply one pushed decision to the agent's blocks in this engine (the daemon pushes
        offload, upload, drop, pin and unpin; the kinds it only keeps are never pushed)."""
        key = (decision.app_id, decision.agent_id)
        agent = self.agents.get(key)
        if agent is None or self.side.pool is None:
            return
        self.side.stats.decisions_applied += 1
        if isinstance(decision, p.OffloadDecision | p.PinDecision):
            # The daemon has the agent in a tool call (whoever reported it): its upload or
            # unpin is still to come, so an idle engine keeps stepping for it.
            watch = time.monotonic() + self.side.cfg.hold_max_s
            agent.watch_until = max(agent.watch_until, watch)
        if isinstance(decision, p.OffloadDecision):
            if self._offload(key, agent, free_gpu=decision.free_gpu):
                self.side.stats.offloads_started += 1
        elif isinstance(decision, p.UploadDecision):
            self._stage_upload(key, agent)
        elif isinstance(decision, p.DropDecision):
            if decision.where == "gpu":
                self.copies.to_free.append((agent.blocks, agent.hashes))
        elif isinstance(decision, p.PinDecision):
            self._pin(agent, decision.ttl_s)
        elif isinstance(decision, p.UnpinDecision):
            self.unpin(agent)

    def _stage_upload(self, key: AgentKey, agent: AgentKv) -> None:
        """The KV is in the host store. With preload it is copied into free GPU blocks a
        chunk per step (``advance_preloads``); otherwise, or for what is left when the
        agent's request comes, the request's lookup loads it then."""
        self.side.stats.uploads_staged += 1
        if self.side.cfg.preload and agent.hashes:
            deadline = time.monotonic() + self.side.cfg.hold_max_s
            self.preloads[key] = preload.Preload(list(agent.hashes), deadline)

    def _pin(self, agent: AgentKv, ttl_s: float) -> None:
        pool = self.side.pool
        assert pool is not None
        self.unpin(agent)
        agent.pinned = resident(pool, agent.blocks, agent.hashes)
        pool.touch([pool.blocks[b] for b in agent.pinned])
        # The daemon's time-to-live, never longer than the connector's own bound.
        ttl = min(max(ttl_s, 0.0), self.side.cfg.hold_max_s)
        agent.pin_until = time.monotonic() + ttl

    def _offload(self, key: AgentKey, agent: AgentKv, *, free_gpu: bool) -> bool:
        """Copy the agent's resident KV to the host (True: it had some). An offload ends the
        agent's pin: the copy takes its own references first, so the blocks are never free
        in between."""
        try:
            return self._start_offload(key, agent, free_gpu=free_gpu)
        finally:
            self.unpin(agent)

    def _start_offload(self, key: AgentKey, agent: AgentKv, *, free_gpu: bool) -> bool:
        pool = self.side.pool
        assert pool is not None
        blocks = resident(pool, agent.blocks, agent.hashes)
        if not blocks:
            return False
        hashes = agent.hashes[: len(blocks)]
        inflight = self.copies.saving(hashes)
        if inflight is not None:
            # A save of these blocks is in flight (the request's own, at its finish): it is
            # the offload's copy; free the blocks when it commits.
            inflight.free_gpu = inflight.free_gpu or free_gpu
            return True
        # Hold a reference so the blocks cannot be reused while the worker copies them.
        pool.touch([pool.blocks[b] for b in blocks])
        params = AgentParams(app_id=key[0], agent_id=key[1])
        job = self.copies.reserve(blocks, hashes, params, free_gpu=free_gpu, lend=True)
        if job is None:
            pool.free_blocks(pool.blocks[b] for b in reversed(blocks))
            return True
        job.release_refs = True
        return True

    # ------------------------------------------------------------------ pins

    def unpin(self, agent: AgentKv) -> None:
        pool = self.side.pool
        if agent.pinned and pool is not None:
            # Tail first, as vLLM frees a request's blocks: the prefix is evicted last.
            pool.free_blocks(pool.blocks[b] for b in reversed(agent.pinned))
        agent.pinned = []

    def yield_pins(self, short: int, *, keep: AgentKey | None, mine: set[int]) -> int:
        """A request the scheduler may admit lacks ``short`` free blocks and pins hold some:
        the pins give way. A pin is a bet that its agent returns before the memory is
        wanted; a request that is here now wins over it.

        The pins whose agents return last (the latest ``pin_until``) go first, until the
        blocks they alone held cover ``short``; ``keep`` (the request's own agent) and
        pins on ``mine`` (the request's cached prefix, which it shares) are not counted.
        Each yielded agent's KV is copied to the host, unless it is there already, so its
        return reloads it rather than recomputes it: the copy holds the blocks until the
        worker has run it (the next engine step), then they are free (cached, tail first).
        When all the pins together cannot cover ``short`` (running requests hold the rest),
        none yields: the request waits for those requests anyway. Returns the blocks freed,
        now or once the copies end."""
        pool = self.side.pool
        if pool is None or short <= 0:
            return 0
        pinned = [(k, a) for k, a in self.agents.items() if a.pinned and k != keep]
        pinned.sort(key=lambda item: item[1].pin_until, reverse=True)
        refs: dict[int, int] = {}
        freed = 0
        plan: list[tuple[AgentKey, AgentKv]] = []
        for key, agent in pinned:
            if freed >= short:
                break
            if all(b in mine for b in agent.pinned):
                continue
            for b in agent.pinned:
                refs[b] = refs.get(b, pool.blocks[b].ref_cnt) - 1
                if refs[b] == 0 and b not in mine:
                    freed += 1
            plan.append((key, agent))
        if freed < short:
            return 0  # running requests hold the rest: the request waits for them anyway
        for key, agent in plan:
            self._offload(key, agent, free_gpu=False)
            self.side.stats.pins_yielded += 1
            logger.debug("pin of %s yields to a waiting request (%d blocks short)", key, short)
        return freed

    def expire(self, now: float) -> None:
        for agent in self.agents.values():
            if agent.pinned and now >= agent.pin_until:
                self.unpin(agent)

    def enforce(self, now: float) -> None:
        """Every step, link up or down: pins end at their deadline, and pins last only
        while the daemon is known alive (``liveness_s``, else one ping)."""
        self.expire(now)
        link = self.side.link
        if not link.up or not self.held() or link.check_alive(now, self.side.cfg.liveness_s):
            return
        if link.up:  # a refusal (not a timeout) leaves it up: still, not alive
            link.down("no reply within liveness_s")

    def release(self) -> None:
        """The link went down: nothing the daemon asked for is held a moment longer."""
        for key, pending in list(self.preloads.items()):
            pending.done = True  # a chunk in flight ends with its copy (or fails: released)
            if not pending.inflight:
                del self.preloads[key]
        released = 0
        for agent in self.agents.values():
            released += len(agent.pinned)
            self.unpin(agent)
        if released:
            self.side.stats.holds_released += released
            logger.warning("TokenCake: released %d GPU blocks pinned for tokencaked", released)

    # ------------------------------------------------------------------ predictive upload

    def request_arrived(self, key: AgentKey) -> None:
        """The agent's request is here: no more watching, and what a preload has not
        brought to the GPU yet, the request loads itself."""
        agent = self.agents.get(key)
        if agent is not None:
            agent.watch_until = 0.0
        pending = self.preloads.get(key)
        if pending is not None:
            pending.done = True
            if not pending.inflight:
                del self.preloads[key]

    def advance_preloads(self, now: float) -> None:
        """Start the next chunk of each predictive upload that has none in flight."""
        link, pool = self.side.link, self.side.pool
        if pool is None or not link.up:
            return
        _, running, waiting_blocks = self.probe()
        for key, pending in list(self.preloads.items()):
            if pending.inflight:
                continue
            if not link.up:
                break  # went down on the way: release() has ended the preloads
            if pending.done or now > pending.deadline:
                self.preloads.pop(key, None)
                continue
            have = len(resident(pool, [], pending.hashes))
            if have < pending.brought:
                # Its own blocks were evicted since: the memory is wanted elsewhere. What is
                # not on the GPU, the agent's request loads on arrival.
                self.preloads.pop(key, None)
                self.side.stats.preloads_evicted += 1
                continue
            rest = pending.hashes[have:]
            n = preload.budget(
                pool,
                waiting_blocks=waiting_blocks,
                running=running,
                min_free=self.side.cfg.preload_min_free,
                want=min(len(rest), self.side.cfg.preload_chunk_blocks),
            )
            if not rest:
                self.preloads.pop(key, None)
            elif n > 0:  # else no room this step; try again next step, until the deadline
                self._start_chunk(key, pending, rest[:n], len(pending.hashes) - len(rest))

    def _start_chunk(
        self, key: AgentKey, pending: preload.Preload, hashes: list[bytes], first: int
    ) -> None:
        link, pool = self.side.link, self.side.pool
        assert pool is not None
        req = p.LoadBegin(link.engine_id, hashes, self.side.cfg.salt, *key)
        reply = link.call(req)
        if reply is None or not reply.slots:
            # The host has no more of it, or the call failed (the link may be down now).
            self.preloads.pop(key, None)
            return
        slots = list(reply.slots)
        blocks = preload.take(pool, len(slots))
        job_id = self.copies.next_job()
        self.copies.jobs[job_id] = Job(
            link.epoch,
            True,
            slots,
            prefix=blocks,
            hashes=hashes[: len(slots)],
            preload=key,
            first=first,
        )
        self.copies.loads.append(CopyJob(job_id, slots, blocks, lend=True))
        pending.inflight = job_id
        pending.brought = first + len(slots)

    def _preload_done(self, job_id: int, job: Job, ok: bool) -> None:
        """A chunk's copy ended: register the blocks (or release them unhashed)."""
        pool = self.side.pool
        assert job.preload is not None and pool is not None
        if ok:
            self.side.stats.preloaded_blocks += preload.register(
                pool, job.prefix, job.hashes, job.first, self.side.block_size
            )
        else:
            preload.release(pool, job.prefix)
        pending = self.preloads.get(job.preload)
        if pending is not None and pending.inflight == job_id:
            pending.inflight = 0
            if pending.done or not ok:
                self.preloads.pop(job.preload, None)
