"""Backend settings, read from ``--hicache-storage-backend-extra-config``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Final

# Keys of the same JSON object that SGLang itself (or its dynamic loader) reads. SGLang pops
# prefetch_threshold, prefetch_timeout_* and hicache_storage_pass_prefix_keys before the
# backend sees the dict; these stay in it.
SGLANG_KEYS: Final = frozenset(
    {
        "backend_name",
        "module_path",
        "class_name",
        "interface_v1",
        "tp_lcm_size",
        "file_storage_path",
        "enable_metadata_cache",
        "metadata_ttl",
    }
)


@dataclass(slots=True)
class BackendConfig:
    """Every TokenCake key of the extra config, with its default."""

    endpoint: str = ""
    """tokencaked's ZMQ endpoint; empty: ``$TOKENCAKE_ENDPOINT``, else the daemon default."""
    engine_name: str = ""
    """Stable engine name; empty: ``sglang:<model>:tp<rank>``. Re-registering replaces it."""
    timeout_ms: float = 50.0
    """Per-request reply timeout. SGLang's storage threads wait at most this long per call."""
    reconnect_s: float = 1.0
    """How often a daemon that is down is tried again (one register, on the next call)."""
    salt: str = ""
    """Tenant salt sent with every key. SGLang's own ``extra_key`` and ``cache_salt`` are
    already part of its page hashes; this one separates tenants sharing one daemon."""
    prefault: bool = True
    """Fault the arena mapping in at registration (startup), so the first copy into each
    page does not pay a fault."""

    def __post_init__(self) -> None:
        if not 0 < self.timeout_ms <= 10_000:
            raise ValueError("timeout_ms must be in (0, 10000]")
        if self.reconnect_s <= 0:
            raise ValueError("reconnect_s must be positive")
        if len(self.engine_name) > 256 or len(self.salt) > 256:
            raise ValueError("engine_name and salt must be at most 256 characters")

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> BackendConfig:
        """The TokenCake keys of ``extra``; SGLang's own keys are skipped, others refused."""
        ours = {k: v for k, v in (extra or {}).items() if k not in SGLANG_KEYS}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(ours) - known)
        if unknown:
            raise ValueError(f"unknown TokenCake backend keys {unknown}; known: {sorted(known)}")
        return cls(**ours)
