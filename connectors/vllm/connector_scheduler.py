"""``TokenCakeConnectorScheduler``: the connector's scheduler side (control plane).

It talks to the daemon over ZMQ with millisecond timeouts:

- ``get_num_new_matched_tokens`` pins the longest host-resident prefix of the request's
  chain hashes beyond vLLM's own prefix-cache hit (``load_begin``) and reports it as an
  asynchronous load. The keys are vLLM's own request block hashes (``request.block_hashes``,
  SHA-256 chain hashes with a fixed seed, so they agree across processes and restarts and
  already include ``cache_salt`` and LoRA).
- ``update_state_after_alloc`` turns the pin into a copy job into the blocks vLLM allocated;
  ``build_connector_meta`` ships this step's jobs to the workers (``jobs.CopyJobs``).
- ``request_finished`` reserves host slots for the request's full blocks not yet stored and
  keeps the blocks (returns True) until the worker has copied them; then they are committed.
- The agent events of requests that carry agent parameters go to the daemon (LLM call
  start, admission, preemption, finish, the tool call that follows), and its decisions come
  back as pushes, applied once per step (``holds.AgentHolds``).
- A preemption (``TokenCakeScheduler`` tells ``request_preempted``) is reported at the end of
  the step that made it, with the blocks that still hold the request's KV then; the daemon's
  write-through decision, applied at once, copies exactly those (``docs/vllm.md``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tokencake import protocol as p
from tokencake.agent_params import NAMESPACE, AgentParams, agent_params
from tokencake.clients.client import DaemonLink
from tokencake.connectors.vllm.config import ConnectorConfig
from tokencake.connectors.vllm.holds import AgentHolds, AgentKv, QueueProbe
from tokencake.connectors.vllm.jobs import (
    ConnectorStats,
    CopyJobs,
    Hit,
    SchedulerSide,
    TokenCakeMetadata,
    TokenCakeWorkerMetadata,
    resident,
)
from tokencake.layout import KvLayout

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# Under vLLM's "vllm" logger, so these lines appear in vLLM's output, in its format.
logger = logging.getLogger(f"vllm.{__name__}")

DECISION_GRACE_S = 1.0
"""After an agent's call finishes, an idle engine keeps stepping this long for the daemon's
decisions on the tool call that may follow (reported by the app, or a gateway)."""


@dataclass(slots=True)
class Preempted:
    """A preempted agent request, to report at the end of the step: its computed full
    blocks (ids and chain hashes, in prefix order), read before vLLM freed them."""

    params: AgentParams
    req_id: str
    blocks: list[int]
    hashes: list[bytes]
    freed: int


class TokenCakeConnectorScheduler:
    """The connector's state and hooks in vLLM's scheduler process."""

    def __init__(
        self,
        cfg: ConnectorConfig,
        layout: KvLayout,
        *,
        block_size: int,
        hash_stride: int,
        num_gpu_blocks: int,
    ) -> None:
        self.cfg = cfg
        self.block_size = block_size
        self.stats = ConnectorStats()
        self._hash_stride = hash_stride
        name = cfg.engine_name or f"vllm:{layout.model_id.split('|')[0]}"[:256]
        self.link = DaemonLink(cfg, layout, name, num_gpu_blocks, log=logger)
        self.side = SchedulerSide(cfg, self.link, self.stats, block_size)
        self.copies = CopyJobs(self.side)
        self.holds = AgentHolds(self.side, self.copies)
        self._params: dict[str, AgentParams] = {}
        self._req_loaded: dict[str, int] = {}
        self._unreported: dict[str, int] = {}
        """Agent requests whose start the daemon has not heard of (the link was down when
        they arrived), with their prompt tokens."""
        self._preempted: list[Preempted] = []
        self._admitted: set[str] = set()
        """Agent requests whose admission the daemon heard of (once per admission: vLLM
        allocates twice for a request that loads from the host, before and after the load)."""
        self._missed: dict[str, tuple[int, int, int, float]] = {}
        """Waiting requests whose last lookup found nothing: (link epoch, first block,
        blocks asked, when), so that a retry within ``lookup_retry_s`` asks nothing."""
        self._pushes_applied = False
        self._next_state_report = 0.0
        self._last_state: tuple[int, int, int, int] | None = None
        self.link.maybe_connect(time.monotonic(), wait=True)

    @property
    def link_up(self) -> bool:
        return self.link.up

    @property
    def pool(self) -> BlockPool | None:
        return self.side.pool

    @property
    def agents(self) -> dict[tuple[str, str], AgentKv]:
        return self.holds.agents

    def resident(self, blocks: list[int], hashes: list[bytes]) -> list[int]:
        """The engine blocks that hold ``hashes`` now (``jobs.resident``)."""
        return resident(self.side.pool, blocks, hashes)

    def make_room(self, request: Request) -> int:
        """``TokenCakeScheduler`` may admit ``request`` now: if the free blocks cannot hold
        it and pins hold blocks, the pins give way (``AgentHolds.yield_pins``). A pin is a
        speculative hold; a request that can run is never kept waiting for it. Returns the
        blocks freed for it (free once the yielded agents' copies end, one step)."""
        pool = self.side.pool
        if pool is None or not self.holds.held():
            return 0
        # What vLLM's allocation takes from the free queue for the whole request: a block
        # of its cached prefix that another request uses costs nothing, an idle one (in
        # the free queue) costs one, as a new block does.
        mine = resident(pool, [], self._chain(request))
        in_use = sum(1 for b in mine if pool.blocks[b].ref_cnt > 0)
        need = -(-request.num_tokens // self.block_size) - in_use
        short = need - pool.get_num_free_blocks()
        if short <= 0:
            return 0
        params = self._params.get(request.request_id)
        keep = params.key if params is not None else None
        return self.holds.yield_pins(short, keep=keep, mine=set(mine))

    def set_queue_probe(self, probe: QueueProbe) -> None:
        """``TokenCakeScheduler``'s (waiting, running, blocks the waiting need), reported
        to the daemon as the pool's state; without it all three are reported as 0."""
        self.holds.queue_probe = probe

    def get_stats(self) -> dict[str, int]:
        """The counters, plus failed daemon calls by cause (``errors.<code>``)."""
        out = asdict(self.stats)
        out.update({f"errors.{code}": n for code, n in self.link.errors.items()})
        return out

    def shutdown(self) -> None:
        self.link.close()

    # ------------------------------------------------------------------ helpers

    def _chain(self, request: Request) -> list[bytes]:
        """One chain hash per full engine block (the hash at the block's last hash unit)."""
        hashes = request.block_hashes
        k = self._hash_stride
        if k == 1:
            return [bytes(h) for h in hashes]
        return [bytes(hashes[i]) for i in range(k - 1, len(hashes), k)]

    def _event(self, req: p.Request) -> bool:
        """Report an agent event; True when the daemon accepted it (it knows the agent)."""
        ack = self.link.call(req)
        if ack is None:
            return False
        self.stats.events_sent += 1
        if not ack.accepted:
            self.stats.events_refused += 1
        return bool(ack.accepted)

    def _engine_state(self) -> tuple[int, int, int, int]:
        """(free GPU blocks, waiting requests, running requests, waiting blocks) as the
        daemon wants them: free counts idle cached blocks, as vLLM's free block queue does
        (-1: unknown)."""
        pool = self.side.pool
        free = pool.get_num_free_blocks() if pool is not None else -1
        return free, *self.holds.probe()

    # ------------------------------------------------------------------ vLLM's hooks

    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        self.side.pool = gpu_block_pool

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        req_id, link, now = request.request_id, self.link, time.monotonic()
        if link.up and not self._pushes_applied:
            # Before this step's first allocation: a pin or offload decided while the engine
            # sat idle (agents in tool calls) must hold its blocks before a new request can
            # take them.
            self.holds.apply_pushes(now)
            self._pushes_applied = True
        start = num_computed_tokens // self.block_size
        # vLLM must compute at least the last prompt token itself.
        end = min((request.num_tokens - 1) // self.block_size, len(request.block_hashes))
        hashes = self._chain(request)[start:end]
        if not link.up or num_computed_tokens % self.block_size or not hashes:
            self.copies.release_hit(req_id)
            return 0, False
        if self._answer_stands(req_id, start, len(hashes), now):
            # A retry (vLLM could not allocate for it last step): the same answer, no call.
            self.stats.lookups_reused += 1
            hit = self.copies.hits.get(req_id)
            return (len(hit.slots) * self.block_size, True) if hit else (0, False)
        self.copies.release_hit(req_id)
        self.stats.lookups += 1
        params = self._params.get(req_id)
        # Naming the agent lets the daemon account the load as the agent's upload (load_end).
        req = p.LoadBegin(
            link.engine_id,
            hashes,
            self.cfg.salt,
            app_id=params.app_id if params else "",
            agent_id=params.agent_id if params else "",
        )
        reply = link.call(req)
        if reply is None or not reply.slots:
            if reply is not None:
                self._missed[req_id] = (link.epoch, start, len(hashes), now)
            return 0, False
        self.copies.hits[req_id] = Hit(link.epoch, start, list(reply.slots), len(hashes), now)
        return len(reply.slots) * self.block_size, True

    def _answer_stands(self, req_id: str, start: int, asked: int, now: float) -> bool:
        """The request's last lookup still answers this one: the same blocks asked of the
        same registration, less than ``lookup_retry_s`` ago, and no copy of this engine
        started or ended since (the host may hold more of the prefix then). A hit's host
        slots stay pinned meanwhile."""
        hit = self.copies.hits.get(req_id)
        if hit is not None:
            last = (hit.epoch, hit.start_block, hit.asked, hit.at)
        elif req_id in self._missed:
            last = self._missed[req_id]
        else:
            return False
        epoch, first, n, at = last
        return (
            (epoch, first, n) == (self.link.epoch, start, asked)
            and now - at < self.cfg.lookup_retry_s
            and self.copies.progress_at <= at
        )

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        req_id = request.request_id
        self._missed.pop(req_id, None)
        params = self._params.get(req_id)
        block_ids = list(blocks.get_block_ids()[0])
        if params is not None and self.link.up and req_id not in self._admitted:
            # Admission: the daemon's policy counts these blocks as taken from now on.
            self._admitted.add(req_id)
            admitted = p.LlmCallAdmitted(params.app_id, params.agent_id, req_id, len(block_ids))
            self._event(admitted)
        loaded = self.copies.load_hit(req_id, block_ids, num_external_tokens // self.block_size)
        if loaded:
            self._req_loaded[req_id] = loaded

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> TokenCakeMetadata:
        link, now = self.link, time.monotonic()
        if link.maybe_connect(now):
            self.stats.reconnects += 1
            self._next_state_report, self._last_state = now, None  # report at once
            self._report_unreported()
            self.copies.fail_queued()
        self.holds.enforce(now)
        if self._preempted:
            self._report_preempted()
        if link.up:
            self._report_state(now)
            self.holds.apply_pushes(now)
        self._pushes_applied = False  # a new step: apply again before its first allocation
        self.copies.free_pending()
        if self.holds.preloads:
            self.holds.advance_preloads(now)
        reg = link.reg
        loads, stores = self.copies.take()
        return TokenCakeMetadata(
            arena_name=reg.arena_name if reg else "",
            arena_bytes=reg.arena_bytes if reg else 0,
            slot_bytes=reg.slot_bytes if reg else 0,
            epoch=link.epoch if reg else 0,
            engine_id=reg.engine_id if reg else "",
            loads=loads,
            stores=stores,
        )

    def _report_state(self, now: float) -> None:
        """The pool's state, looked at most every ``state_report_s`` (the queue probe is
        O(waiting)); sent when it changed, or with the lease heartbeat."""
        link = self.link
        heartbeat_due = now >= link.next_heartbeat
        if link.reg is None or not (heartbeat_due or now >= self._next_state_report):
            return
        self._next_state_report = now + self.cfg.state_report_s
        state = self._engine_state()
        if heartbeat_due or state != self._last_state:
            link.next_heartbeat = now + link.reg.heartbeat_s
            self._last_state = state
            link.call(p.EngineHeartbeat(link.engine_id, *state))

    def request_preempted(self, request: Request, block_ids: list[int], computed: int) -> None:
        """vLLM preempted ``request`` (``TokenCakeScheduler._preempt_request``): it had
        ``block_ids`` and ``computed`` tokens whose KV is written, read before the free.

        Reported by ``build_connector_meta``, after the step's allocations: the preemption
        freed the blocks for a running request, which takes what it needs first (vLLM frees
        the tail first, so the prefix stays cached longest). What is still cached then is
        what the daemon's write-through (an offload that keeps the GPU copy) can save.
        """
        params = self._params.get(request.request_id)
        if params is None:
            return
        self._admitted.discard(request.request_id)  # its next admission is reported again
        hashes = self._chain(request)
        n_full = min(len(block_ids), computed // self.block_size, len(hashes))
        self._preempted.append(
            Preempted(
                params, request.request_id, block_ids[:n_full], hashes[:n_full], len(block_ids)
            )
        )

    def _report_preempted(self) -> None:
        """Report this step's preemptions. Each request's cached blocks become its agent's
        KV in this engine, so an offload the daemon decides on the report (applied right
        after, before any allocation) copies exactly the blocks it counted."""
        pending, self._preempted = self._preempted, []
        for pre in pending:
            if pre.req_id not in self._params:
                continue  # finished (aborted) since
            agent = self.holds.agents.setdefault(pre.params.key, AgentKv([], []))
            cached = self.resident(pre.blocks, pre.hashes)
            agent.blocks, agent.hashes = cached, pre.hashes[: len(cached)]
            if not self.link.up:
                continue
            self.stats.preemptions_reported += 1
            app_id, agent_id = pre.params.key
            self._event(
                p.LlmCallPreempted(
                    app_id, agent_id, pre.req_id, blocks_freed=pre.freed, blocks_cached=len(cached)
                )
            )

    def on_new_request(self, request: Request) -> None:
        params = agent_params(request.kv_transfer_params)
        if params is None:
            return
        self._params[request.request_id] = params
        self.holds.request_arrived(params.key)
        if not self.link.up:
            # Reported when the link comes back, if the request is still in flight then.
            self._unreported[request.request_id] = request.num_prompt_tokens
            return
        agent = self.holds.agents.get(params.key)
        if agent is not None and agent.open_tool:
            self._event(p.ToolCallEnd(params.app_id, params.agent_id, call_id=agent.open_tool))
            agent.open_tool = ""
        self._report_start(request.request_id, params, request.num_prompt_tokens)

    def _report_start(self, req_id: str, params: AgentParams, prompt_tokens: int) -> None:
        if not self.link.up:
            self._unreported[req_id] = prompt_tokens
            return
        start = p.LlmCallStart(
            params.app_id,
            params.agent_id,
            engine_id=self.link.engine_id,
            request_id=req_id,
            prompt_tokens=prompt_tokens,
        )
        if not self._event(start) and not self.link.up:
            self._unreported[req_id] = prompt_tokens

    def _report_unreported(self) -> None:
        """The link is back: report the agent requests that arrived while it was down."""
        pending, self._unreported = self._unreported, {}
        for req_id, prompt_tokens in pending.items():
            params = self._params.get(req_id)
            if params is not None and self.link.up:
                self._report_start(req_id, params, prompt_tokens)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self.copies.release_hit(req_id)
        self._missed.pop(req_id, None)
        self._admitted.discard(req_id)
        params = self._params.pop(req_id, None)
        out = {NAMESPACE: {"loaded_tokens": self._req_loaded.pop(req_id, 0)}}
        prompt_tokens = self._unreported.pop(req_id, None)
        hashes = self._chain(request)
        n_full = min(len(block_ids), request.num_computed_tokens // self.block_size, len(hashes))
        blocks, hashes = list(block_ids[:n_full]), hashes[:n_full]
        daemon_moves = False
        if params is not None:
            agent = self.holds.agents.setdefault(params.key, AgentKv([], []))
            agent.blocks, agent.hashes = blocks, hashes
            daemon_moves = self._finish_call(request, params, agent, n_full, prompt_tokens)
        cfg = self.cfg
        free_gpu = params is not None and params.tool is not None and cfg.tool_offload == "always"
        save = not daemon_moves and (
            cfg.save == "finished"
            or (cfg.save == "tool" and params is not None and params.tool is not None)
        )
        if not n_full or not self.link.up or not (save or free_gpu):
            return False, out
        job = self.copies.reserve(blocks, hashes, params, req_id=req_id, free_gpu=free_gpu)
        return job is not None, out

    def _finish_call(
        self,
        request: Request,
        params: AgentParams,
        agent: AgentKv,
        n_full: int,
        prompt_tokens: int | None,
    ) -> bool:
        """Report the agent's finished call (and the tool call it ends in); True when the
        daemon's offload decision moves its KV rather than a write-through save."""
        req_id = request.request_id
        # The app or a gateway may report the tool call that follows, just after this
        # answer: keep an idle engine stepping a moment for the daemon's decisions.
        grace = time.monotonic() + min(DECISION_GRACE_S, self.cfg.hold_max_s)
        agent.watch_until = max(agent.watch_until, grace)
        if not self.link.up:
            return False
        if prompt_tokens is not None:
            self._report_start(req_id, params, prompt_tokens)  # it began while down
            self._unreported.pop(req_id, None)
        if not self.link.up:
            return False
        finish = p.LlmCallFinish(
            params.app_id,
            params.agent_id,
            request_id=req_id,
            output_tokens=request.num_output_tokens,
            kv_blocks=n_full,
        )
        tracked = self._event(finish)
        if params.tool is not None:
            agent.open_tool = req_id
            # Keep an idle engine stepping while the daemon decides about this call
            # (offload, pin, upload): about twice the predicted call, at most hold_max_s.
            predicted = params.tool.predicted_s or self.cfg.hold_max_s
            watch = min(2.0 * predicted, self.cfg.hold_max_s)
            agent.watch_until = max(agent.watch_until, time.monotonic() + watch)
            tool = params.tool
            self._event(
                p.ToolCallStart(
                    params.app_id,
                    params.agent_id,
                    tool.kind,
                    predicted_s=tool.predicted_s,
                    call_id=req_id,
                )
            )
        # The daemon tracks this agent: its offload decision moves the KV, and the d2h copy
        # it commits is what the daemon's scheduler counts. A write-through save now would
        # commit first, uncounted, and leave that decision nothing to copy (so the
        # scheduler would never see the offload complete).
        return tracked and self.cfg.tool_offload == "daemon"

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, TokenCakeWorkerMetadata):
            self.copies.finished(meta)

    def has_pending_push_work(self) -> bool:
        """vLLM asks this when it has no requests: True keeps its engine loop stepping.

        It does while copies are queued or in flight, a predictive upload is under way, or
        the daemon's decisions for an agent of this engine may still come: for
        ``DECISION_GRACE_S`` after its call, for the tool call its request declared (twice
        the hint), or after a pin or offload (until its upload); never past ``hold_max_s``.
        In the last cases at most every ``idle_tick_s``, so an idle engine costs little.
        An empty step runs the connector's scheduler side (pushes, preloads) and the
        worker's copies (vLLM's no-forward path), and nothing else.
        """
        now = time.monotonic()
        if self.copies.queued() or self.holds.preloads:
            return True
        if self.copies.jobs and now - self.copies.progress_at < self.cfg.hold_max_s:
            return True  # copies in flight report back on a step (never spins forever)
        if not self.link.up:
            return False
        if self.holds.watched(now):
            if self.cfg.idle_tick_s > 0:
                time.sleep(self.cfg.idle_tick_s)
            return True
        return False
