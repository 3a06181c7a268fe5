"""Typed events the scheduler brain consumes.

Every event carries ``now`` (seconds on the caller's clock): the scheduler never reads a
wall clock, so the daemon (monotonic time) and the simulator (virtual time) feed the same
code and a replayed event sequence gives the same decisions.

Agents are keyed by ``(app_id, agent_id)``; ``agent_id`` is the DAG node id. Events for an
agent whose app was never registered are accepted: the policy creates a one-node app for it,
so a client that skips ``register_app`` still gets temporal scheduling.

Lifecycle of one agent, as the engine/daemon reports it::

    LlmCallStart (request queued, needs ``blocks``)
      -> LlmCallAdmitted (engine gave it GPU blocks)  [-> LlmCallPreempted -> LlmCallAdmitted]
      -> LlmCallFinish (its ``kv_blocks`` stay on the GPU as cached prefix KV)
      -> ToolCallStart ... ToolCallEnd -> LlmCallStart ...
    AppEnd (every agent of the app is done; its KV may be dropped)

Engines report ``EngineState`` (each step or each heartbeat) and the outcome of the
decisions they carried out: ``TransferDone`` for offload/upload copies, ``TransferMeasured``
for bandwidth samples, ``KvEvicted`` when the engine itself freed cached KV. ``Tick`` only
advances time; timed decisions (predictive uploads, deadlines, upload pieces) come out of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tokencake.protocol import AppDag

Direction = Literal["d2h", "h2d"]
Measured = Literal["d2h", "h2d", "l2"]
"""What a ``TransferMeasured`` timed: a copy either way, or a fetch L2 -> host arena."""
Where = Literal["gpu", "host"]
Tier = Literal["host", "l2"]


@dataclass(slots=True, frozen=True)
class AppRegistered:
    """An application declared its DAG. Re-registering an app id replaces nothing."""

    now: float
    app_id: str
    dag: AppDag
    tenant: str = ""


@dataclass(slots=True, frozen=True)
class LlmCallStart:
    """An agent's LLM request entered the engine's waiting queue.

    ``blocks`` is the GPU blocks the request needs to start (prompt blocks not already
    cached); 0 means "derive from ``prompt_tokens`` and the configured block size".
    """

    now: float
    app_id: str
    agent_id: str
    request_id: str = ""
    prompt_tokens: int = 0
    blocks: int = 0


@dataclass(slots=True, frozen=True)
class LlmCallAdmitted:
    """The engine scheduled the request: it now holds ``blocks`` GPU blocks (running).

    ``reported``: the engine's pool reports already count these blocks as taken (an
    admission inferred when the call finishes, after reports taken while it ran), so the
    policy's free count must not take them again.
    """

    now: float
    app_id: str
    agent_id: str
    request_id: str = ""
    blocks: int = 0
    reported: bool = False


@dataclass(slots=True, frozen=True)
class LlmCallPreempted:
    """The engine preempted the running request and freed ``blocks_freed`` GPU blocks."""

    now: float
    app_id: str
    agent_id: str
    request_id: str = ""
    blocks_freed: int = 0


@dataclass(slots=True, frozen=True)
class LlmCallFinish:
    """The LLM call ended; ``kv_blocks`` of the agent's KV remain on the GPU (cached)."""

    now: float
    app_id: str
    agent_id: str
    request_id: str = ""
    output_tokens: int = 0
    kv_blocks: int = 0


@dataclass(slots=True, frozen=True)
class ToolCallStart:
    """The agent stalls on a tool. ``predicted_s`` is the caller's hint (None: no hint)."""

    now: float
    app_id: str
    agent_id: str
    tool_kind: str
    predicted_s: float | None = None
    call_id: str = ""


@dataclass(slots=True, frozen=True)
class ToolCallEnd:
    now: float
    app_id: str
    agent_id: str
    call_id: str = ""
    ok: bool = True


@dataclass(slots=True, frozen=True)
class AppEnd:
    now: float
    app_id: str


@dataclass(slots=True, frozen=True)
class EngineState:
    """The engine's GPU KV pool and queue as of ``now``.

    ``waiting_blocks`` is the blocks the waiting queue needs in all (0: unknown, the policy
    uses its own count). Host fields are -1 when the reporter does not know them; the policy
    then uses ``PolicyConfig.host_blocks`` and its own accounting.
    """

    now: float
    gpu_blocks_total: int
    gpu_blocks_free: int
    num_waiting: int = 0
    num_running: int = 0
    waiting_blocks: int = 0
    host_blocks_total: int = -1
    host_blocks_free: int = -1


@dataclass(slots=True, frozen=True)
class TransferMeasured:
    """One measured copy (or L2 fetch): feeds the online bandwidth and overhead estimate."""

    now: float
    direction: Measured
    nbytes: int
    seconds: float
    blocks: int = 0


@dataclass(slots=True, frozen=True)
class TransferDone:
    """An offload (d2h) or upload piece (h2d) the policy decided has completed.

    ``blocks`` is the number of blocks this copy moved. ``ok=False`` means the copy failed:
    for d2h the KV stays on the GPU, for h2d the host copy is kept and the reserved GPU
    blocks were released.
    """

    now: float
    app_id: str
    agent_id: str
    direction: Direction
    blocks: int
    ok: bool = True


@dataclass(slots=True, frozen=True)
class KvEvicted:
    """The engine (gpu) or the host store (host) freed ``blocks`` of the agent's cached KV."""

    now: float
    app_id: str
    agent_id: str
    blocks: int
    where: Where = "gpu"


@dataclass(slots=True, frozen=True)
class KvTierMoved:
    """``blocks`` of the agent's host KV left the host arena for the L2 tier (``to="l2"``:
    the host store evicted them, written back) or came back from it (``to="host"``). They
    stay the agent's host KV; an upload of them first fetches them from L2."""

    now: float
    app_id: str
    agent_id: str
    blocks: int
    to: Tier = "l2"


@dataclass(slots=True, frozen=True)
class Tick:
    """Time passed. Call at least once per engine step (or every few ms in the daemon)."""

    now: float


Event = (
    AppRegistered
    | LlmCallStart
    | LlmCallAdmitted
    | LlmCallPreempted
    | LlmCallFinish
    | ToolCallStart
    | ToolCallEnd
    | AppEnd
    | EngineState
    | TransferMeasured
    | TransferDone
    | KvEvicted
    | KvTierMoved
    | Tick
)

__all__ = [
    "AppEnd",
    "AppRegistered",
    "Direction",
    "EngineState",
    "Event",
    "KvEvicted",
    "KvTierMoved",
    "LlmCallAdmitted",
    "LlmCallFinish",
    "LlmCallPreempted",
    "LlmCallStart",
    "Measured",
    "Tick",
    "Tier",
    "ToolCallEnd",
    "ToolCallStart",
    "TransferDone",
    "TransferMeasured",
    "Where",
]
