"""``tokencake-gateway``: run the OpenAI-compatible gateway in front of vLLM servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import click

from tokencake import __version__
from tokencake.cli import HELP_OPTIONS, POSITIVE, Command, is_endpoint, option

logger = logging.getLogger(__name__)


def _upstream(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    out = []
    for value in values:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise click.BadParameter(f"{value!r} is not an http(s)://HOST[:PORT] URL")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise click.BadParameter(f"{value!r}: {exc}") from None
        if parts.path.rstrip("/") not in ("", "/v1"):
            raise click.BadParameter(f"{value!r}: give the server's root URL, not a path")
        out.append(f"{parts.scheme}://{parts.netloc}")
    return out


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop (a dependency; it relays with less CPU), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _daemon(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    from tokencake.clients.client import resolve_endpoint

    endpoint = resolve_endpoint(value)
    if is_endpoint(endpoint):
        return endpoint
    raise click.BadParameter(f"{endpoint!r} is not ipc://PATH or tcp://HOST:PORT")


def _tenant_secret(_ctx: click.Context, _param: click.Parameter, path: Path | None) -> bytes | None:
    """The secret's bytes: a regular file of ours, readable by us only, 32 bytes or more."""
    if path is None:
        return None
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise click.BadParameter(f"{path} must be ours with mode 0600 (it names every tenant)")
    if len(data.strip()) < 32:
        raise click.BadParameter(f"{path} must hold at least 32 bytes")
    return data.strip()


@click.command(cls=Command, context_settings=HELP_OPTIONS)
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    required=True,
    callback=_upstream,
    help="An OpenAI-compatible server (vllm serve) root URL; repeat for several.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@option("--port", click.IntRange(0, 65535), 8100, "Port.")
@click.option(
    "--daemon",
    "endpoint",
    envvar="TOKENCAKE_ENDPOINT",
    default=None,
    callback=_daemon,
    help="tokencaked endpoint (default: $TOKENCAKE_ENDPOINT, else the daemon's default).",
)
@option(
    "--llm-events",
    click.Choice(["gateway", "engine"]),
    "gateway",
    "Who reports LLM call start/finish: the gateway, or the engine's TokenCake connector.",
)
@option(
    "--app-idle-s",
    POSITIVE,
    300.0,
    "An app with no request for this long is ended and its structure learnt.",
)
@option(
    "--daemon-timeout-s",
    POSITIVE,
    0.25,
    "Wait at most this long for the daemon (then pass requests through untagged).",
)
@option(
    "--upstream-timeout-s",
    POSITIVE,
    None,
    "Total time limit per upstream request (default: none, as a direct client).",
)
@click.option(
    "--tenants/--no-tenants",
    default=True,
    show_default=True,
    help="Keep the API keys' tenants apart (ids and cache_salt scoped per key; docs/security.md).",
)
@click.option(
    "--tenant-secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    callback=_tenant_secret,
    help="Secret (at least 32 bytes, mode 0600) naming tenants, so their tags and salts stay "
    "the same across restarts (default: a new random one per start).",
)
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING...")
@click.version_option(__version__)
def main(
    upstreams: list[str],
    host: str,
    port: int,
    endpoint: str,
    llm_events: str,
    app_idle_s: float,
    daemon_timeout_s: float,
    upstream_timeout_s: float | None,
    tenants: bool,
    tenant_secret_file: bytes | None,
    log_level: str,
) -> None:
    """Proxy the OpenAI API to vLLM and report the agent events seen in the traffic."""
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise click.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from tokencake.connectors.gateway.server import Gateway, serve
    from tokencake.connectors.gateway.tenants import Tenants

    gateway = Gateway(
        upstreams,
        daemon_endpoint=endpoint,
        llm_events=llm_events == "gateway",
        app_idle_s=app_idle_s,
        daemon_timeout_s=daemon_timeout_s,
        upstream_timeout_s=upstream_timeout_s,
        tenants=Tenants(tenant_secret_file, enabled=tenants),
    )
    try:
        with (
            contextlib.suppress(KeyboardInterrupt),
            asyncio.Runner(loop_factory=_loop_factory()) as runner,
        ):
            runner.run(serve(gateway, host, port))
    except OSError as exc:
        click.echo(f"tokencake-gateway: cannot listen on {host}:{port}: {exc.strerror}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
