"""The simulated engine's records: applications and requests in flight, copies, counters,
the run's raw result, and the host link's queues."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from tokencake.daemon.scheduler import WaitingRequest
from tokencake.sim.kvpool import AgentKv
from tokencake.sim.profiles import Profile
from tokencake.sim.workload import AppSpec, NodeSpec

KeyCache = dict[tuple[str, str], tuple[list[int], int]]
"""(app id, node id) -> (the prompt's chain keys, prompt tokens), shared across runs."""

ARRIVAL, TOOL_END, TRANSFER_DONE, UPLOAD_DUE = range(4)
"""Kinds of the engine's timed events."""


class SimulationError(RuntimeError):
    """The simulation could not finish (see ``SimulationStalled``)."""


class SimulationStalled(SimulationError):
    """Requests wait, nothing runs and nothing is scheduled to happen: a deadlock."""


@dataclass(slots=True, eq=False)
class AppRun:
    spec: AppSpec
    pending_preds: dict[str, int]
    successors: dict[str, list[str]]
    critical: set[str]
    nodes_left: int
    finish_s: float = -1.0
    critical_llm_s: float = 0.0
    queue_s: float = 0.0


@dataclass(slots=True, eq=False)
class Request:
    rid: str
    app: AppRun
    node: NodeSpec
    agent: AgentKv
    keys: list[int]
    prompt_tokens: int
    output_tokens: int
    view: WaitingRequest
    ready_s: float
    enqueued_s: float
    generated: int = 0
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    registered: int = 0
    waiting_on: int = 0
    recompute_left: int = 0
    admitted_s: float = -1.0
    walk_sig: tuple[int, ...] = ()
    walk: tuple[int, list[int], list[tuple[int, Transfer]], list[int]] | None = None

    @property
    def target(self) -> int:
        return self.prompt_tokens + self.generated


@dataclass(slots=True, eq=False)
class Transfer:
    direction: str
    kind: str  # "offload" | "upload" | "load"
    agent: AgentKv
    blocks: list[int]
    keys: list[int]
    nbytes: int
    priority: int
    free_gpu: bool = False
    settles: int = 0
    """Blocks of the policy's decision this copy settles (``TransferDone``): the copied
    ones plus those an offload found on the host already."""
    waiters: list[Request] = field(default_factory=list)
    submit_s: float = 0.0
    start_s: float = 0.0
    seq: int = 0


@dataclass(slots=True)
class Counters:
    """What one simulated run counts (``sim/metrics.py`` reports them)."""

    # The event loop.
    steps: int = 0
    """Engine steps run."""
    heap_events: int = 0
    """Timed events handled: arrivals, tool ends, finished copies, due uploads."""
    policy_events: int = 0
    """Agent events delivered to the policy."""
    ticks: int = 0
    """Periodic policy ticks."""
    # Prompt tokens (computed, computed again, found) and preemptions.
    prefill_tokens: int = 0
    recompute_tokens: int = 0
    """Prefill tokens computed again: they had been computed before, and were lost."""
    gpu_hit_tokens: int = 0
    """Prompt tokens found in GPU blocks at admission (prefix cache)."""
    host_hit_tokens: int = 0
    """Prompt tokens loaded from the host store at admission."""
    preemptions: int = 0
    """Running requests the engine preempted (their GPU blocks taken back)."""
    # Copies between GPU and host, and what left either.
    offload_bytes: int = 0
    upload_bytes: int = 0
    offload_blocks: int = 0
    upload_blocks: int = 0
    host_evicted_blocks: int = 0
    """Host blocks evicted to make room for an offload."""
    host_dropped_blocks: int = 0
    """Host blocks freed by the policy's drop decisions."""
    offload_unread_blocks: int = 0
    """Blocks an offload wrote to the host that nothing read (load or upload) before they
    left the host or the run ended: copies that were pure cost."""
    gpu_evicted_blocks: int = 0
    """GPU blocks evicted from the prefix cache to make room."""
    failed_uploads: int = 0
    """Uploads that found no free GPU blocks."""
    # The policy.
    unknown_agent_decisions: int = 0
    """Decisions about an agent the engine does not know (finished, or never seen)."""
    decisions: dict[str, int] = field(default_factory=dict)
    time_queue_s: float = 0.0
    time_load_s: float = 0.0
    time_prefill_new_s: float = 0.0
    time_prefill_re_s: float = 0.0
    time_decode_s: float = 0.0


@dataclass(slots=True)
class EngineResult:
    """Raw outcome of one run; ``metrics.summarise`` turns it into the reported record."""

    app_latency_s: list[float]
    critical_llm_s: list[float]
    app_queue_s: list[float]
    makespan_s: float
    app_plain: list[bool]
    """Per finished app (same order as ``app_latency_s``): plain traffic or an agent app."""
    util_integral: float
    util_window_s: float
    timeline: list[tuple[float, float]]
    counters: Counters
    gpu_blocks: int
    peak_used_blocks: int
    block_bytes: int


class CopyObserver(Protocol):
    """Sees every host-link copy as the engine submits and completes it (live mode reports
    them to a real daemon as host-slot ops). ``kind`` is ``offload``, ``upload`` or ``load``;
    ``keys`` are the chain keys of the blocks copied."""

    def copy_submitted(
        self, seq: int, kind: str, app_id: str, agent_id: str, keys: list[int]
    ) -> None: ...

    def copy_done(self, seq: int) -> None: ...


class HostLink:
    """One DMA engine per direction; queued copies start in priority order (contention)."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.active: dict[str, Transfer | None] = {"d2h": None, "h2d": None}
        self.queue: dict[str, list[tuple[int, int, Transfer]]] = {"d2h": [], "h2d": []}

    def duration(self, tr: Transfer) -> float:
        return self.profile.transfer_s(tr.nbytes)
