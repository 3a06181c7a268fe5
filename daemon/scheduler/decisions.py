"""Typed decisions the scheduler brain emits, each with the reason that decided it.

What a consumer (daemon connector push, simulated engine) does with each kind:

``Offload``  copy ``blocks`` of the agent's GPU KV to the host. ``free_gpu=True`` moves it
             (the GPU blocks are freed once the copy is done; report ``TransferDone(d2h)``);
             ``free_gpu=False`` saves a copy and leaves the GPU blocks cached.
``Upload``   reserve ``blocks`` GPU blocks now and copy that many of the agent's host blocks
             into them; report ``TransferDone(h2d)``. A large upload arrives as several
             pieces (``piece`` of ``pieces``) over several steps: gradual reservation, never
             one large blocking allocation. ``priority`` 0 = urgent (the agent is back and
             waits), 1 = predictive (lands just before the predicted tool return),
             2 = prefetch (speculative; may be skipped under pressure).
``Drop``     free ``blocks`` of the agent's KV on the GPU (discard, the next call
             recomputes) or on the host.
``Pin``      the agent's cached GPU KV must not be evicted before ``at_s + ttl_s``.
``Unpin``    the pin ends early (the tool returned, or the TTL ran out).
``Partition``the GPU pool split: per-class reservations (class = agent type) and a shared
             pool. Informational for engines that only ask ``may_allocate``.
``Keep``     nothing to do: the policy considered an offload (or drop) and decided against
             it. Emitted so operators can answer "why was agent X not offloaded?".

Every decision has a ``Reason``: the rule that decided it and the numeric terms it used
(predicted stall, transfer estimate, margin, pressure, priority terms...). ``to_record``
turns a decision into the wire ``protocol.DecisionRecord`` the daemon keeps and serves to
``tokencake-ctl decisions``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from tokencake.protocol import DecisionRecord

Term = float | int | str | bool | None


@dataclass(slots=True)
class Reason:
    """Why a decision was taken: the deciding ``rule`` plus every input and term it used."""

    rule: str
    terms: dict[str, Term] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "terms": dict(self.terms)}


@dataclass(slots=True, kw_only=True)
class Decision:
    """Base of every decision. ``at_s`` is the caller's clock when it was decided."""

    kind: ClassVar[str] = "decision"
    at_s: float
    app_id: str = ""
    agent_id: str = ""
    blocks: int = 0
    reason: Reason

    def params(self) -> dict[str, Any]:
        """Kind-specific fields, for the record's reason map."""
        return {}

    @property
    def due_in_s(self) -> float:
        return 0.0

    def to_record(self, seq: int, engine_id: str, policy: str) -> DecisionRecord:
        reason = self.reason.to_dict()
        params = self.params()
        if params:
            reason["params"] = params
        return DecisionRecord(
            seq=seq,
            at_s=self.at_s,
            kind=self.kind,
            app_id=self.app_id,
            agent_id=self.agent_id,
            engine_id=engine_id,
            blocks=self.blocks,
            due_in_s=self.due_in_s,
            policy=policy,
            reason=reason,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able): handy for logs and golden comparisons in tests."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "at_s": self.at_s,
            "app_id": self.app_id,
            "agent_id": self.agent_id,
            "blocks": self.blocks,
            "reason": self.reason.to_dict(),
        }
        out.update(self.params())
        return out


@dataclass(slots=True, kw_only=True)
class Offload(Decision):
    kind: ClassVar[str] = "offload"
    free_gpu: bool = True

    def params(self) -> dict[str, Any]:
        return {"free_gpu": self.free_gpu}


@dataclass(slots=True, kw_only=True)
class Keep(Decision):
    kind: ClassVar[str] = "keep"


URGENT = 0
PREDICTIVE = 1
PREFETCH = 2


@dataclass(slots=True, kw_only=True)
class Upload(Decision):
    kind: ClassVar[str] = "upload"
    priority: int = URGENT
    piece: int = 1
    pieces: int = 1
    start_in_s: float = 0.0

    @property
    def due_in_s(self) -> float:
        return self.start_in_s

    def params(self) -> dict[str, Any]:
        return {"priority": self.priority, "piece": self.piece, "pieces": self.pieces}


@dataclass(slots=True, kw_only=True)
class Drop(Decision):
    kind: ClassVar[str] = "drop"
    where: str = "gpu"

    def params(self) -> dict[str, Any]:
        return {"where": self.where}


@dataclass(slots=True, kw_only=True)
class Pin(Decision):
    kind: ClassVar[str] = "pin"
    ttl_s: float = 0.0

    @property
    def due_in_s(self) -> float:
        return self.ttl_s

    def params(self) -> dict[str, Any]:
        return {"ttl_s": self.ttl_s}


@dataclass(slots=True, kw_only=True)
class Unpin(Decision):
    kind: ClassVar[str] = "unpin"


@dataclass(slots=True, kw_only=True)
class Partition(Decision):
    kind: ClassVar[str] = "partition"
    reservations: dict[str, int] = field(default_factory=dict)
    shared_blocks: int = 0

    def params(self) -> dict[str, Any]:
        return {"reservations": dict(self.reservations), "shared_blocks": self.shared_blocks}


__all__ = [
    "PREDICTIVE",
    "PREFETCH",
    "URGENT",
    "Decision",
    "Drop",
    "Keep",
    "Offload",
    "Partition",
    "Pin",
    "Reason",
    "Unpin",
    "Upload",
]
