"""The gateway's link to tokencaked: one ``AsyncTokenCakeClient`` on the proxy's event loop.

Events are queued and sent by one task, in the order the gateway saw them, so the daemon
sees an app's registration before its events and a tool call's start before its end. The
proxy never waits on the daemon except, where the engine's connector reports LLM calls, for
an app's registration before its first tagged request (``Gateway``).

An app the daemon answers ``unknown_app`` for (it restarted and forgot) is registered again
and the event resent, once: ``clients/session.py``'s rule for blocking clients, here for
the asyncio client (a blocking client in a thread would contend with the proxy for the GIL).
A daemon that does not answer marks the link down for ``retry_s``: meanwhile registrations
fail at once (requests pass through untagged) and events are counted as missed, not queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tokencake import protocol as p
from tokencake.clients.client import AsyncTokenCakeClient, DaemonUnavailable

logger = logging.getLogger(__name__)


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
        self._dags: dict[str, p.AppDag] = {}
        self._q: asyncio.Queue[tuple[Any, ...]] | None = None
        self._client: AsyncTokenCakeClient | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def start(self) -> None:
        """Connect (on the running loop); a malformed endpoint raises here, not later."""
        self._queue()

    def _queue(self) -> asyncio.Queue[tuple[Any, ...]]:
        if self._q is None:
            self._q = asyncio.Queue()
            self._client = AsyncTokenCakeClient(self.endpoint, timeout_s=self.timeout_s)
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self._q

    # ------------------------------------------------------------------ callers

    def register(self, app_id: str, dag: p.AppDag) -> asyncio.Future[bool]:
        """Declare an app; the future says whether the daemon now knows it."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        q = self._queue()
        if self.down or q.qsize() >= self.max_queue:
            fut.set_result(False)
        else:
            q.put_nowait(("register", app_id, dag, fut))
        return fut

    def event(self, req: p.Request) -> None:
        """Send an agent event of a registered app, in order, not waiting."""
        q = self._queue()
        if self.down or q.qsize() >= self.max_queue:
            self.missed += 1
            return
        q.put_nowait(("event", req))

    def end_app(self, app_id: str) -> None:
        self._queue().put_nowait(("end", app_id))

    async def close(self) -> None:
        """Send what is queued (bounded by the daemon timeout per item), then stop."""
        if self._task is not None and self._q is not None:
            # A stop item, not only a cancel: Python 3.11's wait_for (inside the client) can
            # swallow a cancellation that races a reply, and the task would wait forever.
            self._q.put_nowait(("stop",))
            await asyncio.wait({self._task}, timeout=self.timeout_s * 4 + 1.0)
            if not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1.0)
        if self._client is not None:
            await self._client.close()

    # ------------------------------------------------------------------ the sender task

    async def _run(self) -> None:
        assert self._q is not None and self._client is not None
        client = self._client
        while True:
            if self._q.empty():
                item = await self._q.get()
                # Woken by a request's event: one turn of the loop first, so that request goes
                # out before the daemon hears of it (on Python 3.11 aiohttp writes a request's
                # body in a task of its own, queued after this wake-up; a send to the daemon
                # costs the loop about 0.1 ms).
                await asyncio.sleep(0)
            else:
                item = self._q.get_nowait()
            if item[0] == "stop":
                return
            try:
                if item[0] == "register":
                    await self._register(client, item[1], item[2], item[3])
                elif item[0] == "event":
                    await self._event(client, item[1])
                else:
                    await self._end(client, item[1])
            except Exception:
                logger.exception("gateway link: %s failed", item[0])

    def _mark_down(self, why: object) -> None:
        if not self.down:
            logger.warning("tokencaked unavailable (%s); passing requests through", why)
        self._down_until = time.monotonic() + self.retry_s

    async def _register(
        self, client: AsyncTokenCakeClient, app_id: str, dag: p.AppDag, fut: asyncio.Future[bool]
    ) -> None:
        ok = False
        if not self.down:
            try:
                await client.call(p.RegisterApp(app_id, dag))
                self._dags[app_id] = dag
                self.sent += 1
                ok = True
            except DaemonUnavailable as exc:
                self._mark_down(exc)
            except p.RemoteError as exc:
                self.rejected += 1
                logger.warning("tokencaked refused app %s: %s", app_id, exc)
        if not fut.done():
            fut.set_result(ok)

    async def _event(self, client: AsyncTokenCakeClient, req: p.Request) -> None:
        app_id: str = getattr(req, "app_id", "")
        if app_id not in self._dags:
            return  # never registered: its requests went through untagged
        if self.down:
            self.missed += 1
            return
        try:
            try:
                await client.call(req)
            except p.RemoteError as exc:
                if exc.code != p.ErrorCode.UNKNOWN_APP:
                    raise
                await client.call(p.RegisterApp(app_id, self._dags[app_id]))
                await client.call(req)
            self.sent += 1
        except DaemonUnavailable as exc:
            self.missed += 1
            self._mark_down(exc)
        except p.RemoteError as exc:
            self.rejected += 1
            logger.debug("tokencaked refused %s for %s: %s", req.op, app_id, exc)

    async def _end(self, client: AsyncTokenCakeClient, app_id: str) -> None:
        if self._dags.pop(app_id, None) is None or self.down:
            return
        try:
            await client.call(p.AppEnd(app_id))
        except (DaemonUnavailable, p.RemoteError) as exc:
            logger.debug("app_end %s: %s", app_id, exc)
