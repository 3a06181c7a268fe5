"""An engine connector's link to tokencaked: registered or down, never blocking long.

The vLLM connector's scheduler side and the SGLang storage backend make every daemon call
through a ``DaemonLink``. A call that fails marks the link down (the ``on_down`` callbacks
release what the engine held for the daemon) and registration is retried every
``reconnect_s``; see ``docs/operations.md``, "The sidecar can die".

The link itself takes no lock: the vLLM scheduler calls it from one thread. Where several
threads share it (SGLang calls its storage backend from three), they hold ``lock`` around
each use, and around anything that must see the same registration (``epoch``) twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import msgspec
import zmq

from tokencake import protocol as p
from tokencake.clients.client import DaemonNotConnected, DaemonUnavailable, TokenCakeClient
from tokencake.layout import KvLayout

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=msgspec.Struct)

REGISTER_TIMEOUT_S = 0.25
"""The least time a registration may take (the daemon maps a layout, starts a lease)."""
REGISTER_BACKOFF_MAX_S = 30.0
"""A daemon that accepts connections but does not answer registrations is retried at
``reconnect_s``, doubling per failure up to this interval."""


class LinkSettings(Protocol):
    """What a link reads from its connector's settings."""

    endpoint: str
    """tokencaked's ZMQ endpoint; empty: ``$TOKENCAKE_ENDPOINT``, else the daemon default."""
    timeout_ms: float
    reconnect_s: float


class DaemonLink:
    """An engine's connection to tokencaked: registered or down, never blocking long.

    Every failed call is counted by cause in ``errors`` (an error code, or ``unavailable``
    for a daemon that did not answer). Whoever holds engine resources for the daemon
    registers an ``on_down`` callback: it runs the moment the link goes down. ``accept``,
    when set, sees each registration before the link comes up and may refuse it (the SGLang
    backend maps the daemon's arena there). ``layout`` may come later than the link (SGLang
    learns its page geometry from the host pool); until then the link stays down.
    """

    def __init__(
        self,
        cfg: LinkSettings,
        layout: KvLayout | None,
        name: str,
        num_gpu_blocks: int = 0,
        *,
        log: logging.Logger = logger,
        reregister_at_once: bool = False,
    ) -> None:
        self.cfg = cfg
        self.layout = layout
        self.name = name
        self.num_gpu_blocks = num_gpu_blocks
        self.log = log
        self.reregister_at_once = reregister_at_once
        """A daemon that forgot this engine (``unknown_engine``) is registered with again at
        the next call, not after ``reconnect_s``."""
        self.lock = threading.Lock()
        self.client: Any = None
        self.reg: p.RegisterEngineReply | None = None
        self.epoch = 0
        self.next_try = 0.0
        self.next_heartbeat = 0.0
        self.last_ok = 0.0
        """``time.monotonic()`` of the daemon's last reply."""
        self.last_error = ""
        self.errors: dict[str, int] = {}
        self.on_down: list[Callable[[], None]] = []
        self.accept: Callable[[p.RegisterEngineReply], bool] | None = None
        self._register_failures = 0
        self._refused = ""

    @property
    def up(self) -> bool:
        return self.reg is not None

    @property
    def engine_id(self) -> str:
        assert self.reg is not None
        return self.reg.engine_id

    def _count(self, cause: str) -> None:
        self.last_error = cause
        self.errors[cause] = self.errors.get(cause, 0) + 1

    def maybe_connect(self, now: float, *, wait: bool = False) -> bool:
        """Register if down and due; True when this call brought the link up.

        Without ``wait`` the attempt costs nothing unless the daemon has completed a ZMQ
        handshake (it is running and serving its socket); only then is one registration
        sent, waiting at most ``max(timeout_ms, REGISTER_TIMEOUT_S)``.
        """
        if self.up or self.layout is None or now < self.next_try:
            return False
        self.next_try = now + self.cfg.reconnect_s
        layout = self.layout
        reg = self._register(layout, now, wait=wait)
        if reg is None:
            return False
        if reg.slot_bytes < layout.bytes_per_block:
            self.log.error(
                "tokencaked slots hold %d B but a block needs %d B; TokenCake stays off",
                reg.slot_bytes,
                layout.bytes_per_block,
            )
            return False
        if self.accept is not None and not self.accept(reg):
            return False
        self.reg = reg
        self.epoch += 1
        self.last_ok = now
        self.next_heartbeat = now + reg.heartbeat_s
        self.log.info(
            "TokenCake: registered with tokencaked at %s as %s (arena %s, %d slots)",
            self.client.endpoint,
            reg.engine_id,
            reg.arena_name,
            reg.num_slots,
        )
        return True

    def _register(
        self, layout: KvLayout, now: float, *, wait: bool
    ) -> p.RegisterEngineReply | None:
        """Send one registration; None when it failed (counted, and backed off when the
        daemon is connected but does not answer)."""
        timeout_s = max(self.cfg.timeout_ms / 1000.0, REGISTER_TIMEOUT_S)
        try:
            if self.client is None:
                self.client = TokenCakeClient(
                    self.cfg.endpoint or None, timeout_s=self.cfg.timeout_ms / 1000.0
                )
            reg = self.client.call(
                p.RegisterEngine(self.name, layout, self.num_gpu_blocks),
                timeout_s=timeout_s,
                connect_timeout_s=timeout_s if wait else 0.0,
            )
        except DaemonNotConnected as exc:
            self.log.debug("tokencaked not reachable: %s", exc)  # free to try again
            return None
        except (DaemonUnavailable, zmq.ZMQError) as exc:
            # Connected but no reply: a stuck or overloaded daemon. Back off.
            self._register_failures += 1
            backoff = self.cfg.reconnect_s * 2.0 ** min(self._register_failures, 16)
            self.next_try = now + min(backoff, REGISTER_BACKOFF_MAX_S)
            self._count("unavailable")
            self.log.debug("tokencaked does not answer: %s", exc)
            return None
        except (p.RemoteError, OSError) as exc:
            self._count(getattr(exc, "code", "unavailable"))
            self._refusal(exc)
            return None
        self._register_failures = 0
        return reg

    def _refusal(self, exc: Exception) -> None:
        """A refusal (layout rejected, bad name) repeats on every retry: said once."""
        if str(exc) != self._refused:
            self.log.error("tokencaked refused this engine: %s; serving without it", exc)
            self._refused = str(exc)
        else:
            self.log.debug("tokencaked refused registration: %s", exc)

    def down(self, why: object, *, retry_now: bool = False) -> None:
        if self.reg is not None:
            self.log.warning("TokenCake: tokencaked link down (%s); serving without it", why)
            self.reg = None
            for callback in self.on_down:
                callback()
        self.next_try = 0.0 if retry_now else time.monotonic() + self.cfg.reconnect_s

    def call(self, req: p.Request[R]) -> R | None:
        """One request; None when the daemon is down, slow, or refuses it (``last_error``
        then says why)."""
        if self.reg is None:
            self.last_error = "unavailable"
            return None
        try:
            reply = self.client.call(req)
        except (DaemonUnavailable, zmq.ZMQError) as exc:
            self._count("unavailable")
            self.down(exc)
        except p.RemoteError as exc:
            self.last_ok = time.monotonic()  # it answered
            self._count(exc.code)
            if exc.code == p.ErrorCode.UNKNOWN_ENGINE:
                # The daemon restarted (or dropped an idle engine): register again.
                self.down(exc, retry_now=self.reregister_at_once)
            else:
                self.log.debug("tokencaked refused %s: %s", req.op, exc)
        else:
            self.last_ok = time.monotonic()
            self.last_error = ""
            return reply
        return None

    def check_alive(self, now: float, liveness_s: float) -> bool:
        """The daemon answered within ``liveness_s``, or answers a ping now."""
        if not self.up:
            return False
        if now - self.last_ok <= liveness_s:
            return True
        return self.call(p.Ping()) is not None

    def pushes(self) -> list[p.DecisionRecord]:
        if self.reg is None or self.client is None:
            return []
        out: list[p.DecisionRecord] = self.client.poll_pushes()
        if out:
            self.last_ok = time.monotonic()
        return out

    def close(self) -> None:
        if self.client is not None:
            if self.reg is not None:
                self.call(p.UnregisterEngine(self.engine_id))
            self.client.close()
            self.client = None
        self.reg = None
