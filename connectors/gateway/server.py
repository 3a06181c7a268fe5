"""The gateway's HTTP side: an aiohttp reverse proxy in front of one or more OpenAI servers.

- ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/responses``: tracked (see
  ``tracker``), tagged when the daemon knows the app, forwarded, the response (streamed or
  not) relayed byte for byte while an ``Observer`` reads it.
- ``GET /v1/models``: the union of the upstreams' lists (one upstream: passed through).
- ``/tokencake/metrics`` and ``/tokencake/conversations``: the gateway's own.
- Everything else is passed through to the first upstream.

A model served by several upstreams is routed by conversation (a stable hash), so a
conversation keeps meeting the engine that holds its KV.

No new failure mode: a body the gateway cannot parse is forwarded as is (the engine answers
it), a daemon that is down means untagged pass-through, an upstream's error status and body
reach the client unchanged, and a bug in the tracking passes the request through untracked.
The gateway answers for itself only when an upstream cannot be reached at all (502, where a
direct client would have seen the connection refused) and when a ``X-TokenCake-*`` header,
the gateway's own contract, is malformed (400); both with an OpenAI-style error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiohttp
import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tokencake.connectors.gateway.hints import HintError
from tokencake.connectors.gateway.link import DaemonLink
from tokencake.connectors.gateway.metrics import GatewayMetrics
from tokencake.connectors.gateway.observe import CHAT, COMPLETIONS, RESPONSES, Observer, Outcome
from tokencake.connectors.gateway.tenants import Tenants, salt
from tokencake.connectors.gateway.tracker import Plan, Tracker

logger = logging.getLogger(__name__)

TRACKED: Final = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/responses": RESPONSES,
}
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
MODELS_REFRESH_S: Final = 5.0
SWEEP_S: Final = 1.0

_json = msgspec.json.Decoder()
_encode = msgspec.json.Encoder().encode


def openai_error(status: int, message: str, err_type: str, code: str) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    return web.Response(status=status, body=_encode(body), content_type="application/json")


def _loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return False  # a unix socket or an unknown peer


def _headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


def _tagged(raw: bytes, body: dict[str, Any], tags: dict[str, Any]) -> bytes:
    """``raw`` with ``tags`` in its ``kv_transfer_params``.

    Without one already, the key is spliced in before the closing brace (the rest of the
    body stays byte for byte as the client sent it); else the body is re-encoded with the
    two merged."""
    kv = body.get("kv_transfer_params")
    end = raw.rstrip()
    if kv is None and body and end.endswith(b"}") and "kv_transfer_params" not in body:
        return end[:-1] + b',"kv_transfer_params":' + _encode(tags) + b"}"
    body["kv_transfer_params"] = {**(kv if isinstance(kv, dict) else {}), **tags}
    return _encode(body)


def _closed(observer: Observer) -> Outcome | None:
    """A relayed stream's outcome; None when reading it failed (a bug of ours: logged)."""
    try:
        return observer.close_stream()
    except Exception:
        logger.exception("gateway: reading a stream failed")
        return None


class Upstreams:
    """The engines behind the gateway and which models each serves."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self._models: dict[str, list[str]] = {}
        self._refreshed = -MODELS_REFRESH_S

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        self._refreshed = time.monotonic()
        models: dict[str, list[str]] = {}
        for url in self.urls:
            for model in await self._list(session, url):
                models.setdefault(model, []).append(url)
        self._models = models

    @staticmethod
    async def _list(session: aiohttp.ClientSession, url: str) -> list[str]:
        try:
            async with session.get(f"{url}/v1/models") as resp:
                if resp.status != 200:
                    return []
                body = _json.decode(await resp.read())
        except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError) as exc:
            logger.debug("listing models of %s: %s", url, exc)
            return []
        data = body.get("data") if isinstance(body, dict) else None
        return [str(m["id"]) for m in data or () if isinstance(m, dict) and "id" in m]

    async def pick(self, session: aiohttp.ClientSession, model: str, key: str) -> str:
        if len(self.urls) == 1:
            return self.urls[0]
        candidates = self._models.get(model)
        if candidates is None and time.monotonic() - self._refreshed > MODELS_REFRESH_S:
            await self.refresh(session)
            candidates = self._models.get(model)
        if not candidates:
            return self.urls[0]
        return candidates[zlib.crc32(key.encode()) % len(candidates)]


class Gateway:
    def __init__(
        self,
        upstreams: list[str],
        *,
        daemon_endpoint: str | None = None,
        llm_events: bool = True,
        app_idle_s: float = 300.0,
        daemon_timeout_s: float = 0.25,
        upstream_timeout_s: float | None = None,
        tenants: Tenants | None = None,
    ) -> None:
        if not upstreams:
            raise ValueError("at least one upstream is needed")
        self.upstreams = Upstreams(upstreams)
        self.metrics = GatewayMetrics()
        self.link = DaemonLink(daemon_endpoint, timeout_s=daemon_timeout_s)
        self.metrics.count_daemon_messages(self.link.counts)
        self.tracker = Tracker(
            self.link, self.metrics, llm_events=llm_events, app_idle_s=app_idle_s
        )
        self.register_wait_s = daemon_timeout_s
        self.wait_registration = not llm_events
        self.upstream_timeout_s = upstream_timeout_s
        self.tenants = tenants if tenants is not None else Tenants()
        self._session: aiohttp.ClientSession | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, _app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=self.upstream_timeout_s, sock_connect=10),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        self.link.start()
        if len(self.upstreams.urls) > 1:
            await self.upstreams.refresh(self._session)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _cleanup(self, _app: web.Application) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._session is not None:
            await self._session.close()
        await self.link.close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            self.tracker.sweep(time.monotonic())

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the gateway's app has not started"
        return self._session

    # ------------------------------------------------------------------ routes

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/tokencake/") and not _loopback(request):
            # The gateway's own views name every tenant's conversations: local peers only.
            return openai_error(403, "local clients only", "permission_error", "403")
        if path == "/tokencake/metrics":
            return web.Response(
                body=generate_latest(self.metrics.registry),
                headers={"Content-Type": CONTENT_TYPE_LATEST},
            )
        if path == "/tokencake/conversations":
            view = self.tracker.view(time.monotonic())
            return web.Response(body=_encode(view), content_type="application/json")
        kind = TRACKED.get(path)
        if kind is not None and request.method == "POST":
            return await self._tracked(request, kind)
        if path == "/v1/models" and request.method == "GET" and len(self.upstreams.urls) > 1:
            return await self._models()
        raw = await request.read()
        return await self._forward(request, raw, self.upstreams.urls[0], None, "other")

    async def _models(self) -> web.Response:
        seen: dict[str, Any] = {}
        answered = False
        for url in self.upstreams.urls:
            try:
                async with self.session.get(f"{url}/v1/models") as resp:
                    body = _json.decode(await resp.read()) if resp.status == 200 else None
            except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError):
                continue
            if isinstance(body, dict) and isinstance(body.get("data"), list):
                answered = True
                for model in body["data"]:
                    if isinstance(model, dict):
                        seen.setdefault(str(model.get("id")), model)
        if not answered:
            return openai_error(502, "no upstream listed its models", "upstream_error", "502")
        return web.Response(
            body=_encode({"object": "list", "data": list(seen.values())}),
            content_type="application/json",
        )

    async def _tracked(self, request: web.Request, kind: str) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = _json.decode(raw)
        except msgspec.DecodeError:
            body = None
        if not isinstance(body, dict):
            # Not ours to judge: the engine answers it as it would without the gateway.
            return await self._forward(request, raw, self.upstreams.urls[0], None, kind)
        tenant = self.tenants.of(request.headers)
        if salt(body, tenant):
            raw = _encode(body)
        try:
            plan = self.tracker.begin(kind, request.headers, body, time.monotonic(), tenant)
        except HintError as exc:
            self.metrics.requests.labels(kind, "400").inc()
            return openai_error(400, str(exc), "invalid_request_error", "bad_tokencake_hint")
        except Exception:
            # A bug of ours must not cost the request: it goes through untracked.
            logger.exception("gateway: tracking a %s request failed; passing it through", kind)
            plan = None
        model = str(body.get("model", ""))
        if plan is None:
            upstream = await self.upstreams.pick(self.session, model, "")
            return await self._forward(request, raw, upstream, None, kind)
        data = raw
        if await self._registered(plan):
            data = _tagged(raw, body, plan.tags)
        upstream = await self.upstreams.pick(self.session, model, plan.conv.conv_id)
        return await self._forward(request, data, upstream, plan, kind)

    async def _registered(self, plan: Plan) -> bool:
        """Whether to tag the request: only once the daemon knows its app.

        Where the engine's connector reports events (``--llm-events engine``) the tags are
        what links its KV to the agent: wait for the registration, at most the daemon
        timeout. Where the gateway reports them, the tags are informational and the event
        queue orders the events after the registration: a request whose app is still being
        registered goes untagged rather than wait.
        """
        reg = plan.registered
        if not reg.done():
            if not self.wait_registration:
                self.metrics.passthrough.labels("registering").inc()
                return False
            try:
                # shield: giving up waiting must not cancel the registration itself.
                await asyncio.wait_for(asyncio.shield(reg), self.register_wait_s)
            except TimeoutError:
                self.metrics.passthrough.labels("daemon_down").inc()
                return False
        if reg.cancelled() or not reg.result():
            self.metrics.passthrough.labels("daemon_down").inc()
            return False
        return True

    async def _forward(
        self,
        request: web.Request,
        data: bytes,
        upstream: str,
        plan: Plan | None,
        kind: str,
    ) -> web.StreamResponse:
        observer = Observer(kind) if plan is not None else None
        status = 0
        finishing = False
        try:
            async with self.session.request(
                request.method,
                upstream + request.rel_url.path_qs,
                data=data if data or request.method not in ("GET", "HEAD") else None,
                headers=_headers(request.headers),
                allow_redirects=False,
            ) as up:
                status = up.status
                headers = _headers(up.headers)
                if up.headers.get("Content-Type", "").startswith("text/event-stream"):
                    return await self._relay_stream(request, up, headers, observer, plan)
                payload = await up.read()
                if plan is not None and observer is not None and status == 200:
                    # Read once the response is out: aiohttp writes it when this returns,
                    # and the loop runs the callback before it next reads a socket, so
                    # before the conversation's next request can arrive.
                    body = b"" if "Content-Encoding" in up.headers else payload
                    now = time.monotonic()
                    asyncio.get_running_loop().call_soon(self._read_body, plan, observer, body, now)
                    finishing = True
                return web.Response(status=status, body=payload, headers=headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.metrics.upstream_errors.inc()
            logger.warning("upstream %s failed: %s", upstream, exc)
            why = " ".join(str(exc).split()) or type(exc).__name__
            return openai_error(
                502, f"upstream {upstream} unreachable: {why}", "upstream_unavailable", "502"
            )
        finally:
            self.metrics.requests.labels(kind, str(status)).inc()
            if plan is not None and not finishing:
                # An error status, an unreachable upstream or a client that went away
                # (cancelled): the LLM call ended without an answer. No-op when reported.
                self._finish(plan, None, time.monotonic())

    def _read_body(self, plan: Plan, observer: Observer, body: bytes, now: float) -> None:
        """A whole response's outcome (``body`` empty: compressed, not read)."""
        try:
            if body:
                observer.feed_body(body)
        except Exception:
            logger.exception("gateway: reading a response failed")
        self._finish(plan, observer.outcome, now)

    def _finish(self, plan: Plan, outcome: Outcome | None, now: float) -> None:
        try:
            self.tracker.finish(plan, outcome, now)
        except Exception:
            logger.exception("gateway: recording a response failed")

    async def _relay_stream(
        self,
        request: web.Request,
        up: aiohttp.ClientResponse,
        headers: dict[str, str],
        observer: Observer | None,
        plan: Plan | None,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=up.status, headers=headers)
        await resp.prepare(request)
        try:
            ended = time.monotonic()
            async for chunk in up.content.iter_any():
                if observer is not None:
                    observer.feed_stream(chunk)
                # Read before the bytes go out: the client cannot have them any earlier.
                ended = time.monotonic()
                await resp.write(chunk)
            await resp.write_eof()
            if plan is not None and observer is not None and up.status == 200:
                # Read after the client has it all: reading it as it came cost more CPU in
                # all (docs/benchmarks.md, Gateway), on the core the relay shares.
                self._finish(plan, _closed(observer), ended)
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            # The client went away: stop reading and close the upstream (the engine aborts).
            # One that had the whole answer (the openai client stops reading at ``[DONE]``
            # and closes, perhaps before the body's end) still ends its LLM call with it.
            if isinstance(exc, ConnectionResetError):
                self.metrics.client_disconnects.inc()
            up.close()
            if plan is not None and observer is not None and up.status == 200:
                outcome = _closed(observer)
                if outcome is not None and outcome.finished:
                    self._finish(plan, outcome, ended)
            if isinstance(exc, asyncio.CancelledError):
                raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The engine broke off mid-stream: break the client's stream too, as it would be.
            self.metrics.upstream_errors.inc()
            logger.warning("upstream stream broke: %s", exc)
            if request.transport is not None:
                request.transport.close()
        return resp


async def serve(
    gateway: Gateway,
    host: str,
    port: int,
    ready: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run ``gateway`` on ``host:port`` until cancelled, SIGTERM or SIGINT."""
    runner = web.AppRunner(gateway.make_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    logger.info("tokencake-gateway on http://%s:%d -> %s", host, port, gateway.upstreams.urls)
    if ready is not None:
        await ready()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
