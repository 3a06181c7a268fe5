"""What the scheduler brain consumes: the protocol's agent events, and the engine's reports.

One vocabulary: an agent event the policy sees is the wire struct a client or connector
sends (``tokencake.protocol``'s ``RegisterApp``, ``LlmCallStart``, ``LlmCallAdmitted``,
``LlmCallFinish``, ``ToolCallStart``, ``ToolCallEnd``, ``AppEnd``), and the time it happened
travels beside it: ``policy.on_event(event, now)`` (seconds on the caller's clock). The
scheduler never reads a wall clock, so the daemon (monotonic time) and the simulator
(virtual time) feed the same code and a replayed event sequence gives the same decisions.
The wire fields the policy does not use (``engine_id``) are routing for the daemon.

The structs declared here travel on no wire: they are what an engine (the daemon on its
behalf, or the simulator's engine) tells the policy about its own pool and copies, and what
the daemon makes of two senders' events (``ToolCallOver``). Their names are not op names of
the protocol. ``LlmCallPreempted`` is the protocol's struct (an engine reports it: vLLM's
``TokenCakeScheduler``, or the simulator's engine), re-exported here with the engine's events.

Agents are keyed by ``(app_id, agent_id)``; ``agent_id`` is the DAG node id. Events for an
agent whose app was never registered are accepted: the policy creates a one-node app for it,
so a client that skips ``register_app`` still gets temporal scheduling.

Lifecycle of one agent, as the engine/daemon reports it (``tokencake.phases`` holds the
phase machine)::

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

from tokencake import protocol as p

Direction = Literal["d2h", "h2d"]
Measured = Literal["d2h", "h2d", "l2"]
"""What a ``TransferMeasured`` timed: a copy either way, or a fetch L2 -> host arena."""
Where = Literal["gpu", "host"]
Tier = Literal["host", "l2"]

AgentEvent = (
    p.RegisterApp
    | p.LlmCallStart
    | p.LlmCallAdmitted
    | p.LlmCallFinish
    | p.ToolCallStart
    | p.ToolCallEnd
    | p.AppEnd
)
"""The protocol's agent events, as the policy takes them."""


LlmCallPreempted = p.LlmCallPreempted
"""The engine preempted the running request and freed ``blocks_freed`` GPU blocks, of which
``blocks_cached`` (-1: all) still hold its KV."""


@dataclass(slots=True, frozen=True)
class ToolCallOver:
    """A tool call the daemon heard of only after it ended: its ``tool_call_end`` came
    before its ``tool_call_start`` (two senders, ``tokencake.phases.EarlyEnd``). The agent
    is not in it; ``duration_s`` is how long it lasted."""

    app_id: str
    agent_id: str
    tool_kind: str
    predicted_s: float | None = None
    duration_s: float = 0.0


@dataclass(slots=True, frozen=True)
class EngineState:
    """The engine's GPU KV pool and queue at the event's time.

    ``waiting_blocks`` is the blocks the waiting queue needs in all (0: unknown, the policy
    uses its own count). Host fields are -1 when the reporter does not know them; the policy
    then uses ``PolicyConfig.host_blocks`` and its own accounting.
    """

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

    app_id: str
    agent_id: str
    direction: Direction
    blocks: int
    ok: bool = True


@dataclass(slots=True, frozen=True)
class KvEvicted:
    """The engine (gpu) or the host store (host) freed ``blocks`` of the agent's cached KV."""

    app_id: str
    agent_id: str
    blocks: int
    where: Where = "gpu"


@dataclass(slots=True, frozen=True)
class KvTierMoved:
    """``blocks`` of the agent's host KV left the host arena for the L2 tier (``to="l2"``:
    the host store evicted them, written back) or came back from it (``to="host"``). They
    stay the agent's host KV; an upload of them first fetches them from L2."""

    app_id: str
    agent_id: str
    blocks: int
    to: Tier = "l2"


@dataclass(slots=True, frozen=True)
class Tick:
    """Time passed. Call at least once per engine step (or every few ms in the daemon)."""


EngineEvent = (
    p.LlmCallPreempted
    | ToolCallOver
    | EngineState
    | TransferMeasured
    | TransferDone
    | KvEvicted
    | KvTierMoved
    | Tick
)
"""What the engine (or the daemon on its behalf) reports: on no wire but the preemption."""

Event = AgentEvent | EngineEvent

__all__ = [
    "AgentEvent",
    "Direction",
    "EngineEvent",
    "EngineState",
    "Event",
    "KvEvicted",
    "KvTierMoved",
    "LlmCallPreempted",
    "Measured",
    "Tick",
    "Tier",
    "ToolCallOver",
    "TransferDone",
    "TransferMeasured",
    "Where",
]
