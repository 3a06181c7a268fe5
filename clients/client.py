"""The client library: ``TokenCakeClient`` (blocking) and ``AsyncTokenCakeClient``; an engine
connector's registered link over the first, ``DaemonLink``; and an agent app's session,
``AppSession`` and its ``AgentSession``s, which report the app's events to the scheduler.

Both clients speak the protocol in ``tokencake.protocol`` over a ZMQ DEALER socket through one
method, ``call(request)``, whose result is typed as the request declares its reply::

    client.call(p.Lookup(engine_id, hashes)).slots      # a LookupReply

Failure is fast and typed:

- ``DaemonUnavailable`` when no daemon is connected (``IMMEDIATE``: nothing is queued for
  a daemon that is not there) or when a reply does not come within ``timeout_s``;
- ``RemoteError`` (with ``.code``) when the daemon answers with an error.

ZMQ reconnects in the background with exponential backoff (``RECONNECT_IVL`` ..
``RECONNECT_IVL_MAX``), so a client outlives daemon restarts. Decisions the daemon pushes to
a registered engine arrive on the same socket and are queued in ``pushes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec
import zmq
import zmq.asyncio

from tokencake import protocol as p
from tokencake.endpoint import default_endpoint
from tokencake.layout import KvLayout

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=msgspec.Struct)

DEFAULT_TIMEOUT_S = 2.0
RECONNECT_IVL_MS = 50
RECONNECT_IVL_MAX_MS = 2000


class DaemonUnavailable(ConnectionError):
    """No daemon answered (not running, not reachable, or too slow)."""

    def __init__(self, endpoint: str, why: str) -> None:
        super().__init__(f"tokencaked at {endpoint} unavailable: {why}")
        self.endpoint = endpoint


class DaemonNotConnected(DaemonUnavailable):
    """No connection to a daemon is up (none runs there, or it never completed ZMQ's
    handshake): nothing was sent."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint, "not connected")


def resolve_endpoint(endpoint: str | None) -> str:
    """Explicit endpoint, else ``$TOKENCAKE_ENDPOINT``, else the daemon's default socket."""
    return endpoint or os.environ.get("TOKENCAKE_ENDPOINT") or default_endpoint()


_push_decoder = msgspec.msgpack.Decoder(p.DecisionRecord)

SocketT = TypeVar("SocketT", bound=zmq.Socket[Any])


def configure_socket(
    sock: zmq.Socket[Any], server_public_key: bytes | None, client_key_file: str | None = None
) -> None:
    """The options every daemon client socket takes: no linger, queue only to a live peer,
    reconnect backoff, and CURVE when the daemon has a public key."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    if server_public_key is not None:
        from tokencake.curve import configure_curve_client

        configure_curve_client(
            sock, server_public_key, Path(client_key_file) if client_key_file else None
        )


class _Base:
    def __init__(
        self,
        endpoint: str | None,
        timeout_s: float,
        server_public_key: bytes | None,
        client_key_file: str | None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.endpoint = resolve_endpoint(endpoint)
        self.timeout_s = timeout_s
        self.pushes: deque[p.DecisionRecord] = deque(maxlen=100_000)
        self._ids = itertools.count(1)
        self._server_public_key = server_public_key
        self._client_key_file = client_key_file

    def _dealer(self, ctx: zmq.Context[SocketT]) -> SocketT:
        """A DEALER socket from ``ctx``, configured (CURVE when keyed) and connecting."""
        sock = ctx.socket(zmq.DEALER)
        configure_socket(sock, self._server_public_key, self._client_key_file)
        sock.connect(self.endpoint)
        return sock

    def _take_push(self, env: p.ReplyEnvelope) -> bool:
        """Queue a pushed decision; True when ``env`` was a push, not a reply."""
        if env.id != 0:
            return False
        if env.op == p.DECISION_PUSH_OP and env.ok:
            try:
                self.pushes.append(_push_decoder.decode(env.body))
            except msgspec.DecodeError as exc:
                logger.warning("undecodable decision push: %s", exc)
        return True


class TokenCakeClient(_Base):
    """Blocking client. Not thread-safe: use one per thread."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        server_public_key: bytes | None = None,
        client_key_file: str | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        super().__init__(endpoint, timeout_s, server_public_key, client_key_file)
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket[Any] | None = self._dealer(self._ctx)

    def reset(self) -> None:
        """Drop the socket (and any late replies) and connect afresh."""
        self.close()
        self._sock = self._dealer(self._ctx)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> TokenCakeClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def call(
        self,
        req: p.Request[R],
        *,
        timeout_s: float | None = None,
        connect_timeout_s: float | None = None,
    ) -> R:
        """Send one request and wait for its reply, typed as the request declares it
        (``call(p.Ping())`` is a ``PingReply``). Pushes that arrive meanwhile are queued.

        ``connect_timeout_s`` bounds the wait for a connection when none is up (default: the
        reply timeout); 0 fails at once, which makes a probe of a dead or stopped daemon free
        (ZMQ completes a connection only after the daemon's side of the handshake).
        """
        if self._sock is None:
            raise DaemonUnavailable(self.endpoint, "client closed")
        request_id = next(self._ids)
        timeout_ms = int((timeout_s or self.timeout_s) * 1000)
        connect_ms = timeout_ms if connect_timeout_s is None else int(connect_timeout_s * 1000)
        frame = p.encode_request(req, request_id)
        try:
            self._sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            # IMMEDIATE: nothing is queued until a connection is up; wait for one, briefly.
            start = _now_ms()
            if not self._sock.poll(min(connect_ms, timeout_ms), zmq.POLLOUT):
                raise DaemonNotConnected(self.endpoint) from None
            timeout_ms -= _now_ms() - start
            self._sock.send(frame, zmq.NOBLOCK)
        deadline_ms = timeout_ms
        while deadline_ms > 0:
            loop_start = _now_ms()
            if not self._sock.poll(deadline_ms, zmq.POLLIN):
                break
            env = p.decode_reply_envelope(self._sock.recv())
            if not self._take_push(env) and env.id == request_id:
                return p.decode_reply_body(env, req)
            deadline_ms -= _now_ms() - loop_start
        # The reply may still come; a fresh socket makes sure it is never taken for another.
        self.reset()
        raise DaemonUnavailable(self.endpoint, f"no reply to {req.op} within {timeout_ms} ms")

    def poll_pushes(self, timeout_s: float = 0.0) -> list[p.DecisionRecord]:
        """Read pushed decisions without sending anything; returns and clears the queue."""
        if self._sock is not None and self._sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            while True:
                try:
                    frame = self._sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._take_push(p.decode_reply_envelope(frame))
        out = list(self.pushes)
        self.pushes.clear()
        return out


class AsyncTokenCakeClient(_Base):
    """asyncio client: many requests may be in flight; replies are matched by id."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        server_public_key: bytes | None = None,
        client_key_file: str | None = None,
    ) -> None:
        super().__init__(endpoint, timeout_s, server_public_key, client_key_file)
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._dealer(self._ctx)
        self._pending: dict[int, asyncio.Future[p.ReplyEnvelope]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._sock.close(linger=0)

    async def __aenter__(self) -> AsyncTokenCakeClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _read_loop(self) -> None:
        while True:
            frame = await self._sock.recv()
            try:
                env = p.decode_reply_envelope(frame)
            except p.RemoteError as exc:
                logger.warning("dropping undecodable frame: %s", exc)
                continue
            if self._take_push(env):
                continue
            future = self._pending.pop(env.id, None)
            if future is not None and not future.done():
                future.set_result(env)

    async def call(self, req: p.Request[R], *, timeout_s: float | None = None) -> R:
        """As ``TokenCakeClient.call``: the reply typed as the request declares it."""
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        request_id = next(self._ids)
        future: asyncio.Future[p.ReplyEnvelope] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            frame = p.encode_request(req, request_id)
            try:
                await self._sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                wait_ms = int((timeout_s or self.timeout_s) * 1000)
                if not await self._sock.poll(wait_ms, zmq.POLLOUT):  # type: ignore[call-arg]
                    raise DaemonNotConnected(self.endpoint) from None
                await self._sock.send(frame, zmq.NOBLOCK)
            try:
                env = await asyncio.wait_for(future, timeout_s or self.timeout_s)
            except TimeoutError:
                raise DaemonUnavailable(self.endpoint, f"no reply to {req.op} in time") from None
        finally:
            self._pending.pop(request_id, None)
        return p.decode_reply_body(env, req)


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


# An engine connector's link: registered or down, never blocking long.

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
    """An engine connector's connection to tokencaked (the vLLM connector's scheduler side,
    the SGLang storage backend make every daemon call through one): registered or down.

    Every failed call is counted by cause in ``errors`` (an error code, or ``unavailable``
    for a daemon that did not answer) and marks the link down; registration is retried every
    ``reconnect_s`` (``docs/operations.md``, "The sidecar can die"). Whoever holds engine
    resources for the daemon registers an ``on_down`` callback: it runs the moment the link
    goes down. ``accept``, when set, sees each registration before the link comes up and may
    refuse it (the SGLang backend maps the daemon's arena there). ``layout`` may come later
    than the link (SGLang learns its page geometry from the host pool); until then the link
    stays down. The link takes no lock: the vLLM scheduler calls it from one thread. Where
    several threads share it (SGLang calls its storage backend from three), they hold
    ``lock`` around each use, and around anything that must see one registration twice.
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


# An agent app's session: its agents, LLM calls and tool calls, reported in a few lines.


@dataclass(slots=True)
class LlmCallHandle:
    """Filled in by the caller inside ``llm_call`` and reported when the block exits."""

    output_tokens: int = 0
    kv_blocks: int = 0


class AppSession:
    """One app's DAG, declared at construction; ``agent`` gives each node's session, whose
    ``llm_call`` and ``tool_call`` blocks report their start and end (``docs/vllm.md``).

    Events are hints to the scheduler, so a daemon that is down must not break the agent app:
    ``DaemonUnavailable`` is logged and counted (``missed_events``), never raised, unless the
    session is ``strict``. A daemon that restarted has forgotten the app: the session
    declares its DAG again and resends the event. Other error replies (an unknown agent, a
    bad DAG) are raised: they are bugs in the caller.
    """

    def __init__(
        self,
        client: TokenCakeClient,
        app_id: str,
        dag: p.AppDag,
        *,
        tenant: str = "",
        strict: bool = False,
    ) -> None:
        self.client = client
        self.app_id = app_id
        self.dag = dag
        self.tenant = tenant
        self.strict = strict
        self.missed_events = 0
        self.reregistrations = 0
        self._send(p.RegisterApp(app_id, dag, tenant))

    def agent(self, agent_id: str, engine_id: str = "") -> AgentSession:
        if all(node.id != agent_id for node in self.dag.nodes):
            raise KeyError(f"agent {agent_id!r} is not a node of app {self.app_id!r}")
        return AgentSession(self, agent_id, engine_id)

    def end(self) -> None:
        self._send(p.AppEnd(self.app_id))

    def __enter__(self) -> AppSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.end()

    def _send(self, req: p.Request[p.EventAck]) -> bool:
        try:
            try:
                return self.client.call(req).accepted
            except p.RemoteError as exc:
                if exc.code != p.ErrorCode.UNKNOWN_APP or isinstance(req, p.RegisterApp):
                    raise
                self.client.call(p.RegisterApp(self.app_id, self.dag, self.tenant))
                self.reregistrations += 1
                return self.client.call(req).accepted
        except DaemonUnavailable as exc:
            self.missed_events += 1
            if self.strict:
                raise
            logger.debug("event not delivered: %s", exc)
            return False


class AgentSession:
    _call_ids = itertools.count(1)

    def __init__(self, app: AppSession, agent_id: str, engine_id: str = "") -> None:
        self.app = app
        self.agent_id = agent_id
        self.engine_id = engine_id

    @contextmanager
    def llm_call(self, prompt_tokens: int = 0, request_id: str = "") -> Iterator[LlmCallHandle]:
        app, agent, handle = self.app, self.agent_id, LlmCallHandle()
        app._send(p.LlmCallStart(app.app_id, agent, self.engine_id, request_id, prompt_tokens))
        try:
            yield handle
        finally:
            finish = p.LlmCallFinish(
                app.app_id, agent, request_id, handle.output_tokens, handle.kv_blocks
            )
            app._send(finish)

    @contextmanager
    def tool_call(self, kind: str, predicted_s: float | None = None) -> Iterator[str]:
        """Reports the tool's start and end; ``ok`` is False when the block raised."""
        call_id = f"{self.agent_id}-{next(self._call_ids)}"
        self.app._send(p.ToolCallStart(self.app.app_id, self.agent_id, kind, predicted_s, call_id))
        ok = False
        try:
            yield call_id
            ok = True
        finally:
            self.app._send(p.ToolCallEnd(self.app.app_id, self.agent_id, call_id, ok))
