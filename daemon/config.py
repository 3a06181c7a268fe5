"""Daemon configuration: one validated dataclass, built from TOML, then env, then flags.

Precedence, lowest first: the built-in default, the TOML file (``--config``), the
``TOKENCAKE_<KEY>`` environment variables, the command-line flags. Each source is converted
to the keys' types by ``msgspec.convert`` (sizes such as ``512MiB`` are read first); the
merged result is validated once. ``tokencaked --print-config`` prints it as
TOML-compatible JSON.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import msgspec

from tokencake.daemon.scheduler.policy import list_policies
from tokencake.endpoint import default_endpoint

logger = logging.getLogger(__name__)

ENV_PREFIX = "TOKENCAKE_"

# Keys that SIGHUP may change in a running daemon. Everything else (the socket, the arena's
# size and slot size) would invalidate what peers have already mapped or connected to.
RELOADABLE_KEYS = frozenset(
    {
        "log_level",
        "lease_s",
        "engine_timeout_s",
        "policy",
        "max_frame_bytes",
        "decision_history",
        "app_idle_timeout_s",
        "l2_lookup_wait_ms",
        "l2_flush_on_stop_s",
    }
)


class ConfigError(ValueError):
    """A configuration value that the daemon cannot run with."""


def policy_names() -> list[str]:
    """The scheduler policies registered now (``tokencake-ctl policies``); imports none."""
    return [info.name for info in list_policies()]


def _parse_size(value: str | int) -> int:
    """``1073741824``, ``"1GiB"``, ``"512MiB"``, ``"64KiB"`` to bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"not a size: {value!r} (use bytes or e.g. 512MiB, 1GiB)")
    text = value.strip()
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "B": 1}
    upper = text.upper()
    for suffix, mult in units.items():
        if upper.endswith(suffix):
            number = upper[: -len(suffix)].strip()
            try:
                return int(float(number) * mult)
            except (ValueError, OverflowError):
                break
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"not a size: {value!r} (use bytes or e.g. 512MiB, 1GiB)") from None


@dataclass(slots=True)
class DaemonConfig:
    """Every setting of tokencaked, with its default (the embedded default needs no file)."""

    endpoint: str = field(default_factory=default_endpoint)
    """ZMQ endpoint the ROUTER binds. ``ipc://`` (default, socket file 0600) or ``tcp://``;
    TCP requires ``curve_secret_key_file``."""
    arena_bytes: int = 1 << 30
    """Size of the shared-memory KV arena, pre-faulted at start."""
    slot_bytes: int = 0
    """Bytes per slot (one engine block). 0: taken from the first engine that registers."""
    arena_dir: str = "/dev/shm"
    """Where POSIX shared memory lives on this host."""
    instance: str = "default"
    """Names this daemon's arena and metrics; run two daemons with two instances."""
    lease_s: float = 30.0
    """A writer or reader that holds a slot longer than this without renewing loses it."""
    engine_timeout_s: float = 60.0
    """An engine silent for this long is unregistered and its leases released."""
    policy: str = "tokencake"
    """Scheduler policy name (see ``tokencake-ctl policies``)."""
    max_frame_bytes: int = 4 << 20
    """Requests larger than this get a ``frame_too_large`` error reply."""
    decision_history: int = 10000
    """How many recent decisions ``tokencake-ctl decisions`` can show."""
    metrics_port: int = 9477
    """Prometheus metrics on 127.0.0.1:PORT/metrics. 0 disables."""
    curve_secret_key_file: str = ""
    """ZMQ CURVE secret key file (zmq.auth format) for TCP endpoints."""
    curve_authorized_keys_dir: str = ""
    """Directory of the client public-key certificates (zmq.auth format) allowed over TCP;
    a tcp:// endpoint needs it, and a client whose key is not there gets no service."""
    log_level: str = "INFO"
    log_json: bool = True
    """Structured (JSON lines) logs; false gives plain text for a terminal."""
    l2_backend: str = ""
    """The L2 tier under the host store (docs/distributed.md): empty for none, ``redis``,
    ``valkey``, ``redis-cluster``, ``valkey-cluster`` or ``disk``."""
    l2_url: str = ""
    """``redis://[:password@]host:port[/db]`` of the store; for a cluster, one or more seed
    nodes separated by commas."""
    l2_dir: str = ""
    """The disk backend's directory (one file per block)."""
    l2_disk_bytes: int = 16 << 30
    """Most bytes the disk backend keeps; the oldest blocks go first."""
    l2_mode: str = "write-back"
    """``write-back``: evicted blocks go to L2. ``write-through``: committed ones too."""
    l2_namespace: str = "tokencake"
    """First part of every L2 key: deployments sharing one store see each other's KV only
    under the same namespace."""
    l2_queue_bytes: int = 256 << 20
    """Block bytes waiting for L2 at most; writes beyond it are dropped and counted."""
    l2_workers: int = 2
    """Threads talking to the store."""
    l2_batch: int = 16
    """Blocks per pipelined write."""
    l2_timeout_s: float = 1.0
    """A store that does not answer within this is treated as down."""
    l2_retry_s: float = 5.0
    """How long a store that failed is left alone (writes dropped, reads miss)."""
    l2_ttl_s: float = 0.0
    """Expiry of L2 values in seconds; 0 keeps them until the store evicts them."""
    l2_lookup_wait_ms: float = 2.0
    """A lookup whose chain goes on in L2 is answered when the rest has been fetched into
    the arena or after this long, whichever is first (the loop serves others meanwhile).
    0 answers at once with the host's blocks."""
    l2_flush_on_stop_s: float = 5.0
    """At stop (SIGTERM), blocks held only in the arena are written to L2 for at most this
    long; those left are counted and logged. 0 skips the flush."""
    l2_fetch_bytes_per_s: float = 1e9
    """The L2 fetch bandwidth the scheduler assumes until it has timed fetches of its own:
    an agent whose offloaded KV left the arena for L2 is uploaded earlier by the fetch
    time this implies (a remote store over a slow link wants a lower figure)."""
    app_idle_timeout_s: float = 3600.0
    """An app none of whose agents sent an event for this long is ended by the daemon (its
    client went away without ``app_end``); 0 keeps such apps forever."""
    debug_memory_file: str = ""
    """Off when empty. A file the daemon appends a JSON memory report to (RSS, descriptors,
    the Python heap under tracemalloc, allocator totals, fastest-growing allocation sites)
    every ``debug_memory_s``; for soak runs only, tracing costs CPU."""
    debug_memory_s: float = 60.0
    """Seconds between memory reports when ``debug_memory_file`` is set."""
    debug_memory_trace: bool = True
    """With ``debug_memory_file``: trace the Python heap (tracemalloc, whose own traces then
    count in RSS). Off, the reports keep RSS, descriptors, the allocator's statistics and
    container sizes, and cost next to nothing."""
    gpu_copies: str = "off"
    """Daemon-driven GPU copies (docs/vllm.md, "The GPU data plane"): ``cuda`` starts a copy
    worker per GPU for engines that share their KV (``share_gpu_kv``); ``off`` refuses that
    op and engines copy their blocks themselves; ``fake`` is the CPU test device."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not (self.endpoint.startswith("ipc://") or self.endpoint.startswith("tcp://")):
            raise ConfigError(f"endpoint must be ipc:// or tcp://, got {self.endpoint!r}")
        if self.endpoint.startswith("tcp://") and not self.curve_secret_key_file:
            raise ConfigError(
                "a tcp:// endpoint needs curve_secret_key_file: TCP is authenticated only"
            )
        if self.endpoint.startswith("tcp://") and not self.curve_authorized_keys_dir:
            raise ConfigError(
                "a tcp:// endpoint needs curve_authorized_keys_dir: the public keys of the "
                "clients allowed to connect"
            )
        if self.arena_bytes < 1 << 20:
            raise ConfigError(f"arena_bytes must be at least 1 MiB, got {self.arena_bytes}")
        if self.slot_bytes < 0 or (self.slot_bytes and self.slot_bytes > self.arena_bytes):
            raise ConfigError(f"slot_bytes must be 0 or in 1..arena_bytes, got {self.slot_bytes}")
        if not self.instance.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"instance must be alphanumeric (with - _), got {self.instance!r}")
        known = policy_names()
        if self.policy not in known:
            raise ConfigError(f"policy: unknown policy {self.policy!r}; known: {', '.join(known)}")
        if not (0 < self.lease_s < math.inf and 0 < self.engine_timeout_s < math.inf):
            raise ConfigError("lease_s and engine_timeout_s must be positive and finite")
        if not 1024 <= self.max_frame_bytes <= 256 << 20:
            raise ConfigError("max_frame_bytes must be within 1 KiB..256 MiB")
        if self.decision_history < 0:
            raise ConfigError("decision_history must be >= 0")
        if not 0 <= self.app_idle_timeout_s < math.inf:
            raise ConfigError("app_idle_timeout_s must be 0 (never) or a finite number of seconds")
        if not 1.0 <= self.debug_memory_s <= 86400.0:
            raise ConfigError("debug_memory_s must be within 1..86400")
        if self.gpu_copies not in ("off", "cuda", "fake"):
            raise ConfigError(f"gpu_copies must be off, cuda or fake, not {self.gpu_copies!r}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port out of range: {self.metrics_port}")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(
                f"log_level must be DEBUG, INFO, WARNING or ERROR, not {self.log_level}"
            )
        self.log_level = self.log_level.upper()
        self._validate_l2()

    def _validate_l2(self) -> None:
        backends = ("redis", "valkey", "redis-cluster", "valkey-cluster", "disk")
        if self.l2_backend and self.l2_backend not in backends:
            raise ConfigError(f"l2_backend must be empty or one of {', '.join(backends)}")
        if self.l2_backend == "disk" and not self.l2_dir:
            raise ConfigError("l2_backend disk needs l2_dir")
        if self.l2_backend not in ("", "disk") and not self.l2_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(f"l2_backend {self.l2_backend} needs an l2_url redis://host:port")
        if self.l2_mode not in ("write-back", "write-through"):
            raise ConfigError(f"l2_mode must be write-back or write-through, not {self.l2_mode}")
        if (
            not self.l2_namespace
            or not self.l2_namespace.replace("-", "").replace("_", "").isalnum()
        ):
            raise ConfigError("l2_namespace must be alphanumeric (with - _)")
        if self.l2_queue_bytes < 0 or self.l2_disk_bytes <= 0:
            raise ConfigError("l2_queue_bytes must be >= 0 and l2_disk_bytes positive")
        if not (1 <= self.l2_workers <= 64 and 1 <= self.l2_batch <= 4096):
            raise ConfigError("l2_workers must be within 1..64 and l2_batch within 1..4096")
        for name in ("l2_timeout_s", "l2_retry_s"):
            if not 0 < getattr(self, name) < 3600:
                raise ConfigError(f"{name} must be within 0..3600 s (exclusive)")
        if not 0 <= self.l2_ttl_s < 10 * 365 * 86400:
            raise ConfigError("l2_ttl_s must be >= 0")
        if not 0 <= self.l2_lookup_wait_ms <= 10000:
            raise ConfigError("l2_lookup_wait_ms must be within 0..10000")
        if not 0 <= self.l2_flush_on_stop_s < 3600:
            raise ConfigError("l2_flush_on_stop_s must be within 0..3600 s")
        if not 0 < self.l2_fetch_bytes_per_s < math.inf:
            raise ConfigError("l2_fetch_bytes_per_s must be a positive number of bytes per second")

    @property
    def socket_path(self) -> Path | None:
        return Path(self.endpoint[len("ipc://") :]) if self.endpoint.startswith("ipc://") else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: Mapping[str, Any]) -> DaemonConfig:
        merged = self.to_dict()
        merged.update(_coerce_all(overrides))
        return _build(merged)


_HINTS = get_type_hints(DaemonConfig)
_FIELD_TYPES: dict[str, Any] = {f.name: _HINTS[f.name] for f in fields(DaemonConfig)}
_SIZE_KEYS = frozenset(
    {"arena_bytes", "slot_bytes", "max_frame_bytes", "l2_queue_bytes", "l2_disk_bytes"}
)
_BOOL_WORDS = {"yes": "true", "on": "true", "no": "false", "off": "false"}

ConfigLayer = msgspec.defstruct(
    "ConfigLayer",
    [(name, kind | msgspec.UnsetType, msgspec.UNSET) for name, kind in _FIELD_TYPES.items()],
    forbid_unknown_fields=True,
)
"""One source's settings (file, environment or flags): any subset of the keys, typed."""


def _prepare(key: str, value: Any) -> Any:
    """Sizes to bytes; text of a bool or a number trimmed (and yes/no/on/off read as bools)."""
    if key in _SIZE_KEYS:
        try:
            return _parse_size(value)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    kind = _FIELD_TYPES[key]
    if isinstance(value, str) and kind in (bool, int, float):
        text = value.strip()
        return _BOOL_WORDS.get(text.lower(), text) if kind is bool else text
    return value


def _coerce_all(values: Mapping[str, Any]) -> dict[str, Any]:
    """One source's values converted to the keys' types (``msgspec.convert``, lax: the
    environment's text "2" is an int), or a ``ConfigError`` naming the key."""
    unknown = sorted(key for key in values if key not in _FIELD_TYPES)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; known: {sorted(_FIELD_TYPES)}")
    prepared = {key: _prepare(key, value) for key, value in values.items()}
    try:
        layer = msgspec.convert(prepared, ConfigLayer, strict=False)
    except msgspec.ValidationError as exc:
        key = str(exc).rpartition("`$.")[2].rstrip("`")
        if key not in prepared:
            raise ConfigError(str(exc)) from None
        kind = _FIELD_TYPES[key].__name__
        raise ConfigError(f"{key}: expected {kind}, got {values[key]!r}") from None
    return {
        key: value
        for key, value in msgspec.structs.asdict(layer).items()
        if value is not msgspec.UNSET
    }


def _build(merged: Mapping[str, Any]) -> DaemonConfig:
    """The defaults overlaid with ``merged``, validated (``DaemonConfig.validate``)."""
    try:
        return msgspec.convert(merged, DaemonConfig)
    except msgspec.ValidationError as exc:  # validate()'s ConfigError, as msgspec wraps it
        raise ConfigError(str(exc)) from None


def from_toml(path: Path) -> dict[str, Any]:
    """Keys of a TOML file: top level or under a ``[tokencaked]`` table."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    section = data.get("tokencaked", data)
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [tokencaked] must be a table")
    return _coerce_all(section)


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """``TOKENCAKE_ARENA_BYTES=2GiB`` and friends.

    The environment is shared with other tools (the scripts' ``TOKENCAKE_VENV``, a
    connector's settings), so a ``TOKENCAKE_`` name that is no config key is ignored with a
    warning that names it, rather than stopping the daemon. Bad values of real keys are
    errors.
    """
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "TOKENCAKE_CONFIG":
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key in _FIELD_TYPES:
            out[key] = value
        else:
            unknown.append(name)
    if unknown:
        logger.warning(
            "ignoring environment variables that are not tokencaked settings: %s",
            ", ".join(sorted(unknown)),
        )
    return _coerce_all(out)


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> DaemonConfig:
    """Default, then file, then environment, then flags; validated once at the end."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get("TOKENCAKE_CONFIG"):
        path = Path(environ["TOKENCAKE_CONFIG"])
    merged: dict[str, Any] = {}
    if path is not None:
        merged.update(from_toml(path))
    merged.update(from_env(environ))
    merged.update(_coerce_all({k: v for k, v in (flags or {}).items() if v is not None}))
    return _build(merged)
