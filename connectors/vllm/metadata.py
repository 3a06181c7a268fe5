"""What the scheduler-side connector tells the worker each step, and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass(slots=True)
class CopyJob:
    """Copy ``blocks[i]`` <-> ``slots[i]``. ``req_id`` is set when vLLM waits on the job
    (an async load, or a save that holds a finished request's blocks)."""

    job_id: int
    slots: list[int]
    blocks: list[int]
    req_id: str = ""
    fail: bool = False  # report the load as failed without copying (its daemon is gone)
    lend: bool = False
    """The daemon decided this copy (an offload, a predictive upload): on a GPU its blocks
    are lent to the daemon's copy worker when it takes them (``lending.py``)."""


@dataclass
class TokenCakeMetadata(KVConnectorMetadata):
    arena_name: str = ""
    arena_bytes: int = 0
    slot_bytes: int = 0
    epoch: int = 0
    """The scheduler's registration count: the worker maps the arena again when it changes
    (and shares its GPU KV again)."""
    engine_id: str = ""
    """The registration's engine id (the worker's daemon-driven copies name it)."""
    loads: list[CopyJob] = field(default_factory=list)
    stores: list[CopyJob] = field(default_factory=list)


@dataclass
class TokenCakeWorkerMetadata(KVConnectorWorkerMetadata):
    """Job ids the worker finished this step (``ok`` or ``failed``), and how long each
    measured copy took (seconds by job id; copies it could not time are absent)."""

    loaded: list[int] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    seconds: dict[int, float] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, TokenCakeWorkerMetadata)
        return TokenCakeWorkerMetadata(
            loaded=self.loaded + other.loaded,
            stored=self.stored + other.stored,
            failed=self.failed + other.failed,
            seconds={**self.seconds, **other.seconds},
        )
