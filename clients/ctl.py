"""``tokencake-ctl``: look inside a running tokencaked.

Every command takes ``--json``. When the daemon is down the command prints one line naming
the socket it tried and exits with status 3, at once when the socket file does not exist.
A bad option value is one line and exit status 2.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import msgspec
import zmq

from tokencake import protocol as p
from tokencake.cli import HELP_OPTIONS, FloatRange, Group, is_endpoint
from tokencake.clients.client import DaemonUnavailable, TokenCakeClient, resolve_endpoint
from tokencake.protocol import RemoteError
from tokencake.tables import render_table

EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_REMOTE_ERROR = 4


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _table(rows: list[list[str]], header: list[str]) -> str:
    return render_table(header, rows) if rows else "(none)"


class Ctx:
    def __init__(self, endpoint: str, timeout_s: float, as_json: bool) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.as_json = as_json

    def run(self, fetch: Callable[[TokenCakeClient], Any], render: Callable[[Any], str]) -> None:
        socket_path = _ipc_path(self.endpoint)
        if socket_path is not None and not socket_path.exists():
            # No socket file, no daemon: say so now rather than after the client's timeout.
            click.echo(f"tokencake-ctl: daemon not running: no socket at {socket_path}", err=True)
            sys.exit(EXIT_UNAVAILABLE)
        try:
            with TokenCakeClient(self.endpoint, timeout_s=self.timeout_s) as client:
                result = fetch(client)
        except DaemonUnavailable as exc:
            click.echo(f"tokencake-ctl: daemon not reachable at {exc.endpoint}", err=True)
            sys.exit(EXIT_UNAVAILABLE)
        except RemoteError as exc:
            click.echo(f"tokencake-ctl: daemon refused: {exc.code}: {exc.message}", err=True)
            sys.exit(EXIT_REMOTE_ERROR)
        except zmq.ZMQError as exc:  # an endpoint zmq cannot connect to (tcp://nohost:1)
            click.echo(f"tokencake-ctl: cannot connect to {self.endpoint}: {exc}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        if self.as_json:
            click.echo(json.dumps(msgspec.to_builtins(result), indent=2, sort_keys=True))
        else:
            click.echo(render(result))


def _ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint.removeprefix("ipc://")) if endpoint.startswith("ipc://") else None


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _endpoint(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    endpoint = resolve_endpoint(value)
    if not is_endpoint(endpoint):
        raise click.BadParameter(f"{endpoint!r} is not ipc://PATH or tcp://HOST:PORT.")
    return endpoint


@click.group(cls=Group, context_settings=HELP_OPTIONS)
@click.option(
    "--endpoint",
    envvar="TOKENCAKE_ENDPOINT",
    default=None,
    callback=_endpoint,
    help="Daemon endpoint (default: $TOKENCAKE_ENDPOINT, else the daemon's default socket).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=FloatRange(0, 3600, min_open=True),
    default=2.0,
    show_default=True,
    help="Seconds to wait for the daemon's reply.",
)
@click.pass_context
def main(ctx: click.Context, endpoint: str, timeout_s: float) -> None:
    """Inspect a running tokencaked."""
    ctx.obj = {"endpoint": endpoint, "timeout_s": timeout_s}


def _ctx(click_ctx: click.Context, as_json: bool) -> Ctx:
    return Ctx(click_ctx.obj["endpoint"], click_ctx.obj["timeout_s"], as_json)


def _status_with_apps(client: TokenCakeClient) -> tuple[Any, Any]:
    return client.call(p.Stats()), client.call(p.ListApps())


def _render_status_with_apps(both: tuple[Any, Any]) -> str:
    """Status, with the live counts set against the ended apps ``agents`` still lists."""
    stats, apps = both
    ended = [a for a in apps.apps if a.state != "live"]
    return _render_status(stats, ended_apps=len(ended), ended_agents=sum(a.nodes for a in ended))


def _render_status(s: Any, ended_apps: int | None = None, ended_agents: int = 0) -> str:
    pool = s.pool
    used = pool.num_slots - pool.free
    pct = 100.0 * used / pool.num_slots if pool.num_slots else 0.0
    lines = [
        f"uptime        {s.uptime_s:.0f} s",
        f"arena         {pool.arena_name} ({_human_bytes(pool.arena_bytes)})",
        f"pool          {used}/{pool.num_slots} slots used ({pct:.1f} %), "
        f"ready {pool.ready}, writing {pool.writing}, reading {pool.reading}",
        f"hits/misses   {pool.hits}/{pool.misses}   evictions {pool.evictions}",
        f"engines       {s.engines}",
    ]
    if ended_apps is None:
        lines.append(f"live apps/agents {s.apps}/{s.agents}")
    else:
        lines += [
            f"apps          {s.apps} live, {ended_apps} ended (kept for `agents` and `apps`)",
            f"agents        {s.agents} in live apps, {ended_agents} in ended apps",
        ]
    lines += [
        f"offloaded     {_human_bytes(s.bytes_offloaded)}",
        f"uploaded      {_human_bytes(s.bytes_uploaded)}",
        f"decisions     {s.decisions}",
    ]
    if s.errors:
        lines.append("errors        " + ", ".join(f"{k}={v}" for k, v in sorted(s.errors.items())))
    return "\n".join(lines)


@main.command(short_help="Pool use, engines, apps and agents, bytes moved.")
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Pool use, engines, apps and agents, bytes offloaded and uploaded.

    The apps and agents counts are of live apps (--json: `apps`, `agents`); `agents` and
    `apps` also list the last ended apps, whose agents show state `done`.
    """
    if as_json:
        _ctx(ctx, as_json).run(lambda c: c.call(p.Stats()), _render_status)
    else:
        _ctx(ctx, as_json).run(_status_with_apps, _render_status_with_apps)


@main.command()
@json_option
@click.pass_context
def engines(ctx: click.Context, as_json: bool) -> None:
    """Registered engines and their KV layouts."""

    def render(r: Any) -> str:
        return _table(
            [
                [
                    e.engine_id,
                    e.layout.model_id,
                    e.fingerprint[:12],
                    str(e.layout.block_size),
                    f"{e.num_gpu_blocks_free}/{e.num_gpu_blocks}",
                    str(e.leased_slots),
                    f"{e.last_seen_s_ago:.1f}s",
                ]
                for e in r.engines
            ],
            ["ENGINE", "MODEL", "LAYOUT", "BLOCK", "GPU FREE", "LEASED", "SEEN"],
        )

    _ctx(ctx, as_json).run(lambda c: c.call(p.ListEngines()), render)


@main.command()
@click.option("--app", "app_id", default="", help="Only this app's agents.")
@json_option
@click.pass_context
def agents(ctx: click.Context, app_id: str, as_json: bool) -> None:
    """Agents, their state, priority and KV placement."""

    def render(r: Any) -> str:
        return _table(
            [
                [
                    a.app_id,
                    a.agent_id,
                    a.agent_type,
                    a.state,
                    f"{a.state_for_s:.1f}s",
                    f"{a.priority:.2f}",
                    "*" if a.on_critical_path else "",
                    str(a.kv_blocks),
                    str(a.host_blocks),
                    a.tool_kind,
                ]
                for a in r.agents
            ],
            ["APP", "AGENT", "TYPE", "STATE", "FOR", "PRIO", "CRIT", "GPU", "HOST", "TOOL"],
        )

    _ctx(ctx, as_json).run(lambda c: c.call(p.ListAgents(app_id)), render)


@main.command()
@json_option
@click.pass_context
def apps(ctx: click.Context, as_json: bool) -> None:
    """Applications, their DAGs and node states."""

    def render(r: Any) -> str:
        out = []
        for a in r.apps:
            states = ", ".join(f"{n}={s}" for n, s in a.node_states.items())
            out.append(
                f"{a.app_id} [{a.state}] tenant={a.tenant or '-'} nodes={a.nodes} "
                f"age={a.age_s:.0f}s"
            )
            out.append(f"  edges: {', '.join(f'{s}->{d}' for s, d in a.edges) or '-'}")
            out.append(f"  critical path: {' -> '.join(a.critical_path) or '-'}")
            out.append(f"  states: {states}")
        return "\n".join(out) or "(none)"

    _ctx(ctx, as_json).run(lambda c: c.call(p.ListApps()), render)


@main.command()
@json_option
@click.pass_context
def pool(ctx: click.Context, as_json: bool) -> None:
    """The host KV pool, by state, engine and tenant."""

    def render(r: Any) -> str:
        pl = r.pool
        lines = [
            f"arena {pl.arena_name}: {_human_bytes(pl.arena_bytes)}, {pl.num_slots} slots of "
            f"{_human_bytes(pl.slot_bytes)}",
            f"free {pl.free}  writing {pl.writing}  ready {pl.ready}  reading {pl.reading}",
            f"hits {pl.hits}  misses {pl.misses}  evictions {pl.evictions}",
        ]
        lines += [f"engine {k}: {v} slots" for k, v in sorted(r.by_engine.items())]
        lines += [f"tenant {k or '(default)'}: {v} slots" for k, v in sorted(r.by_tenant.items())]
        return "\n".join(lines)

    _ctx(ctx, as_json).run(lambda c: c.call(p.Pool()), render)


@main.command()
@json_option
@click.pass_context
def config(ctx: click.Context, as_json: bool) -> None:
    """The daemon's running configuration."""
    _ctx(ctx, as_json).run(
        lambda c: c.call(p.GetConfig()),
        lambda r: "\n".join(f"{k} = {v!r}" for k, v in sorted(r.config.items())),
    )


@main.command()
@click.option(
    "--limit",
    type=click.IntRange(1, 10000),
    default=20,
    show_default=True,
    help="How many recent decisions (at most 10000).",
)
@click.option("--agent", "agent_id", default="", help="Only decisions about this agent.")
@json_option
@click.pass_context
def decisions(ctx: click.Context, limit: int, agent_id: str, as_json: bool) -> None:
    """Recent scheduler decisions and the reasons behind them."""

    def render(r: Any) -> str:
        out = []
        for d in r.decisions:
            terms = d.reason.terms
            why = ", ".join(f"{k}={_fmt(v)}" for k, v in terms.items())
            out.append(
                f"#{d.seq} {d.kind:<8} {d.app_id}/{d.agent_id} blocks={d.blocks} "
                f"engine={d.engine_id or '-'} rule={d.reason.rule}"
            )
            if why:
                out.append(f"    {why}")
        return "\n".join(out) or "(none)"

    _ctx(ctx, as_json).run(lambda c: c.call(p.ListDecisions(limit, agent_id)), render)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _gateway_url(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1]) == 0:
        raise click.BadParameter(f"{value!r} is not an http(s)://HOST[:PORT] URL.")
    return value.rstrip("/")


@main.command(short_help="Conversations a tokencake-gateway tracks (HTTP).")
@click.option(
    "--url",
    envvar="TOKENCAKE_GATEWAY_URL",
    default="http://127.0.0.1:8100",
    show_default=True,
    callback=_gateway_url,
    help="The tokencake-gateway's root URL (default: $TOKENCAKE_GATEWAY_URL).",
)
@json_option
@click.pass_context
def gateway(ctx: click.Context, url: str, as_json: bool) -> None:
    """Conversations a tokencake-gateway tracks, and what it has learnt (over HTTP)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(
            f"{url}/tokencake/conversations", timeout=ctx.obj["timeout_s"]
        ) as resp:
            view = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", exc)
        click.echo(f"tokencake-ctl: gateway not reachable at {url}: {why}", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    if as_json:
        click.echo(json.dumps(view, indent=2, sort_keys=True))
        return
    rows = [
        [
            c["conversation"],
            c["rule"],
            c["app_id"],
            c["agent_id"],
            c["state"],
            str(c["requests"]),
            str(c["tool_calls"]),
            c["tool_kind"] or "-",
            "-" if c["last_tool_s"] is None else f"{c['last_tool_s']:.3f}",
            "-" if c["predicted_s"] is None else f"{c['predicted_s']:.3f}",
        ]
        for c in view["conversations"]
    ]
    head = ["CONVERSATION", "RULE", "APP", "AGENT", "STATE", "REQS", "TOOLS", "TOOL"]
    click.echo(_table(rows, [*head, "LAST_S", "PREDICTED_S"]))
    learnt = [
        [d["model"], d["tool"], str(d["observations"]), f"{d['median_s']:.3f}"]
        for d in view["tool_durations"]
    ]
    click.echo("\n" + _table(learnt, ["MODEL", "TOOL", "OBSERVED", "MEDIAN_S"]))
    shapes = [
        [s["root_type"], ",".join(s["nodes"]), " ".join(f"{a}>{b}" for a, b in s["edges"])]
        for s in view["structures"]
    ]
    click.echo("\n" + _table(shapes, ["ROOT", "NODES", "EDGES"]))
    d = view["daemon"]
    state = "down" if d["down"] else "up"
    click.echo(f"\ndaemon {state}: {d['sent']} sent, {d['missed']} missed, {d['rejected']} refused")


@main.command()
@json_option
def policies(as_json: bool) -> None:
    """Registered scheduler policies (works without a daemon)."""
    from tokencake.daemon.scheduler.policy import list_policies

    infos = list_policies()
    if as_json:
        click.echo(json.dumps([i.to_dict() for i in infos], indent=2))
    else:
        click.echo(_table([[i.name, i.summary] for i in infos], ["POLICY", "SUMMARY"]))


@main.command()
@click.option(
    "--interval",
    type=FloatRange(0, 3600),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option(
    "--iterations",
    type=click.IntRange(min=0),
    default=0,
    help="Stop after N refreshes (0: forever).",
)
@json_option
@click.pass_context
def top(ctx: click.Context, interval: float, iterations: int, as_json: bool) -> None:
    """Live status and agents, refreshed every --interval seconds."""
    c = _ctx(ctx, as_json)
    n = 0
    try:
        while True:
            n += 1
            if not as_json:
                click.clear()
                click.echo(time.strftime("tokencake-ctl top  %H:%M:%S"))
            c.run(lambda cl: cl.call(p.Stats()), _render_status)
            if not as_json:
                click.echo("")
            c.run(
                lambda cl: cl.call(p.ListAgents()),
                lambda r: _table(
                    [
                        [
                            a.app_id,
                            a.agent_id,
                            a.state,
                            f"{a.priority:.2f}",
                            str(a.kv_blocks),
                            str(a.host_blocks),
                        ]
                        for a in r.agents[:40]
                    ],
                    ["APP", "AGENT", "STATE", "PRIO", "GPU", "HOST"],
                ),
            )
            if iterations and n >= iterations:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return


if __name__ == "__main__":
    main()
