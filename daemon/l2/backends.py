"""L2 stores behind one small interface, named by entry points and imported lazily.

A backend moves sealed values (see :mod:`.codec`) by key, many per call: Redis and Redis
Cluster through ``redis`` pipelines (Valkey speaks the same protocol and uses the same
backend), a local directory with one file per block. Backends are called from the tier's
worker threads only, never from the event loop; each keeps one client per thread.

Errors are typed: :class:`L2Unavailable` for a store that cannot be reached in time (the tier
then leaves it alone for a while), :class:`L2Full` for a value the store refused for lack of
room. A backend never returns a value it did not read whole: a Redis ``GET`` returns all of
a value or nothing, and the disk backend publishes a file by ``rename``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from tokencake.plugins import Registry

logger = logging.getLogger(__name__)


class L2Error(RuntimeError):
    """A failed L2 operation."""


class L2Unavailable(L2Error):
    """The store did not answer (down, unreachable, stalled past the timeout)."""


class L2Full(L2Error):
    """The store refused values for lack of room (Redis ``maxmemory`` with noeviction)."""


class L2Backend(ABC):
    """Stores sealed values by key. Implementations must be safe to call from several threads."""

    name: ClassVar[str] = ""

    @abstractmethod
    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]]) -> int:
        """Store every ``(key, value)``; returns how many were stored.

        Raises :class:`L2Unavailable` when the store cannot be reached. Values the store
        refuses for room are not stored and not counted; when none could be, :class:`L2Full`.
        """

    @abstractmethod
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The whole stored value of each key, or None. Raises :class:`L2Unavailable`."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""


# --------------------------------------------------------------------------- redis


class RedisBackend(L2Backend):
    """One Redis or Valkey server, addressed by URL (``redis://[:password@]host:port/db``)."""

    name = "redis"

    def __init__(self, url: str, *, timeout_s: float, ttl_s: float = 0.0) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._errors: tuple[type[Exception], ...] = (
            redis.ConnectionError,
            redis.TimeoutError,
            OSError,
        )
        self._response_error = redis.ResponseError
        self._full_error = redis.exceptions.OutOfMemoryError
        self._ttl_ms = int(ttl_s * 1000) or None
        # No retries: a stalled store must cost one timeout, and the tier decides what next.
        self._client: Any = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )

    def _pipeline(self) -> Any:
        return self._client.pipeline(transaction=False)

    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]]) -> int:
        if not items:
            return 0
        pipe = self._pipeline()
        for key, value in items:
            pipe.set(key, value, px=self._ttl_ms)
        results = self._execute(pipe)
        stored = 0
        full = 0
        for r in results:
            if isinstance(r, Exception):
                if isinstance(r, self._full_error):  # maxmemory reached under noeviction
                    full += 1
                    continue
                raise L2Unavailable(f"{self.name}: {r}")
            stored += 1
        if full and not stored:
            raise L2Full(f"{self.name}: store is full ({full} values refused)")
        return stored

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        pipe = self._pipeline()
        for key in keys:
            pipe.get(key)
        out: list[bytes | None] = []
        for r in self._execute(pipe):
            if isinstance(r, Exception):
                raise L2Unavailable(f"{self.name}: {r}")
            out.append(r if isinstance(r, bytes) else None)
        return out

    def _execute(self, pipe: Any) -> list[Any]:
        try:
            results: list[Any] = pipe.execute(raise_on_error=False)
        except self._errors as exc:
            raise L2Unavailable(f"{self.name}: {type(exc).__name__}: {exc}") from None
        except self._response_error as exc:
            raise L2Unavailable(f"{self.name}: {exc}") from None
        finally:
            pipe.reset()
        return results

    def close(self) -> None:
        self._client.close()


class RedisClusterBackend(RedisBackend):
    """A Redis (or Valkey) Cluster, found from one or more seed nodes.

    ``url`` is ``redis://host:port`` or a comma-separated list of them. The client learns
    the slot map from the seeds and splits each pipeline by node. It connects on first use,
    in a worker thread, so a cluster that is down at start does not stop the daemon.
    """

    name = "redis-cluster"

    def __init__(self, url: str, *, timeout_s: float, ttl_s: float = 0.0) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.cluster import ClusterNode, RedisCluster
        from redis.exceptions import ClusterDownError, RedisClusterException
        from redis.retry import Retry

        self._errors = (
            redis.ConnectionError,
            redis.TimeoutError,
            ClusterDownError,
            RedisClusterException,
            OSError,
        )
        self._response_error = redis.ResponseError
        self._full_error = redis.exceptions.OutOfMemoryError
        self._ttl_ms = int(ttl_s * 1000) or None
        seeds = [_host_port(part) for part in url.split(",") if part.strip()]
        self._lock = threading.Lock()
        self._client = None

        def connect() -> Any:
            return RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in seeds],
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),
                **_credentials(url),
            )

        self._connect = connect

    def _pipeline(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    self._client = self._connect()
                except self._errors as exc:
                    raise L2Unavailable(f"{self.name}: {type(exc).__name__}: {exc}") from None
            return self._client.pipeline()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip() if "://" in url else f"redis://{url.strip()}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    return parts.hostname, parts.port or 6379


def _credentials(url: str) -> dict[str, Any]:
    """A cluster's user, password and TLS, from its first seed (``rediss://`` is TLS).

    ``RedisCluster`` takes these as arguments, not from the seeds' URLs: left out, a
    ``rediss://`` cluster would be spoken to in plain text, and an ACL user would be lost.
    """
    from urllib.parse import unquote, urlsplit

    first = url.split(",")[0].strip()
    parts = urlsplit(first if "://" in first else f"redis://{first}")
    return {
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "ssl": parts.scheme == "rediss",
    }


# --------------------------------------------------------------------------- disk


class DiskBackend(L2Backend):
    """One file per block under a directory, for hosts without a store.

    A write goes to a temporary file that is renamed into place, so a reader sees the whole
    value or none (a crash mid-write leaves a ``.tmp`` file that is never read and is removed
    at the next start). ``capacity_bytes`` bounds the directory: the oldest files this
    process wrote or found at start are removed first. Several daemons may read one directory
    (one host, or a shared filesystem), but only one should write to it, since each keeps its
    own account of the space used.
    """

    name = "disk"

    def __init__(self, directory: str, *, capacity_bytes: int) -> None:
        self._dir = Path(directory)
        self._capacity = capacity_bytes
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._used = 0
        try:
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            found = []
            for sub in self._dir.iterdir():
                if not sub.is_dir():
                    continue
                for f in sub.iterdir():
                    if f.name.endswith(".tmp"):
                        f.unlink(missing_ok=True)
                        continue
                    st = f.stat()
                    found.append((st.st_mtime, f"{sub.name}/{f.name}", st.st_size))
        except OSError as exc:
            raise L2Unavailable(f"disk: cannot use {directory}: {exc}") from None
        for _, rel, size in sorted(found):
            self._sizes[rel] = size
            self._used += size

    def _rel(self, key: bytes) -> str:
        h = hashlib.blake2b(key, digest_size=20).hexdigest()
        return f"{h[:2]}/{h[2:]}"

    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]]) -> int:
        stored = 0
        for key, value in items:
            if len(value) > self._capacity:
                continue
            rel = self._rel(key)
            path = self._dir / rel
            tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
            try:
                path.parent.mkdir(exist_ok=True, mode=0o700)
                with open(tmp, "wb") as f:
                    f.write(value)
                os.replace(tmp, path)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise L2Unavailable(f"disk: {exc}") from None
            self._account(rel, len(value))
            stored += 1
        if items and not stored:
            raise L2Full(f"disk: values larger than capacity {self._capacity}")
        return stored

    def _account(self, rel: str, size: int) -> None:
        victims: list[str] = []
        with self._lock:
            self._used += size - self._sizes.pop(rel, 0)
            self._sizes[rel] = size
            while self._used > self._capacity and len(self._sizes) > 1:
                old, old_size = self._sizes.popitem(last=False)
                self._used -= old_size
                victims.append(old)
        for old in victims:
            with contextlib.suppress(OSError):
                (self._dir / old).unlink()

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            try:
                out.append((self._dir / self._rel(key)).read_bytes())
            except FileNotFoundError:
                out.append(None)
            except OSError as exc:
                raise L2Unavailable(f"disk: {exc}") from None
        return out

    @property
    def used_bytes(self) -> int:
        return self._used


# --------------------------------------------------------------------------- registry

REGISTRY = Registry("tokencake.l2_backends")
"""L2 backends by name: the ``tokencake.l2_backends`` entry points (redis, valkey,
redis-cluster, valkey-cluster and disk are built in)."""


def backend_names() -> list[str]:
    return REGISTRY.names()


def backend_class(name: str) -> type[L2Backend]:
    """Import the backend registered as ``name``."""
    try:
        cls = REGISTRY.load(name)
    except KeyError:
        raise KeyError(f"unknown L2 backend {name!r}; known: {backend_names()}") from None
    if not (isinstance(cls, type) and issubclass(cls, L2Backend)):
        raise TypeError(f"{REGISTRY.target(name)} is not an L2Backend")
    return cls
