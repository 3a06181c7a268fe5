"""N engine hosts sharing one L2: what a shared KV tier and agent affinity are worth.

A coarser model than the single-engine simulator (``tokencake.sim.engine``): it follows where
each piece of KV is when an agent's next LLM call arrives, not what happens inside a step.

- Each host has a host KV cache (the daemon's arena, LRU) of ``host_bytes`` and ``lanes``
  concurrent requests (its batch). A call holds one lane for its service time: restoring
  reusable KV, prefilling the rest, decoding its output. Prefills on one host take turns on
  its GPU (FCFS); decoding is batched, one memory-bound step per output token.
- The KV of a call's prompt is reused as a prefix of the trace's token segments: each
  segment is on this host (a PCIe copy at the profile's host bandwidth), in L2 (a fetch
  through the shared L2 link, below) or missing; the first missing segment ends the prefix
  and everything after it is prefilled. After the call, its context (prompt and output) is
  cached on the host; what the host evicts is written back to L2 when there is one.
- L2 is one shared link of ``l2_bytes_per_s`` with ``l2_latency_s`` per fetch, FCFS for
  every host's fetches and write-backs, and an LRU store of ``l2_capacity_bytes``. As in the
  daemon, L2 is used only when it pays: a fetch that would finish later than prefilling the
  same tokens is not made (the tokens are prefilled), and a write-back that would queue
  behind more than ``l2_write_backlog_s`` of link time is dropped (the daemon's bounded
  write queue).
- Predictive upload (``predictive_upload``): a call that follows a tool call has its
  reusable KV brought back ahead of it, as the daemon's policy plans it: the upload starts
  ``upload_lead_s`` before the call (``tokencake.daemon.scheduler.costmodel``, the same
  rule: the L2 fetch of the blocks that left the host, then the host -> GPU copy), but not
  before the tool call began. The tool durations are the trace's, so this is the policy
  with an exact predictor: an upper bound of what it hides. Off, KV is restored when the
  call arrives.
- Routing: ``affinity`` sends a call to the host that holds the longest cached prefix of its
  prompt (ties and cold starts: the host with the fewest calls in flight); ``random`` picks
  a host uniformly.

Costs come from an engine profile (``tokencake.sim.profiles``): prefill at the profile's
peak FLOPs and MFU, decode at one memory-bound step per output token. Deterministic for a
seed: the trace and the random routing have their own streams.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from tokencake.daemon.scheduler.costmodel import TransferCostModel, upload_lead_s
from tokencake.sim.generators import get_generator, make_trace
from tokencake.sim.profiles import Profile
from tokencake.sim.workload import AppSpec, NodeSpec, Segment, topological_order

Routing = Literal["affinity", "random"]


@dataclass(slots=True, frozen=True)
class ClusterConfig:
    hosts: int = 16
    lanes: int = 32
    host_bytes: float = 64 * 2**30
    l2: bool = True
    l2_capacity_bytes: float = 4 * 2**40
    l2_bytes_per_s: float = 25e9
    l2_latency_s: float = 0.002
    l2_write_backlog_s: float = 1.0
    routing: Routing = "affinity"
    predictive_upload: bool = False
    upload_piece_blocks: int = 64

    def validate(self) -> None:
        if self.hosts < 1 or self.lanes < 1:
            raise ValueError("hosts and lanes must be >= 1")
        positive = (self.host_bytes, self.l2_capacity_bytes, self.l2_bytes_per_s)
        if min(positive) <= 0 or self.l2_latency_s < 0:
            raise ValueError("sizes and bandwidths must be positive, latency >= 0")
        if self.routing not in ("affinity", "random"):
            raise ValueError(f"routing must be affinity or random, not {self.routing}")


@dataclass(slots=True)
class ClusterResult:
    hosts: int
    routing: str
    l2: bool
    apps: int
    calls: int
    mean_latency_s: float
    p95_latency_s: float
    prompt_tokens: int
    host_hit_tokens: int
    l2_hit_tokens: int
    prefill_tokens: int
    mean_restore_s: float
    """Mean time a call spent getting its reusable KV back (PCIe copies and L2 fetches)."""
    mean_prefill_s: float
    l2_link_util: float
    l2_written_bytes: float
    l2_dropped_writes: int

    @property
    def host_hit_rate(self) -> float:
        return self.host_hit_tokens / max(1, self.prompt_tokens)

    @property
    def l2_hit_rate(self) -> float:
        return self.l2_hit_tokens / max(1, self.prompt_tokens)

    def to_dict(self) -> dict[str, float | int | str | bool]:
        out = asdict(self)
        out["host_hit_rate"] = self.host_hit_rate
        out["l2_hit_rate"] = self.l2_hit_rate
        return out


class _Lru:
    """Segment id -> bytes, least recently used first, bounded by bytes."""

    def __init__(self, capacity: float) -> None:
        self.capacity = capacity
        self.used = 0.0
        self.items: OrderedDict[int, float] = OrderedDict()

    def __contains__(self, seg: int) -> bool:
        return seg in self.items

    def touch(self, seg: int) -> None:
        self.items.move_to_end(seg)

    def put(self, seg: int, nbytes: float) -> list[tuple[int, float]]:
        """Insert or refresh; returns what was evicted to make room."""
        if seg in self.items:
            self.items.move_to_end(seg)
            return []
        if nbytes > self.capacity:
            return [(seg, nbytes)]
        self.items[seg] = nbytes
        self.used += nbytes
        evicted: list[tuple[int, float]] = []
        while self.used > self.capacity:
            old, size = self.items.popitem(last=False)
            self.used -= size
            evicted.append((old, size))
        return evicted


@dataclass(slots=True)
class _Host:
    cache: _Lru
    lanes_free: int
    gpu_free_s: float = 0.0
    queue: list[tuple[float, int, _Call]] = field(default_factory=list)
    in_flight: int = 0


@dataclass(slots=True)
class _Call:
    app: AppSpec
    node: NodeSpec
    ready_s: float
    after_tool_s: float = 0.0
    """How long the tool call before this call ran (0: none): the predictive upload's room."""


class ClusterSim:
    def __init__(self, profile: Profile, config: ClusterConfig, seed: int = 0) -> None:
        config.validate()
        self.p = profile
        self.c = config
        self.rng = np.random.default_rng([seed, 7])
        self.hosts = [_Host(_Lru(config.host_bytes), config.lanes) for _ in range(config.hosts)]
        self.l2 = _Lru(config.l2_capacity_bytes)
        self.link_free_s = 0.0
        self.link_busy_s = 0.0
        self.l2_written = 0.0
        self.l2_dropped = 0
        self.kv_per_token = profile.model.kv_bytes_per_token
        self.prefill_per_token_s = (
            2.0 * profile.model.params / (profile.gpu.peak_flops * profile.mfu)
        )
        self.decode_step_s = profile.step_s(config.lanes, 0.0, 0.0)
        host_bw = profile.gpu.host_bytes_per_s
        self.cost = TransferCostModel(
            profile.block_bytes,
            host_bw,
            host_bw,
            profile.copy_overhead_s,
            config.l2_bytes_per_s,
            config.l2_latency_s,
        )
        self._events: list[tuple[float, int, str, object]] = []
        self._seq = 0
        self.latencies: list[float] = []
        self.calls = 0
        self.prompt_tokens = 0
        self.host_tokens = 0
        self.l2_tokens = 0
        self.prefill_tokens = 0
        self.restore_s = 0.0
        self.prefill_s = 0.0

    # ------------------------------------------------------------------ events

    def _push(self, t: float, kind: str, obj: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, obj))

    def run(self, apps: list[AppSpec]) -> ClusterResult:
        pending: dict[str, dict[str, int]] = {}
        finish: dict[str, float] = {}
        for app in apps:
            self._push(app.arrival_s, "arrive", app)
        end = 0.0
        while self._events:
            now, _, kind, obj = heapq.heappop(self._events)
            end = max(end, now)
            if kind == "arrive":
                assert isinstance(obj, AppSpec)
                pending[obj.app_id] = {n.id: len(n.predecessors) for n in obj.nodes}
                finish[obj.app_id] = now
                for n in topological_order(obj.nodes):
                    if not n.predecessors:
                        self._start_node(obj, n, now)
            elif kind == "done":
                assert isinstance(obj, tuple)
                app, node = obj
                finish[app.app_id] = max(finish[app.app_id], now)
                left = pending[app.app_id]
                del left[node.id]
                tool_s = node.tool.duration_s if node.tool is not None else 0.0
                for n in app.nodes:
                    if node.id in n.predecessors:
                        left[n.id] -= 1
                        if left[n.id] == 0:
                            self._start_node(app, n, now, tool_s)
                if not left:
                    self.latencies.append(finish[app.app_id] - app.arrival_s)
            elif kind == "finish":
                assert isinstance(obj, tuple)
                h, call = obj
                self._finish(h, call, now)
        lat = np.array(self.latencies) if self.latencies else np.zeros(1)
        return ClusterResult(
            hosts=self.c.hosts,
            routing=self.c.routing,
            l2=self.c.l2,
            apps=len(apps),
            calls=self.calls,
            mean_latency_s=float(lat.mean()),
            p95_latency_s=float(np.percentile(lat, 95)),
            prompt_tokens=self.prompt_tokens,
            host_hit_tokens=self.host_tokens,
            l2_hit_tokens=self.l2_tokens,
            prefill_tokens=self.prefill_tokens,
            mean_restore_s=self.restore_s / max(1, self.calls),
            mean_prefill_s=self.prefill_s / max(1, self.calls),
            l2_link_util=self.link_busy_s / end if end > 0 else 0.0,
            l2_written_bytes=self.l2_written,
            l2_dropped_writes=self.l2_dropped,
        )

    def _start_node(
        self, app: AppSpec, node: NodeSpec, now: float, after_tool_s: float = 0.0
    ) -> None:
        if node.kind != "llm":
            self._push(now, "done", (app, node))
            return
        call = _Call(app, node, now, after_tool_s)
        h = self._route(app.prompts[node.id])
        host = self.hosts[h]
        host.in_flight += 1
        if host.lanes_free > 0:
            host.lanes_free -= 1
            self._serve(h, call, now)
        else:
            heapq.heappush(host.queue, (now, id(call), call))

    def _route(self, prompt: tuple[Segment, ...]) -> int:
        n = self.c.hosts
        if self.c.routing == "random":
            return int(self.rng.integers(n))
        best, best_tokens = -1, -1
        for h, host in enumerate(self.hosts):
            tokens = 0
            for seg, seg_tokens in prompt:
                if seg not in host.cache:
                    break
                tokens += seg_tokens
            if tokens > best_tokens or (
                tokens == best_tokens and host.in_flight < self.hosts[best].in_flight
            ):
                best, best_tokens = h, tokens
        return best

    def _link(self, now: float, nbytes: float, latency: float) -> float:
        """Occupy the shared L2 link; returns when this transfer is done."""
        start = max(now, self.link_free_s)
        busy = nbytes / self.c.l2_bytes_per_s
        self.link_free_s = start + busy
        self.link_busy_s += busy
        return start + busy + latency

    def _serve(self, h: int, call: _Call, now: float) -> None:
        host = self.hosts[h]
        prompt = call.app.prompts[call.node.id]
        host_tok = l2_tok = 0
        for seg, tokens in prompt:
            if seg in host.cache:
                host.cache.touch(seg)
                host_tok += tokens
            elif self.c.l2 and seg in self.l2:
                self.l2.touch(seg)
                l2_tok += tokens
            else:
                break
        total = sum(t for _, t in prompt)
        if l2_tok:
            backlog = max(0.0, self.link_free_s - now)
            fetch = backlog + l2_tok * self.kv_per_token / self.c.l2_bytes_per_s
            if fetch + self.c.l2_latency_s >= l2_tok * self.prefill_per_token_s:
                l2_tok = 0  # prefilling is faster than waiting for the link
        miss_tok = total - host_tok - l2_tok
        begin = now - self._upload_early_s(call, host_tok, l2_tok)
        ready = begin + (self.p.transfer_s(host_tok * self.kv_per_token) if host_tok else 0.0)
        if l2_tok:
            ready = max(ready, self._link(begin, l2_tok * self.kv_per_token, self.c.l2_latency_s))
        ready = max(ready, now)
        restore = ready - now
        prefill = miss_tok * self.prefill_per_token_s
        start = max(ready, host.gpu_free_s)
        host.gpu_free_s = start + prefill
        prefill = host.gpu_free_s - ready  # waiting for the GPU included
        decode = max(1, call.node.output_tokens) * self.decode_step_s
        self.calls += 1
        self.prompt_tokens += total
        self.host_tokens += host_tok
        self.l2_tokens += l2_tok
        self.prefill_tokens += miss_tok
        self.restore_s += restore
        self.prefill_s += prefill
        self._push(ready + prefill + decode, "finish", (h, call))

    def _upload_early_s(self, call: _Call, host_tok: int, l2_tok: int) -> float:
        """How long before the call its KV's upload starts (predictive upload), by the
        daemon's rule, within the tool call that came before it."""
        if not (self.c.predictive_upload and call.after_tool_s > 0 and host_tok + l2_tok):
            return 0.0
        bt = self.p.block_tokens
        blocks, l2_blocks = -(-(host_tok + l2_tok) // bt), -(-l2_tok // bt)
        lead = upload_lead_s(self.cost, blocks, l2_blocks, self.c.upload_piece_blocks)
        return min(lead, call.after_tool_s)

    def _finish(self, h: int, call: _Call, now: float) -> None:
        host = self.hosts[h]
        segments = [*call.app.prompts[call.node.id], call.app.outputs[call.node.id]]
        for seg, tokens in segments:
            for old, nbytes in host.cache.put(seg, tokens * self.kv_per_token):
                if not self.c.l2 or old in self.l2:
                    continue
                if self.link_free_s - now > self.c.l2_write_backlog_s:
                    self.l2_dropped += 1
                    continue
                self.l2.put(old, nbytes)
                self._link(now, nbytes, 0.0)  # write-back shares the link
                self.l2_written += nbytes
        host.in_flight -= 1
        if host.queue:
            _, _, nxt = heapq.heappop(host.queue)
            self._serve(h, nxt, now)
        else:
            host.lanes_free += 1
        tool = call.node.tool
        self._push(
            now + (tool.duration_s if tool is not None else 0.0), "done", (call.app, call.node)
        )


def simulate(
    workload: str,
    profile: Profile,
    config: ClusterConfig,
    *,
    apps: int,
    qps: float,
    seed: int = 0,
) -> ClusterResult:
    """One cluster run of ``apps`` applications of ``workload`` arriving at ``qps`` in all."""
    if apps < 1 or not (qps > 0 and math.isfinite(qps)):
        raise ValueError("apps must be >= 1 and qps positive")
    trace = make_trace(get_generator(workload), qps=qps, seed=seed, n_apps=apps)
    return ClusterSim(profile, config, seed).run(trace.apps)
