"""The engines the daemon serves: one record per registered engine, found by id, owner or name.

An engine's ``owner`` number tags the store slots it holds leases on; its ``identity`` is the
ROUTER peer that decisions are pushed to. The registry only keeps the books; what registering
and leaving do to the store and the scheduler is ``EngineService``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokencake.layout import KvLayout
from tokencake.protocol import ErrorCode, ProtocolError

PendingCopies = dict[int, tuple[float, str, str]]
"""slot -> (start time, app id, agent id) of an unfinished store or load."""


@dataclass(slots=True)
class EngineRecord:
    engine_id: str
    owner: int
    name: str
    identity: bytes
    layout: KvLayout
    fingerprint: str
    layout_id: int
    num_gpu_blocks: int
    last_seen: float
    num_gpu_blocks_free: int = -1
    num_waiting: int = 0
    num_running: int = 0
    stores: PendingCopies = field(default_factory=dict)
    loads: PendingCopies = field(default_factory=dict)


class EngineRegistry:
    def __init__(self) -> None:
        self.by_id: dict[str, EngineRecord] = {}
        self.by_owner: dict[int, EngineRecord] = {}
        self.by_name: dict[str, EngineRecord] = {}
        self.next_owner = 1

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, engine_id: str) -> EngineRecord | None:
        return self.by_id.get(engine_id)

    def live(self, engine_id: str, now: float) -> EngineRecord:
        """The engine a request names, marked seen at ``now``; a typed error if unknown."""
        engine = self.by_id.get(engine_id)
        if engine is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_ENGINE, f"no engine {engine_id[:64]!r}; register first"
            )
        engine.last_seen = now
        return engine

    def new_owner(self) -> int:
        owner = self.next_owner
        self.next_owner += 1
        return owner

    def add(self, record: EngineRecord) -> None:
        self.by_id[record.engine_id] = record
        self.by_owner[record.owner] = record
        self.by_name[record.name] = record

    def remove(self, engine: EngineRecord) -> None:
        self.by_id.pop(engine.engine_id, None)
        self.by_owner.pop(engine.owner, None)
        if self.by_name.get(engine.name) is engine:
            del self.by_name[engine.name]

    def silent(self, now: float, timeout_s: float) -> list[EngineRecord]:
        """Engines not heard from for more than ``timeout_s``."""
        return [e for e in self.by_id.values() if now - e.last_seen > timeout_s]
