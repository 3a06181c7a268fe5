"""The one interface every scheduling policy implements, and the name registry.

Two consumers drive the same policy objects: the daemon (``tokencake.daemon.server``) and
the discrete-event simulator (``tokencake.sim``). One policy instance schedules ONE engine's
GPU KV pool (and the host blocks granted to it); the daemon creates one per registered
engine and delivers every ``RegisterApp`` to each of them.

How to drive a policy (both consumers)::

    policy = create_policy("tokencake", PolicyConfig(...))
    decisions = policy.on_event(event, now)     # for every event in time order
    ...
    # each engine step:
    decisions += policy.on_event(EngineState(total, free, n_waiting, n_running), now)
    decisions += policy.tick(now)               # due uploads, deadlines, upload pieces
    order = policy.admission_order(waiting, now)    # try to admit in this order
    if policy.may_allocate(app_id, agent_id, n_blocks, now): ...  # before each allocation
    victims = policy.eviction_order(cached, now)    # free cached KV in this order

An agent event is the protocol's struct (``tokencake.protocol.LlmCallStart``...); ``now``
is when it happened (see ``events``). ``on_event`` and ``tick`` return decisions to carry
out (see ``decisions``). The engine reports what it did back as events (``TransferDone``,
``KvEvicted``, ``LlmCallAdmitted``...).
Events must come with non-decreasing ``now``; a policy never reads a clock. Same events in,
same decisions out.

Queries are pure with respect to decisions (they never emit decisions and never mutate
state the decisions depend on), so an engine may call them as often as it likes.
``eviction_order`` may return fewer items than it was given: the missing ones are pinned
and must not be evicted now.

Registry: the ``tokencake.policies`` entry points map a name to a class imported lazily on
``create_policy`` (like vLLM's ``KVConnectorFactory``), so out-of-tree policies plug in
without a fork (an entry point in their own package) and ``list_policies()`` works without
importing them; ``register_policy`` adds one at run time.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from tokencake.daemon.scheduler.events import Event, Tick
from tokencake.plugins import Registry
from tokencake.protocol import DecisionRecord

logger = logging.getLogger(__name__)


class PolicyError(Exception):
    """Base of the scheduler's typed errors."""


class UnknownPolicyError(PolicyError, KeyError):
    """No policy is registered under that name."""


class PolicyConfigError(PolicyError, ValueError):
    """A configuration value that no engine could run with."""


class EventOrderError(PolicyError, ValueError):
    """An event went back in time. Policies need a monotonic clock to be deterministic."""


@dataclass(slots=True)
class PolicyConfig:
    """Knobs shared by every policy. Defaults follow the numbers measured in the TokenCake
    paper (arXiv 2510.18586).

    Most of TokenCake's thresholds are derived at run time (bandwidth, prediction error,
    critical-path slack); the fields here are the physical facts and the few bounds that
    must come from an operator.
    """

    block_tokens: int = 16
    """Tokens per GPU KV block (vLLM's block_size)."""
    bytes_per_block: int = 2 * 48 * 16 * 8 * 128 * 2
    """Bytes of one block over all layers (default: a 14B-class model, bf16, 48 layers)."""
    d2h_bytes_per_s: float = 12e9
    """Starting GPU->host bandwidth; refined online from ``TransferMeasured``."""
    h2d_bytes_per_s: float = 12e9
    copy_overhead_s: float = 0.002
    """Starting per-copy fixed cost; refined online."""
    l2_bytes_per_s: float = 1e9
    """Starting L2 -> host arena bandwidth (an agent's KV that left the arena for the L2
    tier is fetched before its upload); refined online from ``TransferMeasured("l2")``."""
    l2_overhead_s: float = 0.001
    """Starting fixed cost of one L2 fetch (a round trip to the store); refined online."""
    host_blocks: int = 100_000
    """Host blocks this engine may use when ``EngineState`` does not report them."""
    min_margin_s: float = 0.02
    """Smallest benefit (seconds of stall beyond the round trip) worth an offload."""
    upload_piece_blocks: int = 64
    """Gradual reservation: at most this many blocks reserved per upload piece."""
    upload_pieces_per_tick: int = 8
    """At most this many upload pieces are released per tick (bounds per-tick work)."""
    default_tool_s: float = 1.0
    """Tool duration assumed with neither a hint nor history."""
    deadline_factor: float = 4.0
    deadline_min_s: float = 60.0
    deadline_max_s: float = 3600.0
    """Safety deadline of a tool call: factor x upper prediction, clamped to [min, max]."""
    host_ttl_s: float = 600.0
    """KV of an overdue tool call is kept on the host this long past the deadline, then
    dropped: a tool call that never ends cannot hold memory forever."""
    recompute_s_per_block: float = 0.0016
    """Prefill time per block (16 tokens at ~10k tokens/s); used by cost comparisons."""
    llm_s_default: float = 2.0
    """Expected LLM call time when the DAG gives none (for critical-path lengths)."""
    max_reserve_fraction: float = 0.5
    """Upper bound of the GPU pool held in per-class reservations."""
    partition_interval_s: float = 1.0
    """The partition is recomputed at most this often (and on large load changes)."""
    continuum_ttl_max_s: float = 30.0
    """Continuum: pin for the predicted tool time, at most this long."""
    tool_pin_max_s: float = 30.0
    """TokenCake: KV kept on the GPU through a tool call is pinned until the call's q95,
    if that is at most this long (a longer call leaves it to the eviction order)."""
    offload_usage_floor: float = 0.6
    """With no waiting demand, offload only when GPU usage is at least this (60 %, as in the
    TokenCake authors' vLLM fork, github.com/pku-lemonade/TokenCake): below it the freed
    blocks would sit unused and the copies cost bandwidth."""

    def __post_init__(self) -> None:
        positive = {
            "block_tokens": self.block_tokens,
            "bytes_per_block": self.bytes_per_block,
            "d2h_bytes_per_s": self.d2h_bytes_per_s,
            "h2d_bytes_per_s": self.h2d_bytes_per_s,
            "l2_bytes_per_s": self.l2_bytes_per_s,
            "upload_piece_blocks": self.upload_piece_blocks,
            "upload_pieces_per_tick": self.upload_pieces_per_tick,
            "default_tool_s": self.default_tool_s,
            "deadline_factor": self.deadline_factor,
            "deadline_min_s": self.deadline_min_s,
            "llm_s_default": self.llm_s_default,
            "partition_interval_s": self.partition_interval_s,
        }
        for key, value in positive.items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise PolicyConfigError(f"{key} must be a positive finite number, got {value!r}")
        nonneg = {
            "copy_overhead_s": self.copy_overhead_s,
            "host_blocks": self.host_blocks,
            "min_margin_s": self.min_margin_s,
            "host_ttl_s": self.host_ttl_s,
            "recompute_s_per_block": self.recompute_s_per_block,
            "continuum_ttl_max_s": self.continuum_ttl_max_s,
        }
        for key, value in nonneg.items():
            if not (math.isfinite(value) and value >= 0):
                raise PolicyConfigError(f"{key} must be >= 0, got {value!r}")
        if self.deadline_max_s < self.deadline_min_s:
            raise PolicyConfigError("deadline_max_s must be >= deadline_min_s")
        if not 0.0 <= self.tool_pin_max_s <= 86400.0:
            raise PolicyConfigError("tool_pin_max_s must be in [0, 86400]")
        if not 0.0 <= self.offload_usage_floor <= 1.0:
            raise PolicyConfigError("offload_usage_floor must be in [0, 1]")
        if not 0.0 <= self.max_reserve_fraction <= 1.0:
            raise PolicyConfigError("max_reserve_fraction must be in [0, 1]")


@dataclass(slots=True)
class WaitingRequest:
    """One request in the engine's waiting queue, as ``admission_order`` sees it."""

    request_id: str
    app_id: str
    agent_id: str
    blocks: int
    arrival_s: float


@dataclass(slots=True)
class CachedKv:
    """Evictable GPU KV of one agent (not used by a running request), for ``eviction_order``."""

    app_id: str
    agent_id: str
    blocks: int
    last_used_s: float


@dataclass(slots=True)
class AgentView:
    """What a policy knows about one agent: for ``tokencake-ctl agents`` and for tests."""

    app_id: str
    agent_id: str
    agent_type: str
    state: str
    importance: float
    priority: float
    on_critical_path: bool
    gpu_blocks: int
    host_blocks: int
    tool_kind: str
    tool_predicted_s: float | None
    state_since_s: float
    protect_blocks: int = 0
    """Blocks the critical-inversion guard keeps free for this agent (``guard``)."""
    app_registered_s: float = 0.0
    """When the agent's application registered (policy clock)."""
    app_lead_s: float = 0.0
    """How far ahead of its registration the application ranks (``guard.app_lead_s``):
    the admission order's and the guard's rank is ``app_registered_s - app_lead_s``."""


class Policy(ABC):
    """A KV scheduling policy: events in, decisions out, plus per-step engine queries."""

    name: ClassVar[str] = ""
    ranks_running: ClassVar[bool] = False
    """The engine integration keeps running requests in ``admission_order`` too, so that
    a preemption takes the lowest-ranked one (vLLM's ``TokenCakeScheduler`` sorts its
    running list before each step); otherwise the engine's own victim (vLLM: the most
    recently admitted request)."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config if config is not None else PolicyConfig()

    @abstractmethod
    def on_event(self, event: Event, now: float) -> list[DecisionRecord]:
        """Apply one event that happened at ``now``; return the decisions it causes
        (possibly none)."""

    def tick(self, now: float) -> list[DecisionRecord]:
        return self.on_event(Tick(), now)

    @abstractmethod
    def admission_order(
        self, waiting: Sequence[WaitingRequest], now: float
    ) -> list[WaitingRequest]:
        """The waiting requests in the order the engine should try to admit them."""

    @abstractmethod
    def eviction_order(self, candidates: Sequence[CachedKv], now: float) -> list[CachedKv]:
        """Evictable KV, first victim first. Items left out are pinned: do not evict."""

    @abstractmethod
    def may_allocate(self, app_id: str, agent_id: str, n_blocks: int, now: float) -> bool:
        """May this agent take ``n_blocks`` more GPU blocks now (critical-inversion guard)?"""

    def agent_view(self, app_id: str, agent_id: str) -> AgentView | None:
        return None

    def agent_views(self, app_id: str = "") -> list[AgentView]:
        return []

    def critical_path(self, app_id: str) -> list[str]:
        return []


# --------------------------------------------------------------------------- registry


@dataclass(slots=True, frozen=True)
class PolicyInfo:
    name: str
    module: str
    class_name: str
    summary: str

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "module": self.module,
            "class": self.class_name,
            "summary": self.summary,
        }


REGISTRY = Registry("tokencake.policies")
"""Policies by name: the ``tokencake.policies`` entry points; the built-ins are declared in
``pyproject.toml``."""

_SUMMARIES: dict[str, str] = {}

BUILTIN_SUMMARIES = {
    "tokencake": "temporal offload + predictive upload, and DAG-aware spatial partition/priority",
    "tokencake-temporal": "ablation: temporal offload/upload only (FCFS admission, LRU eviction)",
    "tokencake-spatial": "ablation: spatial partition/priority only (no offload)",
    "vllm": "no offload, LRU prefix cache, recompute on a miss",
    "lru-offload": (
        "save KV to host at request end, LRU host eviction, reload on prefix hit (LMCache-like)"
    ),
    "infercept": "per tool call: preserve, discard+recompute or swap, least memory x time waste",
    "continuum": "pin the agent's KV with a time-to-live across the tool call",
    "kvflow": "evict by steps-to-execution in the workflow, prefetch the next agent's KV",
}
"""What ``tokencake-ctl policies`` says of each built-in, without importing it."""


def register_policy(name: str, module: str, class_name: str, summary: str = "") -> None:
    """Register (or re-register) a policy class by import path; nothing is imported now."""
    if not name or not module or not class_name:
        raise PolicyConfigError("policy name, module and class name must be non-empty")
    REGISTRY.register(name, f"{module}:{class_name}")
    _SUMMARIES[name] = summary


def _info(name: str) -> PolicyInfo:
    target = REGISTRY.target(name) or ":"
    module, _, class_name = target.partition(":")
    summary = _SUMMARIES.get(name, BUILTIN_SUMMARIES.get(name, ""))
    return PolicyInfo(name, module, class_name, summary)


def list_policies() -> list[PolicyInfo]:
    """Registered policies, sorted by name. Imports no policy module."""
    return [_info(name) for name in REGISTRY.names()]


def policy_class(name: str) -> type[Policy]:
    if REGISTRY.target(name) is None:
        known = ", ".join(REGISTRY.names())
        raise UnknownPolicyError(f"unknown policy {name!r}; registered: {known}")
    info = _info(name)
    try:
        cls = REGISTRY.load(name)
    except AttributeError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise UnknownPolicyError(f"{info.module}.{info.class_name} is not a Policy subclass")
    return cls


def create_policy(name: str, config: PolicyConfig | None = None) -> Policy:
    """A fresh instance of the named policy (one per engine)."""
    policy = policy_class(name)(config)
    logger.debug("created policy %s", name)
    return policy
