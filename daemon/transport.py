"""tokencaked's wire side: the ZMQ ROUTER socket, its frames, and the handler table.

A request is one frame after the peer's identity. It is decoded and validated by the
protocol, then handed to the handler its request type is bound to; the reply (or a typed
error) goes back to the same identity. Handlers either succeed or raise ``ProtocolError``
before changing anything, so a bad request leaves the daemon as it was. A one-way request
(``"ack": false``) is handled the same, and counted the same when it fails; only its
success reply is not sent.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import zmq

from tokencake import protocol as p
from tokencake.daemon.config import DaemonConfig
from tokencake.protocol import ErrorCode, ProtocolError

logger = logging.getLogger(__name__)


def hard_frame_cap(max_frame_bytes: int) -> int:
    """libzmq's ``MAXMSGSIZE``, well above the soft limit: a peer past it is cut off with no
    reply; a frame between the two gets a typed ``frame_too_large`` reply."""
    return max(max_frame_bytes * 4, 16 << 20)


Handler = Callable[[bytes, Any], msgspec.Struct]
"""``(peer identity, request) -> reply``; the identity is what pushes are addressed to."""

MAX_BATCH = 512
"""Requests already queued that are served before timers are looked at again."""


class DaemonError(RuntimeError):
    """The daemon cannot start (socket in use, no shared memory, bad config)."""


class Deferred(msgspec.Struct):
    """What a handler returns when it took a :class:`PendingReply` and answers later."""


DEFERRED = Deferred()


class PendingReply:
    """A reply a handler gives later (``Dispatcher.defer``): ``send`` or ``fail``, once."""

    __slots__ = ("_ack", "_dispatcher", "_identity", "_op", "_request_id", "done")

    def __init__(
        self, dispatcher: Dispatcher, identity: bytes, op: str, request_id: int, ack: bool = True
    ) -> None:
        self._dispatcher = dispatcher
        self._identity = identity
        self._op = op
        self._request_id = request_id
        self._ack = ack
        self.done = False

    def send(self, reply: msgspec.Struct) -> None:
        if not self.done:
            self.done = True
            if self._ack:  # else one-way: success is silent
                self._dispatcher.send_later(
                    self._identity, p.encode_reply(self._op, self._request_id, reply)
                )

    def fail(self, exc: ProtocolError) -> None:
        if not self.done:
            self.done = True
            self._dispatcher.count_error(exc.code)
            frame = p.encode_error(self._op[:64], self._request_id, exc.code, exc.message)
            self._dispatcher.send_later(self._identity, frame)


class Dispatcher:
    """Frames in, frames out: decode, count, call the request type's handler, encode."""

    def __init__(
        self,
        handlers: Mapping[type[p.Request], Handler],
        *,
        max_frame_bytes: Callable[[], int],
        event_counts: dict[str, int],
        error_counts: dict[str, int],
    ) -> None:
        missing = sorted(op for op, cls in p.REQUEST_TYPES.items() if cls not in handlers)
        if missing:
            raise TypeError(f"ops without handlers: {missing}")
        self._handlers = dict(handlers)
        self._max_frame_bytes = max_frame_bytes
        self.event_counts = event_counts
        self.error_counts = error_counts
        self.send_later: Callable[[bytes, bytes], object] = lambda _identity, _frame: False
        """Where deferred replies go (the daemon sets ``Transport.send``)."""
        self._current: tuple[bytes, str, int, bool] = (b"", "?", 0, True)

    def handle_frames(self, frames: list[bytes]) -> bytes:
        """One ROUTER message (identity, payload) in, the reply frame out."""
        if len(frames) != 2:
            # A DEALER sends [payload]; the ROUTER prepends the identity.
            self.count_error(ErrorCode.BAD_FRAME)
            return p.encode_error(
                "?", 0, ErrorCode.BAD_FRAME, f"expected one frame, got {len(frames) - 1}"
            )
        return self.handle_frame(frames[0], frames[1])

    def handle_frame(self, identity: bytes, frame: bytes) -> bytes:
        """One request frame in, one reply frame out (empty: none to send, for a deferred
        reply or a one-way request that succeeded). Never raises."""
        op = "?"
        request_id = 0
        try:
            request_id, op, body, ack = self._decode(frame)
            self.event_counts[op] = self.event_counts.get(op, 0) + 1
            self._current = (identity, op, request_id, ack)
            reply = self._handlers[type(body)](identity, body)
            if reply is DEFERRED or not ack:
                return b""  # the handler holds a PendingReply, or success is silent
            return p.encode_reply(op, request_id, reply)
        except ProtocolError as exc:
            request_id = getattr(exc, "request_id", request_id)
            op = getattr(exc, "op", op)
            self.count_error(exc.code)
            return p.encode_error(op[:64], request_id, exc.code, exc.message)
        except Exception as exc:  # a bug must cost one request, never the daemon
            logger.exception("internal error handling %s", op)
            self.count_error(ErrorCode.INTERNAL)
            return p.encode_error(op[:64], request_id, ErrorCode.INTERNAL, type(exc).__name__)

    def defer(self) -> PendingReply:
        """From inside a handler: the reply to the request being handled, to send later;
        the handler then returns ``DEFERRED``."""
        identity, op, request_id, ack = self._current
        return PendingReply(self, identity, op, request_id, ack)

    def _decode(self, frame: bytes) -> tuple[int, str, p.Request, bool]:
        limit = self._max_frame_bytes()
        if len(frame) > limit:
            request_id, op = _peek_ids(frame)
            raise _named(
                ProtocolError(
                    ErrorCode.FRAME_TOO_LARGE, f"{len(frame)} bytes over the {limit}-byte limit"
                ),
                request_id,
                op,
            )
        try:
            return p.decode_request_ack(frame)
        except UnicodeDecodeError as exc:
            # msgspec raises this, not DecodeError, for a str that is not UTF-8.
            request_id, op = _peek_ids(frame)
            code = ErrorCode.BAD_FRAME if op == "?" else ErrorCode.BAD_REQUEST
            raise _named(
                ProtocolError(code, f"invalid UTF-8: {exc.reason}"), request_id, op
            ) from None

    def count_error(self, code: str) -> None:
        self.error_counts[code] = self.error_counts.get(code, 0) + 1


class Transport:
    """The ROUTER socket: bind (with CURVE on TCP), receive in batches, send without blocking."""

    def __init__(self) -> None:
        self.sock: zmq.Socket[Any] | None = None
        self._ctx: zmq.Context[Any] | None = None
        self._auth: Any = None  # the ZAP handler (a ThreadAuthenticator) of a TCP endpoint
        self._socket_path: Path | None = None
        self._timeout_ms = -2

    def bind(self, cfg: DaemonConfig) -> None:
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, hard_frame_cap(cfg.max_frame_bytes))
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.RCVHWM, 10000)
        try:
            if cfg.endpoint.startswith("tcp://"):
                from tokencake.daemon.auth import configure_curve_server, start_authenticator

                configure_curve_server(sock, Path(cfg.curve_secret_key_file))
                self._auth = start_authenticator(self._ctx, Path(cfg.curve_authorized_keys_dir))
            _bind_socket(sock, cfg)
        except BaseException:
            sock.close(linger=0)  # else the context's term() would wait on it forever
            raise
        self.sock = sock
        self._socket_path = cfg.socket_path

    def serve_once(self, timeout_ms: int, handle: Callable[[list[bytes]], bytes]) -> None:
        """Wait up to ``timeout_ms`` for a request, then serve it and whatever is queued.

        The loop blocks in ``recv`` on the ROUTER socket itself: a zmq poller costs a
        measurable share of a round trip.
        """
        sock = self.sock
        assert sock is not None
        if timeout_ms != self._timeout_ms:
            sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
            self._timeout_ms = timeout_ms
        try:
            frames = sock.recv_multipart()
        except zmq.Again:
            return
        self._answer(frames, handle)
        for _ in range(MAX_BATCH):
            events = sock.get(zmq.EVENTS)
            if not (isinstance(events, int) and events & zmq.POLLIN):
                break
            self._answer(sock.recv_multipart(zmq.NOBLOCK), handle)

    def _answer(self, frames: list[bytes], handle: Callable[[list[bytes]], bytes]) -> None:
        reply = handle(frames)
        if reply:  # empty: deferred, the handler answers later (``PendingReply``)
            self.send(frames[0], reply)

    def send(self, identity: bytes, frame: bytes) -> bool:
        if self.sock is None:  # not serving (in-process use by tests and tools)
            return False
        try:
            self.sock.send_multipart([identity, frame], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the peer left; EAGAIN: it does not read. Neither may block us.
            logger.debug("reply to %r dropped: %s", identity, exc)
            return False

    def close(self) -> None:
        """Idempotent: socket closed and its file removed, authenticator and context ended."""
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
            if self._socket_path is not None:
                self._socket_path.unlink(missing_ok=True)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None


def _bind_socket(sock: zmq.Socket[Any], cfg: DaemonConfig) -> None:
    path = cfg.socket_path
    if path is None:
        sock.bind(cfg.endpoint)
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        if socket_in_use(path):
            raise DaemonError(f"another daemon is serving {path}")
        path.unlink()
    old_umask = os.umask(0o177)
    try:
        sock.bind(cfg.endpoint)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)


def socket_in_use(path: Path) -> bool:
    """True when a live process accepts connections on the ipc socket file."""
    if not stat.S_ISSOCK(path.stat().st_mode):
        raise DaemonError(f"{path} exists and is not a socket; refusing to remove it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _peek_ids(frame: bytes) -> tuple[int, str]:
    try:
        env = msgspec.msgpack.decode(frame, type=p.Envelope)
        return env.id, env.op
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return 0, "?"


def _named(exc: ProtocolError, request_id: int, op: str) -> ProtocolError:
    """Attach the request's id and op, for the error reply, as ``decode_request`` does."""
    exc.request_id = request_id  # type: ignore[attr-defined]
    exc.op = op  # type: ignore[attr-defined]
    return exc
