"""The gateway's link to tokencaked: one thread, one blocking client, one ``AppSession`` per app.

The proxy's event loop never waits on the daemon except for an app's registration (its
first request is tagged only once the daemon knows the app). Events go through a FIFO to the
link's thread, so they reach the daemon in the order the gateway saw them, and a slow or
absent daemon costs the proxy nothing.

``AppSession`` (``clients/session.py``) does the registration and re-registers an app a
restarted daemon has forgotten. A daemon that does not answer marks the link down for
``retry_s``: meanwhile registrations fail at once (requests pass through untagged) and
events are counted as missed, not queued.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from tokencake import protocol as p
from tokencake.clients.client import DaemonUnavailable, TokenCakeClient
from tokencake.clients.session import AppSession

logger = logging.getLogger(__name__)

_STOP = object()


def _resolve(fut: concurrent.futures.Future[bool], ok: bool) -> None:
    if fut.set_running_or_notify_cancel():
        fut.set_result(ok)


class DaemonLink:
    def __init__(
        self,
        endpoint: str | None,
        *,
        timeout_s: float = 0.25,
        retry_s: float = 1.0,
        max_queue: int = 100_000,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.max_queue = max_queue
        self.sent = 0
        self.missed = 0
        self.rejected = 0
        self._down_until = 0.0
        self._sessions: dict[str, AppSession] = {}
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, name="tokencake-gateway-link", daemon=True
        )
        self._thread.start()

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    # ------------------------------------------------------------------ from the event loop

    def register(self, app_id: str, dag: p.AppDag) -> concurrent.futures.Future[bool]:
        """Declare an app; the future says whether the daemon now knows it."""
        fut: concurrent.futures.Future[bool] = concurrent.futures.Future()
        if self.down:
            _resolve(fut, False)
        else:
            self._q.put((self._register, (app_id, dag, fut)))
        return fut

    def event(self, app_id: str, op: str, *args: Any) -> None:
        """Send ``client.<op>(app_id, *args)`` for a registered app, in order, not waiting."""
        if self.down or self._q.qsize() >= self.max_queue:
            self.missed += 1
            return
        self._q.put((self._event, (app_id, op, args)))

    def end_app(self, app_id: str) -> None:
        self._q.put((self._end, (app_id,)))

    def close(self, timeout_s: float = 2.0) -> None:
        self._q.put(_STOP)
        self._thread.join(timeout_s)

    # ------------------------------------------------------------------ in the link's thread

    def _run(self) -> None:
        client = TokenCakeClient(self.endpoint, timeout_s=self.timeout_s)
        try:
            while True:
                item = self._q.get()
                if item is _STOP:
                    return
                fn, args = item
                try:
                    fn(client, *args)
                except Exception:
                    logger.exception("gateway link: %s failed", getattr(fn, "__name__", fn))
        finally:
            client.close()

    def _mark_down(self, why: object) -> None:
        if not self.down:
            logger.warning("tokencaked unavailable (%s); passing requests through", why)
        self._down_until = time.monotonic() + self.retry_s

    def _register(
        self,
        client: TokenCakeClient,
        app_id: str,
        dag: p.AppDag,
        fut: concurrent.futures.Future[bool],
    ) -> None:
        if self.down:
            _resolve(fut, False)
            return
        try:
            session = AppSession(client, app_id, dag)
        except p.RemoteError as exc:
            self.rejected += 1
            logger.warning("tokencaked refused app %s: %s", app_id, exc)
            _resolve(fut, False)
            return
        if session.missed_events:
            self._mark_down("no reply to register_app")
            _resolve(fut, False)
            return
        self.sent += 1
        self._sessions[app_id] = session
        _resolve(fut, True)

    def _event(self, client: TokenCakeClient, app_id: str, op: str, args: tuple[Any, ...]) -> None:
        session = self._sessions.get(app_id)
        if session is None:
            return  # never registered: its requests went through untagged
        if self.down:
            self.missed += 1
            return
        missed = session.missed_events
        fn: Callable[..., p.EventAck] = getattr(client, op)
        try:
            session._send(fn, app_id, *args)
        except p.RemoteError as exc:
            self.rejected += 1
            logger.debug("tokencaked refused %s for %s: %s", op, app_id, exc)
            return
        except DaemonUnavailable as exc:  # strict sessions only; ours are not
            self._mark_down(exc)
            self.missed += 1
            return
        if session.missed_events > missed:
            self.missed += 1
            self._mark_down(f"no reply to {op}")
        else:
            self.sent += 1

    def _end(self, client: TokenCakeClient, app_id: str) -> None:
        session = self._sessions.pop(app_id, None)
        if session is None or self.down:
            return
        try:
            session.end()
        except p.RemoteError as exc:
            logger.debug("app_end %s: %s", app_id, exc)
