"""The gateway's link to tokencaked: agent events pipelined on one socket, never awaited.

Events and app registrations are sent in the order the gateway saw them, on one ZMQ DEALER
socket, and the daemon handles one peer's messages in order: it sees an app's registration
before its events and a tool call's start before its end without the gateway waiting for a
single reply. Events and app ends are sent one-way (``"ack": false``, ``docs/protocol.md``):
the daemon answers them only when they fail, so an event costs one wake-up of the daemon and
none of the gateway. Because the daemon handles a peer's messages in order, any later reply
confirms every one-way message before it; where no registration follows within
``confirm_s`` of a one-way message, the link sends a ``ping`` to have one (so at most one
ping per ``confirm_s``, 1 s, however many events flow). Replies are read as they come, off
every request's path, and only counted (``sent``, ``rejected``) or acted on:

- a registration's reply resolves the future ``register`` returned (the proxy waits on it
  only where the engine's connector reports LLM calls; see ``Gateway._registered``);
- an event is ``sent`` when a later reply confirms it, ``rejected`` when its error reply
  comes;
- an event the daemon answers ``unknown_app`` for (it restarted and forgot the app) makes the
  link register the app again and resend the event, once (``clients/client.py``'s rule for
  blocking clients);
- a reply that does not come within ``timeout_s`` counts its message and the one-way ones
  before it as ``missed`` (a registration: failed) and marks the link down for ``retry_s``;
  so does a daemon that is not connected within ``timeout_s`` (what is queued meanwhile
  waits, in order). A one-way event is thus settled within ``confirm_s + timeout_s``. While
  down, registrations fail at once (requests pass through untagged) and events are counted
  as missed, not sent; so are one-way events no answered message followed.

Losing an event is harmless to the requests: they are forwarded the same either way; the
daemon's policy then decides on less. What is queued is sent in one go, one loop turn after
the request that queued it has been handed to the engine (``_schedule``), so the send never
delays a request. The socket is a plain (blocking-API) ZMQ socket used with ``NOBLOCK`` on
the loop, its replies read from a loop reader: an order of magnitude less CPU per message
than ``zmq.asyncio``'s futures (``docs/benchmarks.md``, Gateway).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Final, cast

import zmq

from tokencake import protocol as p
from tokencake.clients.client import configure_socket, resolve_endpoint

logger = logging.getLogger(__name__)

REGISTER: Final = "register"
EVENT: Final = "event"
END: Final = "end"
REREGISTER: Final = "reregister"
PROBE: Final = "probe"
ACKED: Final = frozenset({REGISTER, REREGISTER, PROBE})
"""What is sent with a reply; the rest (events, app ends) one-way."""
CONNECT_POLL_S: Final = 0.005
CONFIRM_S: Final = 1.0
"""At most this long after a one-way message, an acknowledged one follows it (a ``ping``)."""
"""How often queued messages are retried while no daemon is connected (up to the timeout)."""


@dataclass(slots=True)
class _Item:
    kind: str
    app_id: str
    req: p.Request[Any]
    fut: asyncio.Future[bool] | None = None
    retried: bool = False
    sent_at: float = 0.0


class DaemonLink:
    def __init__(
        self,
        endpoint: str | None,
        *,
        timeout_s: float = 0.25,
        retry_s: float = 1.0,
        max_inflight: int = 100_000,
        confirm_s: float = CONFIRM_S,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.confirm_s = confirm_s
        self.retry_s = retry_s
        self.max_inflight = max_inflight
        self.sent = 0
        """Events and registrations the daemon acknowledged."""
        self.missed = 0
        """Events not delivered: the daemon down, not answering in time, or the link full."""
        self.rejected = 0
        """Events and registrations the daemon refused (an error reply)."""
        self._down_until = 0.0
        self._dags: dict[str, p.AppDag] = {}
        """Apps the daemon acknowledged, for registering again after it restarts."""
        self._registering: set[str] = set()
        self._ended_early: set[str] = set()
        """Apps ended while their registration was unanswered: its reply adds no DAG."""
        self._out: list[_Item] = []
        self._pending: dict[int, _Item] = {}
        """Sent and not yet answered or confirmed, in the order sent (the order the daemon
        answers)."""
        self._oneway: collections.deque[int] = collections.deque()
        """Ids of one-way messages sent and not yet confirmed, oldest first."""
        self._acked: collections.deque[int] = collections.deque()
        """Ids of acknowledged messages sent, oldest first (some answered since)."""
        self._uncovered_at = 0.0
        """When the oldest one-way message no reply-bearing one has followed was sent."""
        self._probe_timer: asyncio.TimerHandle | None = None
        self._ids = itertools.count(1)
        self._sock: zmq.Socket[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flushing = False
        self._blocked_since = 0.0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    @property
    def inflight(self) -> int:
        return len(self._pending) + len(self._out)

    def counts(self) -> dict[str, int]:
        return {"sent": self.sent, "missed": self.missed, "rejected": self.rejected}

    def start(self) -> None:
        """Connect (on the running loop); a malformed endpoint raises here, not later."""
        self._socket()

    def _socket(self) -> zmq.Socket[Any]:
        if self._sock is None:
            sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
            configure_socket(sock, None)
            sock.setsockopt(zmq.SNDHWM, self.max_inflight)
            sock.setsockopt(zmq.RCVHWM, self.max_inflight)
            try:
                sock.connect(resolve_endpoint(self.endpoint))
            except zmq.ZMQError:
                sock.close(linger=0)
                raise
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(sock.fileno(), self._drain)
            self._sock = sock
        return self._sock

    # ------------------------------------------------------------------ callers

    def register(self, app_id: str, dag: p.AppDag) -> asyncio.Future[bool]:
        """Declare an app; the future says whether the daemon now knows it."""
        self._socket()
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self.down or self.inflight >= self.max_inflight:
            fut.set_result(False)
        else:
            self._registering.add(app_id)
            self._queue(_Item(REGISTER, app_id, p.RegisterApp(app_id, dag), fut))
        return fut

    def event(self, req: p.Request[Any]) -> None:
        """Send an agent event of a registered app, in order, not waiting."""
        self._socket()
        if self.down or self.inflight >= self.max_inflight:
            self.missed += 1
            return
        self._queue(_Item(EVENT, getattr(req, "app_id", ""), req))

    def end_app(self, app_id: str) -> None:
        """End an app the daemon knows or is about to: one whose registration is still
        unanswered is ended too, the end queued behind it (the daemon takes a peer's
        messages in order), so an app ended that early does not stay live there."""
        self._socket()
        known = self._dags.pop(app_id, None) is not None
        if app_id in self._registering:
            self._registering.discard(app_id)
            self._ended_early.add(app_id)
            known = True
        if known and not self.down:
            self._queue(_Item(END, app_id, p.AppEnd(app_id)))

    async def close(self) -> None:
        """Send what is queued and wait for its replies (at most ``timeout_s``), then stop."""
        if self._sock is None:
            return
        if self._uncovered_at:
            self._out.append(_Item(PROBE, "", p.Ping()))  # confirms what was sent one-way
        self._flush()
        deadline = time.monotonic() + self.timeout_s
        while (self._pending or self._out) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
            self._drain()
        self._lose_queued()
        for timer in (self._timer, self._probe_timer):
            if timer is not None:
                timer.cancel()
        assert self._loop is not None
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close(linger=0)
        self._sock = None
        for item in self._pending.values():
            self._lost(item)
        self._pending.clear()
        self._oneway.clear()
        self._acked.clear()

    # ------------------------------------------------------------------ sending

    def _queue(self, item: _Item) -> None:
        self._out.append(item)
        if not self._flushing:
            self._flushing = True
            assert self._loop is not None
            self._loop.call_soon(self._schedule)

    def _schedule(self) -> None:
        """One more loop turn before sending: a request whose tracking queued events is then
        on its way to the engine (on Python 3.11 aiohttp writes a request's body in a task of
        its own, queued after the first turn)."""
        assert self._loop is not None
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        sock = self._sock
        if sock is None:
            return
        now = time.monotonic()
        done = 0
        for item in self._out:
            known = item.app_id in self._dags or item.app_id in self._registering
            if item.kind != EVENT or known:  # else never registered: went through untagged
                request_id = next(self._ids)
                ack = item.kind in ACKED
                try:
                    sock.send(p.encode_request(item.req, request_id, ack=ack), zmq.NOBLOCK)
                except zmq.Again:
                    break  # no daemon connected (yet): IMMEDIATE queues nothing for it
                except zmq.ZMQError as exc:
                    self._mark_down(exc)
                    self._lose_queued()
                    return
                item.sent_at = now
                self._pending[request_id] = item
                if ack:
                    self._acked.append(request_id)
                    self._uncovered_at = 0.0  # its reply confirms all sent before it
                else:
                    self._oneway.append(request_id)
                    self._uncovered_at = self._uncovered_at or now
            done += 1
        del self._out[:done]
        if self._out:
            self._wait_for_connection(now)
        else:
            self._blocked_since = 0.0
        self._drain()  # a send may have taken the socket's edge: read what came meanwhile
        self._arm()
        if self._uncovered_at and self._probe_timer is None:
            self._probe_timer = self._loop_().call_later(self.confirm_s, self._probe)

    def _loop_(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def _probe(self) -> None:
        """Have a reply follow the one-way messages sent: a ``ping``, unless something
        acknowledged was sent after them meanwhile."""
        self._probe_timer = None
        if not self._uncovered_at or self._sock is None:
            return
        if self.down:
            self._lose_uncovered()
            return
        wait = self._uncovered_at + self.confirm_s - time.monotonic()
        if wait > 0.001:  # covered since, and a newer one-way message is not due yet
            self._probe_timer = self._loop_().call_later(wait, self._probe)
            return
        self._uncovered_at = 0.0  # the ping covers them (reset again if it is not sent)
        self._queue(_Item(PROBE, "", p.Ping()))

    def _wait_for_connection(self, now: float) -> None:
        """Try again shortly, for at most ``timeout_s``; then the daemon is down."""
        if not self._blocked_since:
            self._blocked_since = now
        if now - self._blocked_since >= self.timeout_s:
            self._mark_down("not connected")
            self._lose_queued()
        elif not self._flushing:
            self._flushing = True
            assert self._loop is not None
            self._loop.call_later(CONNECT_POLL_S, self._flush)

    def _lose_queued(self) -> None:
        for item in self._out:
            self._lost(item)
        self._out.clear()
        self._blocked_since = 0.0
        self._lose_uncovered()

    def _lose_uncovered(self) -> None:
        """One-way messages no acknowledged one in flight follows: the link is down, so
        nothing will confirm them."""
        last = 0
        for request_id in reversed(self._acked):
            if request_id in self._pending:
                last = request_id
                break
        while self._oneway and self._oneway[-1] > last:
            item = self._pending.pop(self._oneway.pop(), None)
            if item is not None:
                self._lost(item)
        self._uncovered_at = 0.0

    def _lost(self, item: _Item) -> None:
        """An item that will get no reply."""
        if item.kind == EVENT:
            self.missed += 1
        elif item.kind in (REGISTER, REREGISTER):
            self._registering.discard(item.app_id)
            self._ended_early.discard(item.app_id)
        if item.fut is not None and not item.fut.done():
            item.fut.set_result(False)

    def _mark_down(self, why: object) -> None:
        if not self.down:
            logger.warning("tokencaked unavailable (%s); passing requests through", why)
        self._down_until = time.monotonic() + self.retry_s

    # ------------------------------------------------------------------ replies

    def _drain(self) -> None:
        sock = self._sock
        if sock is None:
            return
        # EVENTS, not recv until zmq.Again: raising that cost more than reading a reply.
        while cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            frame = sock.recv(zmq.NOBLOCK)
            try:
                env = p.decode_reply_envelope(frame)
            except p.RemoteError as exc:
                logger.warning("gateway link: dropping an undecodable reply: %s", exc)
                continue
            item = self._pending.pop(env.id, None)
            if item is not None:  # else a push (id 0) or a reply that came too late
                self._reply(item, env)
                self._confirm(env.id)

    def _confirm(self, request_id: int) -> None:
        """A reply to ``request_id``: the daemon has handled every message sent before it,
        so one-way ones that got no error reply succeeded."""
        oneway = self._oneway
        while oneway and oneway[0] < request_id:
            item = self._pending.pop(oneway.popleft(), None)
            if item is not None:  # else its error reply came, or it expired
                self.sent += item.kind == EVENT
        acked = self._acked
        while acked and acked[0] not in self._pending:
            acked.popleft()  # answered

    def _reply(self, item: _Item, env: p.ReplyEnvelope) -> None:
        code = "" if env.ok else (env.error.code if env.error else p.ErrorCode.INTERNAL)
        if item.kind in (REGISTER, REREGISTER):
            self._registering.discard(item.app_id)
            if item.app_id in self._ended_early:
                self._ended_early.discard(item.app_id)
            elif not code:
                assert isinstance(item.req, p.RegisterApp)
                self._dags[item.app_id] = item.req.dag
        if item.fut is not None and not item.fut.done():
            item.fut.set_result(not code)
        if not code:
            self.sent += item.kind in (REGISTER, EVENT)
        elif item.kind == EVENT and code == p.ErrorCode.UNKNOWN_APP:
            self._resend(item)
        elif item.kind in (END, PROBE):
            logger.debug("%s %s: %s", item.req.op, item.app_id, code)
        elif item.kind != EVENT:
            self.rejected += 1
            logger.warning("tokencaked refused app %s: %s", item.app_id, code)
        else:
            self.rejected += 1
            logger.debug("tokencaked refused %s for %s: %s", item.req.op, item.app_id, code)

    def _resend(self, item: _Item) -> None:
        """The daemon forgot the app (it restarted): register it again, then the event."""
        dag = self._dags.get(item.app_id)
        if dag is None:
            return  # its registration failed: the event's requests went through untagged
        if item.retried:
            self.rejected += 1
            return
        if item.app_id not in self._registering:
            self._registering.add(item.app_id)
            self._queue(_Item(REREGISTER, item.app_id, p.RegisterApp(item.app_id, dag)))
        self._queue(_Item(EVENT, item.app_id, item.req, retried=True))

    # ------------------------------------------------------------------ timeouts

    def _arm(self) -> None:
        if self._acked and self._timer is None:
            self._timer = self._loop_().call_later(self.timeout_s, self._expire)

    def _expire(self) -> None:
        """Replies overdue by ``timeout_s``: their messages and the one-way ones before them
        are lost, and the link is down."""
        self._timer = None
        self._drain()  # what has come but not been read
        deadline = time.monotonic() - self.timeout_s
        overdue = 0
        acked, oneway = self._acked, self._oneway
        while acked:
            item = self._pending.get(acked[0])
            if item is not None and item.sent_at > deadline:
                break
            request_id = acked.popleft()
            if item is None:
                continue  # answered
            del self._pending[request_id]
            self._lost(item)
            overdue += 1
            while oneway and oneway[0] < request_id:
                lost = self._pending.pop(oneway.popleft(), None)
                if lost is not None:
                    self._lost(lost)
        if overdue:
            self._mark_down(f"{overdue} replies overdue by {self.timeout_s} s")
            self._lose_uncovered()
        if acked:
            first = self._pending[acked[0]].sent_at
            wait = max(first + self.timeout_s - time.monotonic(), 0.001)
            self._timer = self._loop_().call_later(wait, self._expire)
