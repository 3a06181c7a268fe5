"""``TokenCakeConnector``: vLLM's KV connector API (``KVConnectorBase_V1``) backed by tokencaked.

One instance lives in vLLM's scheduler (role SCHEDULER) and one in each worker (role WORKER).

Scheduler side (control plane, talks to the daemon over ZMQ with millisecond timeouts):
- ``get_num_new_matched_tokens`` pins the longest host-resident prefix of the request's
  chain hashes beyond vLLM's own prefix-cache hit (``load_begin``) and reports it as an
  asynchronous load. The keys are vLLM's own request block hashes (``request.block_hashes``,
  SHA-256 chain hashes with a fixed seed, so they agree across processes and restarts and
  already include ``cache_salt`` and LoRA).
- ``update_state_after_alloc`` turns the pin into a copy job into the blocks vLLM allocated;
  ``build_connector_meta`` ships this step's jobs to the workers.
- ``request_finished`` reserves host slots for the request's full blocks not yet stored and
  keeps the blocks (returns True) until the worker has copied them; then they are committed.
- Daemon decisions (pushes) are applied once per step: ``offload`` (store the agent's
  cached GPU blocks; with ``free_gpu`` drop them from the GPU prefix cache and put them first
  in line for reuse), ``drop`` (gpu), ``pin``/``unpin`` (hold the agent's cached blocks with a
  reference so vLLM cannot evict them). ``upload`` needs nothing: the KV is already staged on
  the host, and the agent's next request loads it asynchronously.

Worker side (data plane, no sockets): plain block copies between vLLM's KV tensors and the
daemon's shared-memory arena, completions reported through ``get_finished``.

Failure: a daemon that is down or slow costs at most ``timeout_ms`` once; the link is then
marked down, nothing is loaded or saved, vLLM computes everything itself, and the daemon is
retried every ``reconnect_s`` (ZMQ reconnects in its I/O thread; we re-register).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.core.kv_cache_utils import BlockHash, get_block_hash

from tokencake import protocol as p
from tokencake.agent_params import NAMESPACE, AgentParams, agent_params
from tokencake.connectors.vllm import preload
from tokencake.connectors.vllm.config import ConnectorConfig
from tokencake.connectors.vllm.link import DaemonLink
from tokencake.connectors.vllm.metadata import CopyJob, TokenCakeMetadata, TokenCakeWorkerMetadata
from tokencake.connectors.vllm.worker import Copier, close_arena, make_copier, open_arena
from tokencake.layout import KvLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from tokencake.clients.kv_arena import ArenaMapping

# Under vLLM's "vllm" logger, so these lines appear in vLLM's output, in its format.
logger = logging.getLogger(f"vllm.{__name__}")

DECISION_GRACE_S = 1.0
"""After an agent's call finishes, an idle engine keeps stepping this long for the daemon's
decisions on the tool call that may follow (reported by the app, or a gateway)."""

# The in-block byte order of the copied pages; part of the registered layout's identity.
KV_FORMAT = "vllm-blockmajor-v1"


def _holds(block: KVCacheBlock, expected: bytes) -> bool:
    """True when vLLM's pool says ``block`` holds the KV of chain hash ``expected``."""
    key = block.block_hash
    return key is not None and not block.is_null and bytes(get_block_hash(key)) == expected


@dataclass(slots=True)
class ConnectorStats:
    """Counters a test, a benchmark or an operator reads from the scheduler-side connector."""

    lookups: int = 0
    hit_tokens: int = 0
    loaded_blocks: int = 0
    load_failures: int = 0
    stored_blocks: int = 0
    already_stored_blocks: int = 0
    gpu_blocks_freed: int = 0
    decisions_applied: int = 0
    offloads_started: int = 0
    uploads_staged: int = 0
    events_sent: int = 0
    reconnects: int = 0
    preloaded_blocks: int = 0
    """GPU blocks a predictive upload copied in and registered in vLLM's prefix cache."""
    holds_released: int = 0
    """GPU blocks released because the daemon's link went down while they were pinned."""


@dataclass(slots=True)
class _Hit:
    epoch: int
    start_block: int
    slots: list[int]


@dataclass(slots=True)
class _Job:
    """A copy in flight. ``prefix``/``hashes`` are the whole block prefix it concerns (some
    of it may be stored already); ``slots`` are the slots the worker writes or reads."""

    epoch: int
    is_load: bool
    slots: list[int]
    req_id: str = ""
    prefix: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    release_refs: bool = False  # the connector holds a reference on ``prefix``
    free_gpu: bool = False  # drop ``prefix`` from the GPU prefix cache once committed
    preload: tuple[str, str] | None = None  # a predictive upload of this agent's KV
    first: int = 0  # a preload's first block index in the agent's prefix


@dataclass(slots=True)
class _AgentKv:
    """The engine blocks of an agent's last finished call, in prefix order."""

    blocks: list[int]
    hashes: list[bytes]
    open_tool: str = ""
    pinned: list[int] = field(default_factory=list)
    pin_until: float = 0.0
    watch_until: float = 0.0
    """While in a tool call: until when the engine keeps stepping for this agent's
    decisions when it has no requests (0: not watched)."""


def engine_layout(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> KvLayout:
    """The ``KvLayout`` of one engine block as this connector copies it."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"TokenCakeConnector supports one KV cache group (full attention), got {len(groups)}"
        )
    spec: Any = groups[0].kv_cache_spec
    num_layers = len(groups[0].layer_names)
    dtype = str(spec.dtype).removeprefix("torch.")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size * parallel.pipeline_parallel_size != 1:
        raise ValueError("TokenCakeConnector supports tensor/pipeline parallel size 1 only")
    from vllm.platforms import current_platform

    model = vllm_config.model_config.served_model_name or vllm_config.model_config.model
    if isinstance(model, list):
        model = model[0]
    return KvLayout(
        model_id=f"{model}|{KV_FORMAT}|{current_platform.device_type}"[:256],
        num_layers=num_layers,
        block_size=spec.block_size,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_size,
        dtype=dtype,
        bytes_per_block=spec.page_size_bytes * num_layers,
        device=current_platform.device_type,
    )


class TokenCakeConnector(KVConnectorBase_V1):
    """See the module docstring."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.cfg = ConnectorConfig.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self.layout = engine_layout(vllm_config, kv_cache_config)
        self.stats = ConnectorStats()
        # scheduler side
        self._link: DaemonLink | None = None
        self._pool: BlockPool | None = None
        self._hash_stride = 1
        self._job_ids = 0
        self._hits: dict[str, _Hit] = {}
        self._jobs: dict[int, _Job] = {}
        self._loads: list[CopyJob] = []
        self._stores: list[CopyJob] = []
        self._params: dict[str, AgentParams] = {}
        self._req_loaded: dict[str, int] = {}
        self._unreported: dict[str, int] = {}
        """Agent requests whose start the daemon has not heard of (the link was down when
        they arrived), with their prompt tokens."""
        self._agents: dict[tuple[str, str], _AgentKv] = {}
        self._to_free: list[tuple[list[int], list[bytes]]] = []
        self._preloads: dict[tuple[str, str], preload.Preload] = {}
        self._progress_at = 0.0  # when a copy job was last created or finished
        self._pushes_applied = False
        self.queue_probe: Callable[[], tuple[int, int, int]] | None = None
        """Set by ``TokenCakeScheduler``: (waiting requests, running requests, blocks the
        waiting requests need) for the pool state reported to the daemon; without it all
        three are reported as 0."""
        # worker side
        self._layer_names: list[str] = list(kv_cache_config.kv_cache_groups[0].layer_names)
        self._copier: Copier | None = None
        self._arena: ArenaMapping | None = None
        self._arena_epoch = 0  # the link epoch (registration) the mapping belongs to
        self._done_loads: list[int] = []
        self._done_stores: list[int] = []
        self._failed: list[int] = []
        self._copy_seconds: dict[int, float] = {}
        self._recving: set[str] = set()
        self._sending: set[str] = set()
        self._bad_blocks: set[int] = set()
        # CUDA copies in flight: (completion event, job, is_load); polled in get_finished.
        self._inflight: list[tuple[Any, CopyJob, bool]] = []

        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            logger.warning(
                "kv_load_failure_policy=%r: a failed TokenCake load fails the request; set "
                "'recompute' so the engine recomputes instead",
                self._kv_transfer_config.kv_load_failure_policy,
            )
        if role == KVConnectorRole.SCHEDULER:
            from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes

            scheduler_bs, hash_bs = resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
            if scheduler_bs != self.block_size or self.block_size % hash_bs:
                raise ValueError(f"block size {scheduler_bs} vs hash block size {hash_bs}")
            self._hash_stride = self.block_size // hash_bs
            name = self.cfg.engine_name or f"vllm:{self.layout.model_id.split('|')[0]}"[:256]
            self._link = DaemonLink(self.cfg, self.layout, name, kv_cache_config.num_blocks)
            self._link.on_down.append(self._release_holds)
            self._link.maybe_connect(time.monotonic(), wait=True)

    # ------------------------------------------------------------------ helpers

    def _next_job(self) -> int:
        self._job_ids += 1
        self._progress_at = time.monotonic()
        return self._job_ids

    def _chain(self, request: Request) -> list[bytes]:
        """One chain hash per full engine block (the hash at the block's last hash unit)."""
        hashes = request.block_hashes
        k = self._hash_stride
        if k == 1:
            return [bytes(h) for h in hashes]
        return [bytes(hashes[i]) for i in range(k - 1, len(hashes), k)]

    def _release_hit(self, req_id: str) -> None:
        hit = self._hits.pop(req_id, None)
        link = self._link
        if hit is not None and link is not None and link.up and hit.epoch == link.epoch:
            link.call(p.LoadEnd(link.engine_id, hit.slots), p.LoadEndReply)

    def _event(self, req: p.Request) -> bool:
        """Report an agent event; True when the daemon accepted it (it knows the agent)."""
        assert self._link is not None
        ack = self._link.call(req, p.EventAck)
        if ack is None:
            return False
        self.stats.events_sent += 1
        return bool(ack.accepted)

    def _resident(self, blocks: list[int], hashes: list[bytes]) -> list[int]:
        """The engine blocks that hold ``hashes`` now: the longest prefix still in vLLM's
        prefix cache, one block id per hash.

        A recorded block id is only a hint. Once vLLM freed the request, the id may have been
        handed to another request (its KV is then another request's), or the agent's KV may
        have been recomputed into other blocks. Identity is the chain hash: a block is the
        agent's only while vLLM's block pool says that block holds that hash; otherwise the
        pool's hash index says where the hash lives now, if anywhere.
        """
        pool = self._pool
        if pool is None:
            return []
        out: list[int] = []
        for i, expected in enumerate(hashes):
            block_id = blocks[i] if i < len(blocks) else -1
            if 0 <= block_id < len(pool.blocks) and _holds(pool.blocks[block_id], expected):
                out.append(block_id)
                continue
            found = pool.get_cached_block(BlockHash(expected), [0])
            if not found or not _holds(found[0], expected):
                break
            out.append(found[0].block_id)
        return out

    # ------------------------------------------------------------------ scheduler side

    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        self._pool = gpu_block_pool

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        req_id = request.request_id
        self._release_hit(req_id)  # a retry after a failed allocation re-pins
        link = self._link
        if link is not None and link.up and not self._pushes_applied:
            # Before this step's first allocation: a pin or offload decided while the engine
            # sat idle (agents in tool calls) must hold its blocks before a new request can
            # take them.
            self._apply_pushes(time.monotonic())
        if link is None or not link.up or num_computed_tokens % self.block_size:
            return 0, False
        start = num_computed_tokens // self.block_size
        # vLLM must compute at least the last prompt token itself.
        end = min((request.num_tokens - 1) // self.block_size, len(request.block_hashes))
        hashes = self._chain(request)[start:end]
        if not hashes:
            return 0, False
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
        reply = link.call(req, p.LoadBeginReply)
        if reply is None or not reply.slots:
            return 0, False
        self._hits[req_id] = _Hit(link.epoch, start, list(reply.slots))
        return len(reply.slots) * self.block_size, True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        req_id = request.request_id
        link = self._link
        assert link is not None
        params = self._params.get(req_id)
        if params is not None and link.up:
            # Admission: the daemon's policy counts these blocks as taken from now on.
            kv_blocks = len(blocks.get_block_ids()[0])
            self._event(p.LlmCallAdmitted(params.app_id, params.agent_id, req_id, kv_blocks))
        hit = self._hits.pop(req_id, None)
        if hit is None:
            return
        n = num_external_tokens // self.block_size
        use, rest = hit.slots[:n], hit.slots[n:]
        if not use:
            if rest and link.up and hit.epoch == link.epoch:
                link.call(p.LoadEnd(link.engine_id, rest), p.LoadEndReply)
            return
        block_ids = list(blocks.get_block_ids()[0][hit.start_block : hit.start_block + n])
        job_id = self._next_job()
        if not link.up or hit.epoch != link.epoch:
            # The daemon went down (or restarted) since the hit: its pins are gone, so the
            # slots may hold anything now. vLLM waits for this load all the same; it is
            # reported failed and vLLM recomputes the blocks.
            self._jobs[job_id] = _Job(hit.epoch, True, [], req_id=req_id)
            self._loads.append(CopyJob(job_id, [], block_ids, req_id, fail=True))
            return
        if rest:
            link.call(p.LoadEnd(link.engine_id, rest), p.LoadEndReply)
        self._jobs[job_id] = _Job(link.epoch, True, use, req_id=req_id)
        self._loads.append(CopyJob(job_id, use, block_ids, req_id))
        self._req_loaded[req_id] = n * self.block_size
        self.stats.hit_tokens += n * self.block_size

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        link = self._link
        assert link is not None
        now = time.monotonic()
        if link.maybe_connect(now):
            self.stats.reconnects += 1
            self._hits.clear()
            self._report_unreported()
            # Queued jobs name slots of the previous daemon's arena: never copy them into
            # the new one. They go out as failed no-ops, so everything waiting on them ends:
            # vLLM's request (a load's blocks are recomputed, a save's blocks are freed) and
            # the references an offload copy holds on its blocks.
            for job in self._loads + self._stores:
                job.slots, job.fail = [], True
        self._enforce_holds(now)
        if link.up:
            heartbeat_due = now >= link.next_heartbeat
            if link.reg is not None and (heartbeat_due or now >= link.next_state_report):
                # Looked at most every state_report_s (the queue probe is O(waiting)); sent
                # when it changed, or with the lease heartbeat.
                link.next_state_report = now + self.cfg.state_report_s
                state = self._engine_state()
                if heartbeat_due or state != link.last_state:
                    link.next_heartbeat = now + link.reg.heartbeat_s
                    link.last_state = state
                    link.call(p.EngineHeartbeat(link.engine_id, *state), p.EngineHeartbeatReply)
            self._apply_pushes(now)
        self._pushes_applied = False  # a new step: apply again before its first allocation
        self._free_pending()
        if self._preloads:
            self._advance_preloads(now)
        reg = link.reg
        meta = TokenCakeMetadata(
            arena_name=reg.arena_name if reg else "",
            arena_bytes=reg.arena_bytes if reg else 0,
            slot_bytes=reg.slot_bytes if reg else 0,
            epoch=link.epoch if reg else 0,
            loads=self._loads,
            stores=self._stores,
        )
        self._loads, self._stores = [], []
        return meta

    def on_new_request(self, request: Request) -> None:
        params = agent_params(request.kv_transfer_params)
        link = self._link
        if params is None or link is None:
            return
        self._params[request.request_id] = params
        agent = self._agents.get(params.key)
        if agent is not None:
            agent.watch_until = 0.0
        pending = self._preloads.get(params.key)
        if pending is not None:
            pending.done = True  # what is not on the GPU yet, this request loads itself
            if not pending.inflight:
                del self._preloads[params.key]
        if not link.up:
            # Reported when the link comes back, if the request is still in flight then.
            self._unreported[request.request_id] = request.num_prompt_tokens
            return
        if agent is not None and agent.open_tool:
            self._event(p.ToolCallEnd(params.app_id, params.agent_id, call_id=agent.open_tool))
            agent.open_tool = ""
        self._report_start(request.request_id, params, request.num_prompt_tokens)

    def _report_start(self, req_id: str, params: AgentParams, prompt_tokens: int) -> None:
        assert self._link is not None
        if not self._link.up:
            self._unreported[req_id] = prompt_tokens
            return
        start = p.LlmCallStart(
            params.app_id,
            params.agent_id,
            engine_id=self._link.engine_id,
            request_id=req_id,
            prompt_tokens=prompt_tokens,
        )
        if not self._event(start) and not self._link.up:
            self._unreported[req_id] = prompt_tokens

    def _report_unreported(self) -> None:
        """The link is back: report the agent requests that arrived while it was down."""
        pending, self._unreported = self._unreported, {}
        for req_id, prompt_tokens in pending.items():
            params = self._params.get(req_id)
            if params is not None and self._link is not None and self._link.up:
                self._report_start(req_id, params, prompt_tokens)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self._release_hit(req_id)
        params = self._params.pop(req_id, None)
        loaded = self._req_loaded.pop(req_id, 0)
        prompt_tokens = self._unreported.pop(req_id, None)
        link = self._link
        assert link is not None
        hashes = self._chain(request)
        n_full = min(len(block_ids), request.num_computed_tokens // self.block_size, len(hashes))
        blocks, hashes = list(block_ids[:n_full]), hashes[:n_full]
        free_gpu = daemon_moves = False
        if params is not None:
            agent = self._agents.setdefault(params.key, _AgentKv([], []))
            agent.blocks, agent.hashes = blocks, hashes
            # The app or a gateway may report the tool call that follows, just after this
            # answer: keep an idle engine stepping a moment for the daemon's decisions.
            grace = time.monotonic() + min(DECISION_GRACE_S, self.cfg.hold_max_s)
            agent.watch_until = max(agent.watch_until, grace)
            if link.up and prompt_tokens is not None:
                self._report_start(req_id, params, prompt_tokens)  # it began while down
                self._unreported.pop(req_id, None)
            if link.up:
                tracked = self._event(
                    p.LlmCallFinish(
                        params.app_id,
                        params.agent_id,
                        request_id=req_id,
                        output_tokens=request.num_output_tokens,
                        kv_blocks=n_full,
                    )
                )
                if params.tool is not None:
                    agent.open_tool = req_id
                    # Keep an idle engine stepping while the daemon decides about this
                    # call (offload, pin, upload): about twice the predicted call, at most
                    # hold_max_s.
                    predicted = params.tool.predicted_s or self.cfg.hold_max_s
                    watch = min(2.0 * predicted, self.cfg.hold_max_s)
                    agent.watch_until = max(agent.watch_until, time.monotonic() + watch)
                    self._event(
                        p.ToolCallStart(
                            params.app_id,
                            params.agent_id,
                            params.tool.kind,
                            predicted_s=params.tool.predicted_s,
                            call_id=req_id,
                        )
                    )
                # The daemon tracks this agent: its offload decision moves the KV, and the
                # d2h copy it commits is what the daemon's scheduler counts. A write-through
                # save now would commit first, uncounted, and leave that decision nothing
                # to copy (so the scheduler would never see the offload complete).
                daemon_moves = tracked and self.cfg.tool_offload == "daemon"
            free_gpu = params.tool is not None and self.cfg.tool_offload == "always"
        out = {NAMESPACE: {"loaded_tokens": loaded}}
        save = not daemon_moves and (
            self.cfg.save == "finished"
            or (self.cfg.save == "tool" and params is not None and params.tool is not None)
        )
        if not n_full or not link.up or not (save or free_gpu):
            return False, out
        job = self._reserve(blocks, hashes, params, req_id=req_id, free_gpu=free_gpu)
        return job is not None, out

    def _reserve(
        self,
        blocks: list[int],
        hashes: list[bytes],
        params: AgentParams | None,
        *,
        req_id: str = "",
        free_gpu: bool = False,
    ) -> _Job | None:
        """Reserve host slots for the blocks not stored yet and queue their copy.

        Returns the job, or None when nothing needs copying (then ``free_gpu`` is applied
        at once to the blocks already stored).
        """
        link = self._link
        assert link is not None
        if not link.up:
            return None
        reply = link.call(
            p.Reserve(
                link.engine_id,
                hashes,
                self.cfg.salt,
                app_id=params.app_id if params else "",
                agent_id=params.agent_id if params else "",
            ),
            p.ReserveReply,
        )
        if reply is None:
            return None
        pairs = [(s, b) for s, b in zip(reply.slots, blocks, strict=False) if s >= 0]
        stored = len(reply.slots)
        self.stats.already_stored_blocks += stored - len(pairs)
        if not pairs:
            if free_gpu:
                self._to_free.append((blocks[:stored], hashes[:stored]))
            return None
        job_id = self._next_job()
        job = _Job(
            link.epoch,
            False,
            [s for s, _ in pairs],
            req_id=req_id,
            prefix=blocks[:stored],
            hashes=hashes[:stored],
            free_gpu=free_gpu,
        )
        self._jobs[job_id] = job
        self._stores.append(CopyJob(job_id, job.slots, [b for _, b in pairs], req_id))
        return job

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, TokenCakeWorkerMetadata):
            return
        self._progress_at = time.monotonic()
        link = self._link
        assert link is not None
        for job_id in meta.loaded:
            job = self._jobs.pop(job_id, None)
            if job is None:
                continue
            if job.preload is not None:
                self._preload_done(job_id, job, ok=True)
            self.stats.loaded_blocks += len(job.slots)
            if link.up and job.epoch == link.epoch:
                copy_s = meta.seconds.get(job_id, -1.0)
                link.call(p.LoadEnd(link.engine_id, job.slots, copy_s), p.LoadEndReply)
        for job_id in meta.stored:
            job = self._jobs.pop(job_id, None)
            if job is None:
                continue
            committed = None
            if link.up and job.epoch == link.epoch:
                copy_s = meta.seconds.get(job_id, -1.0)
                committed = link.call(p.Commit(link.engine_id, job.slots, copy_s), p.CommitReply)
            if committed is not None:
                self.stats.stored_blocks += committed.committed
            self._finish_store(job, ok=committed is not None)
        for job_id in meta.failed:
            job = self._jobs.pop(job_id, None)
            if job is None:
                continue
            logger.warning("TokenCake copy job %d failed; the engine recomputes", job_id)
            self.stats.load_failures += int(job.is_load)
            if job.preload is not None:
                self._preload_done(job_id, job, ok=False)
            if link.up and job.epoch == link.epoch:
                if job.is_load:
                    link.call(p.LoadEnd(link.engine_id, job.slots), p.LoadEndReply)
                else:
                    link.call(p.Abort(link.engine_id, job.slots), p.AbortReply)
            if not job.is_load:
                self._finish_store(job, ok=False)

    def _finish_store(self, job: _Job, *, ok: bool) -> None:
        if job.release_refs and self._pool is not None:
            self._pool.free_blocks(self._pool.blocks[b] for b in job.prefix)
        if ok and job.free_gpu:
            self._to_free.append((job.prefix, job.hashes))

    def _free_pending(self) -> None:
        """Drop committed blocks from vLLM's prefix cache and queue them for reuse first.

        Only blocks nobody references (``ref_cnt == 0``) that hold the expected hash now are
        touched: a block another request shares, or one already reused, stays as is.
        """
        pool = self._pool
        if pool is None or not self._to_free:
            self._to_free.clear()
            return
        for blocks, hashes in self._to_free:
            for block_id in self._resident(blocks, hashes):
                block = pool.blocks[block_id]
                if block.ref_cnt != 0:
                    continue
                pool.evict_blocks({block_id})
                pool.free_block_queue.remove(block)
                pool.free_block_queue.prepend_n([block])
                self.stats.gpu_blocks_freed += 1
        self._to_free.clear()

    def _apply(self, decision: p.DecisionRecord) -> None:
        """Apply one pushed decision to the agent's blocks in this engine."""
        key = (decision.app_id, decision.agent_id)
        agent = self._agents.get(key)
        if agent is None or self._pool is None:
            return
        kind = decision.kind
        params = decision.reason.get("params", {}) if isinstance(decision.reason, dict) else {}
        self.stats.decisions_applied += 1
        if kind in ("offload", "pin"):
            # The daemon has the agent in a tool call (whoever reported it): its upload or
            # unpin is still to come, so an idle engine keeps stepping for it.
            watch = time.monotonic() + self.cfg.hold_max_s
            agent.watch_until = max(agent.watch_until, watch)
        if kind == "offload":
            self._offload(key, agent, free_gpu=bool(params.get("free_gpu", True)))
        elif kind == "upload":
            # The KV is in the host store. With preload it is copied into free GPU blocks
            # a chunk per step (``_advance_preloads``); otherwise, or for what is left when
            # the agent's request comes, get_num_new_matched_tokens loads it then.
            self.stats.uploads_staged += 1
            if self.cfg.preload and agent.hashes:
                deadline = time.monotonic() + self.cfg.hold_max_s
                self._preloads[key] = preload.Preload(list(agent.hashes), deadline)
        elif kind == "drop" and params.get("where", "gpu") == "gpu":
            self._to_free.append((agent.blocks, agent.hashes))
        elif kind == "pin":
            self._unpin(agent)
            agent.pinned = self._resident(agent.blocks, agent.hashes)
            self._pool.touch([self._pool.blocks[b] for b in agent.pinned])
            # The daemon's time-to-live, never longer than the connector's own bound.
            ttl = min(max(decision.due_in_s, 0.0), self.cfg.hold_max_s)
            agent.pin_until = time.monotonic() + ttl
        elif kind == "unpin":
            self._unpin(agent)

    def _offload(self, key: tuple[str, str], agent: _AgentKv, *, free_gpu: bool) -> None:
        """Copy the agent's resident KV to the host. An offload ends the agent's pin: the
        copy takes its own references first, so the blocks are never free in between."""
        try:
            self._start_offload(key, agent, free_gpu=free_gpu)
        finally:
            self._unpin(agent)

    def _start_offload(self, key: tuple[str, str], agent: _AgentKv, *, free_gpu: bool) -> None:
        assert self._pool is not None
        blocks = self._resident(agent.blocks, agent.hashes)
        if not blocks:
            return
        hashes = agent.hashes[: len(blocks)]
        self.stats.offloads_started += 1
        for inflight in self._jobs.values():
            if not inflight.is_load and inflight.hashes[: len(hashes)] == hashes:
                # A save of these blocks is in flight (the request's own, at its finish):
                # it is the offload's copy; free the blocks when it commits.
                inflight.free_gpu = inflight.free_gpu or free_gpu
                return
        # Hold a reference so the blocks cannot be reused while the worker copies them.
        self._pool.touch([self._pool.blocks[b] for b in blocks])
        params = AgentParams(app_id=key[0], agent_id=key[1])
        job = self._reserve(blocks, hashes, params, free_gpu=free_gpu)
        if job is None:
            self._pool.free_blocks(self._pool.blocks[b] for b in blocks)
            return
        job.release_refs = True

    def _apply_pushes(self, now: float) -> None:
        """Carry out the decisions the daemon pushed since the last call, expire pins."""
        assert self._link is not None
        for decision in self._link.pushes():
            if not self._link.up:
                break  # went down on the way: hold nothing more for a daemon that is gone
            self._apply(decision)
        self._expire_pins(now)
        self._pushes_applied = True

    def _unpin(self, agent: _AgentKv) -> None:
        if agent.pinned and self._pool is not None:
            self._pool.free_blocks(self._pool.blocks[b] for b in agent.pinned)
        agent.pinned = []

    def _expire_pins(self, now: float) -> None:
        for agent in self._agents.values():
            if agent.pinned and now >= agent.pin_until:
                self._unpin(agent)

    def _advance_preloads(self, now: float) -> None:
        """Start the next chunk of each predictive upload that has none in flight."""
        link, pool = self._link, self._pool
        assert link is not None
        if pool is None or not link.up:
            return
        _, running, waiting_blocks = (
            self.queue_probe() if self.queue_probe is not None else (0, 0, 0)
        )
        for key, pending in list(self._preloads.items()):
            if pending.inflight:
                continue
            if not link.up:
                break  # went down on the way: _release_holds has ended the preloads
            if pending.done or now > pending.deadline:
                self._preloads.pop(key, None)
                continue
            have = len(self._resident([], pending.hashes))
            rest = pending.hashes[have:]
            n = preload.budget(
                pool,
                waiting_blocks=waiting_blocks,
                running=running,
                min_free=self.cfg.preload_min_free,
                want=min(len(rest), self.cfg.preload_chunk_blocks),
            )
            if not rest:
                self._preloads.pop(key, None)
                continue
            if n <= 0:
                continue  # no room this step; try again next step, until the deadline
            reply = link.call(
                p.LoadBegin(link.engine_id, rest[:n], self.cfg.salt, *key), p.LoadBeginReply
            )
            if reply is None or not reply.slots:
                # The host has no more of it, or the call failed (the link may be down now).
                self._preloads.pop(key, None)
                continue
            slots = list(reply.slots)
            blocks = preload.take(pool, len(slots))
            job_id = self._next_job()
            self._jobs[job_id] = _Job(
                link.epoch,
                True,
                slots,
                prefix=blocks,
                hashes=rest[: len(slots)],
                preload=key,
                first=have,
            )
            self._loads.append(CopyJob(job_id, slots, blocks))
            pending.inflight = job_id

    def _preload_done(self, job_id: int, job: _Job, *, ok: bool) -> None:
        """A chunk's copy ended: register the blocks (or release them unhashed)."""
        assert job.preload is not None and self._pool is not None
        if ok:
            self.stats.preloaded_blocks += preload.register(
                self._pool, job.prefix, job.hashes, job.first, self.block_size
            )
        else:
            preload.release(self._pool, job.prefix)
        pending = self._preloads.get(job.preload)
        if pending is not None and pending.inflight == job_id:
            pending.inflight = 0
            if pending.done or not ok:
                self._preloads.pop(job.preload, None)

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
        link = self._link
        if link is None:
            return False
        now = time.monotonic()
        if self._loads or self._stores or self._to_free or self._preloads:
            return True
        if self._jobs and now - self._progress_at < self.cfg.hold_max_s:
            return True  # copies in flight report back on a step (never spins forever)
        if not link.up:
            return False
        if any(now < a.watch_until for a in self._agents.values()):
            if self.cfg.idle_tick_s > 0:
                time.sleep(self.cfg.idle_tick_s)
            return True
        return False

    def _holds(self) -> int:
        """Engine blocks held for the daemon now: pins (an offload's copy holds its blocks
        too, but only until the worker's copy ends, which needs no daemon)."""
        return sum(len(a.pinned) for a in self._agents.values())

    def _release_holds(self) -> None:
        """The link went down: nothing the daemon asked for is held a moment longer."""
        for key, pending in list(self._preloads.items()):
            pending.done = True  # a chunk in flight ends with its copy (or fails: released)
            if not pending.inflight:
                del self._preloads[key]
        released = 0
        for agent in self._agents.values():
            released += len(agent.pinned)
            self._unpin(agent)
        if released:
            self.stats.holds_released += released
            logger.warning("TokenCake: released %d GPU blocks pinned for tokencaked", released)

    def _enforce_holds(self, now: float) -> None:
        """Every step, link up or down: pins end at their deadline, and pins last only
        while the daemon is known alive (``liveness_s``, else one ping)."""
        self._expire_pins(now)
        link = self._link
        if link is None or not link.up or not self._holds() or link.check_alive(now):
            return
        if link.up:  # a refusal (not a timeout) leaves it up: still, not alive
            link.down("no reply within liveness_s")

    def get_stats(self) -> dict[str, int]:
        """The counters, plus failed daemon calls by cause (``errors.<code>``)."""
        out = asdict(self.stats)
        if self._link is not None:
            out.update({f"errors.{code}": n for code, n in self._link.errors.items()})
        return out

    @property
    def link(self) -> DaemonLink | None:
        """The scheduler side's daemon link (None on a worker)."""
        return self._link

    @property
    def link_up(self) -> bool:
        return self._link is not None and self._link.up

    def _engine_state(self) -> tuple[int, int, int, int]:
        """(free GPU blocks, waiting requests, running requests, waiting blocks) as the
        daemon wants them: free counts idle cached blocks, as vLLM's free block queue does
        (-1: unknown)."""
        free = self._pool.get_num_free_blocks() if self._pool is not None else -1
        probe = self.queue_probe() if self.queue_probe is not None else (0, 0, 0)
        return free, *probe

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = [n for n in self._layer_names if n in kv_caches]
        self._copier = make_copier([kv_caches[n] for n in names])
        if self._copier.bytes_per_block != self.layout.bytes_per_block:
            raise ValueError(
                f"KV tensors hold {self._copier.bytes_per_block} B per block, "
                f"the registered layout says {self.layout.bytes_per_block} B"
            )

    def _arena_for(self, meta: TokenCakeMetadata) -> ArenaMapping | None:
        if not meta.arena_name:
            return None
        # Mapped afresh on every registration: a restarted daemon can create its segment
        # under the old name (same instance and pid, as in a container), and the old
        # mapping would then read and write the unlinked segment, not the daemon's.
        stale = self._arena_epoch != meta.epoch
        if self._arena is None or self._arena.name != meta.arena_name or stale:
            if self._arena is not None:
                close_arena(self._arena)
            self._arena = open_arena(meta.arena_name, meta.arena_bytes, meta.slot_bytes)
            self._arena_epoch = meta.epoch
        return self._arena

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TokenCakeMetadata)
        for job in meta.loads:
            self._copy(meta, job, is_load=True)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are whole-request and asynchronous: nothing waits per layer

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return  # saves copy whole blocks in wait_for_save, after the forward wrote them

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, TokenCakeMetadata)
        for job in meta.stores:
            self._copy(meta, job, is_load=False)

    def _copy(self, meta: TokenCakeMetadata, job: CopyJob, *, is_load: bool) -> None:
        """Run (CPU) or start (CUDA) one job; a failure is reported, never raised."""
        try:
            if job.fail:
                raise ConnectionError("the daemon that held these blocks is gone")
            done = None
            if job.slots:
                arena = self._arena_for(meta)
                if arena is None:  # the link went down after the job was queued
                    raise ConnectionError("no arena: the daemon's link is down")
                assert self._copier is not None
                started = time.perf_counter()
                if is_load:
                    done = self._copier.from_arena(arena, job.slots, job.blocks)
                else:
                    done = self._copier.to_arena(arena, job.blocks, job.slots)
                if done is None:  # a synchronous copy: this was all of it
                    self._copy_seconds[job.job_id] = time.perf_counter() - started
        except Exception as exc:
            logger.warning("TokenCake copy job %d failed (%s)", job.job_id, exc)
            self._copy_done(job, is_load, ok=False)
            return
        if done is None:
            self._copy_done(job, is_load, ok=True)
        else:
            self._inflight.append((done, job, is_load))

    def _copy_done(self, job: CopyJob, is_load: bool, *, ok: bool) -> None:
        if ok:
            (self._done_loads if is_load else self._done_stores).append(job.job_id)
        else:
            self._failed.append(job.job_id)
            if is_load:
                self._bad_blocks.update(job.blocks)  # vLLM recomputes them
        if job.req_id:
            (self._recving if is_load else self._sending).add(job.req_id)

    def _poll_inflight(self) -> None:
        pending = []
        for done, job, is_load in self._inflight:
            try:
                finished = bool(done.query())
            except Exception as exc:
                logger.warning("TokenCake copy job %d failed on the device (%s)", job.job_id, exc)
                self._copy_done(job, is_load, ok=False)
                continue
            if finished:
                self._copy_done(job, is_load, ok=True)
            else:
                pending.append((done, job, is_load))
        self._inflight = pending

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._inflight:
            self._poll_inflight()
        sending, recving = self._sending, self._recving
        self._sending, self._recving = set(), set()
        return (sending or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        bad, self._bad_blocks = self._bad_blocks, set()
        return bad

    def build_connector_worker_meta(self) -> TokenCakeWorkerMetadata | None:
        if not (self._done_loads or self._done_stores or self._failed):
            return None
        meta = TokenCakeWorkerMetadata(
            self._done_loads, self._done_stores, self._failed, self._copy_seconds
        )
        self._done_loads, self._done_stores, self._failed = [], [], []
        self._copy_seconds = {}
        return meta

    def shutdown(self) -> None:
        if self._link is not None:
            self._link.close()
        if self._inflight:  # never unmap (and unpin) memory a DMA is still writing
            torch.cuda.synchronize()
            self._inflight = []
        if self._arena is not None:
            close_arena(self._arena)
            self._arena = None
