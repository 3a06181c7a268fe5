"""The gateway's daemon link: events pipelined without waiting, in order, the daemon's
restarts and silences survived. A real tokencaked; a silent daemon is a real ZMQ ROUTER
socket that reads and never answers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import zmq
from prometheus_client import generate_latest

from tests import procs
from tests.connectors.gateway.test_gateway import _agents, daemon, run
from tokencake import protocol as p
from tokencake.clients.client import TokenCakeClient
from tokencake.connectors.gateway.link import DaemonLink
from tokencake.connectors.gateway.metrics import GatewayMetrics

__all__ = ["daemon"]


def _dag(*nodes: str) -> p.AppDag:
    return p.AppDag(nodes=[p.DagNode(id=n, agent_type="coder") for n in nodes])


def _tool_round(link: DaemonLink, app: str, agent: str, n: int) -> None:
    """``n`` LLM calls, each ending in a tool call, queued without waiting."""
    for i in range(n):
        link.event(p.LlmCallStart(app, agent, request_id=f"r{i}"))
        link.event(p.LlmCallFinish(app, agent, request_id=f"r{i}", output_tokens=3))
        link.event(p.ToolCallStart(app, agent, "run_tests", predicted_s=1.0, call_id=f"c{i}"))
        link.event(p.ToolCallEnd(app, agent, call_id=f"c{i}"))


def test_events_are_pipelined_in_order(daemon: procs.Proc) -> None:
    """A registration and the events queued right behind it, none awaited: the daemon takes
    them all, in order (an event ahead of its app's registration would be refused), and the
    link has nothing in flight once the last reply is read."""

    async def main() -> None:
        link = DaemonLink(daemon.endpoint, timeout_s=5.0)
        link.start()
        reg = link.register("pipelined", _dag("a"))
        _tool_round(link, "pipelined", "a", 50)
        link.event(p.LlmCallStart("pipelined", "a", request_id="last"))
        assert not reg.done()  # nothing was waited for
        assert await link.register("pipelined-probe", _dag("x"))  # answered after all of them
        assert (link.sent, link.missed, link.rejected, link.inflight) == (203, 0, 0, 0)
        metrics = GatewayMetrics()
        metrics.count_daemon_messages(link.counts)
        scraped = generate_latest(metrics.registry).decode()
        assert 'tokencake_gateway_daemon_messages_total{outcome="sent"} 203.0' in scraped
        assert 'tokencake_gateway_daemon_messages_total{outcome="missed"} 0.0' in scraped
        assert _agents(daemon.endpoint, "pipelined")["a"].state == "waiting"
        await link.close()

    run(main())


def test_an_app_ended_before_its_registration_is_answered_is_ended(daemon: procs.Proc) -> None:
    """The gateway may end an app (its sweep, over capacity) before the daemon has answered
    its registration: the end goes behind the registration, so the daemon does not keep
    the app live, and the late reply does not bring the app back into the link's books."""

    async def main() -> None:
        link = DaemonLink(daemon.endpoint, timeout_s=5.0)
        link.start()
        reg = link.register("early-end", _dag("a"))
        link.end_app("early-end")
        assert not reg.done()
        assert await reg
        assert await link.register("early-end-probe", _dag("x"))  # answered after the end
        with TokenCakeClient(daemon.endpoint) as c:
            states = {a.app_id: a.state for a in c.call(p.ListApps()).apps}
        assert states.get("early-end", "ended") != "live"
        assert states["early-end-probe"] == "live"
        link.event(p.LlmCallStart("early-end", "a"))  # an ended app's event: not sent
        assert await link.register("early-end-probe-2", _dag("x"))
        assert (link.sent, link.missed, link.rejected) == (3, 0, 0)
        await link.close()

    run(main())


def test_events_of_an_unregistered_app_are_not_sent(daemon: procs.Proc) -> None:
    """An app the daemon refused (or never heard of) has its events dropped, not resent."""

    async def main() -> None:
        link = DaemonLink(daemon.endpoint, timeout_s=5.0)
        link.start()
        link.event(p.LlmCallStart("never-registered", "a"))
        bad = p.AppDag(nodes=[p.DagNode(id="a"), p.DagNode(id="a")])  # duplicate node ids
        refused = link.register("refused", bad)
        link.event(p.LlmCallStart("refused", "a"))
        assert not await refused
        assert await link.register("probe", _dag("x"))
        assert (link.sent, link.missed, link.rejected) == (1, 0, 1)
        await link.close()

    run(main())


def test_a_restarted_daemon_gets_the_app_again(tmp_path: Path) -> None:
    """The daemon restarts and forgets the app: the next event is answered ``unknown_app``,
    the link registers the app again and resends the event, once."""
    endpoint = f"ipc://{tmp_path}/d.sock"

    async def main() -> None:
        d = procs.start(tmp_path, endpoint=endpoint)
        link = DaemonLink(endpoint, timeout_s=5.0)
        try:
            link.start()
            assert await link.register("again", _dag("a"))
            d.stop()
            d = procs.start(tmp_path, endpoint=endpoint)
            for _ in range(200):  # ZMQ reconnects in the background
                await asyncio.sleep(0.05)
                link._down_until = 0.0  # retry at once rather than after retry_s
                link.event(p.ToolCallStart("again", "a", "search", call_id="k"))
                if await link.register("probe", _dag("x")):
                    break
            # The event's unknown_app reply came with the probe's: the registration and the
            # resent event are queued behind it, so one more probe is answered after them.
            assert await link.register("probe", _dag("x"))
            assert _agents(endpoint, "again")["a"].state == "tool"
            assert link.rejected == 0
        finally:
            await link.close()
            d.stop()

    run(main())


def test_a_silent_daemon_costs_missed_events_not_requests(tmp_path: Path) -> None:
    """A daemon that takes messages and never answers: each event is counted missed after
    the timeout, the link goes down, and meanwhile registrations fail at once."""
    endpoint = f"ipc://{tmp_path}/silent.sock"
    ctx: Any = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)
    silent.bind(endpoint)

    async def main() -> None:
        link = DaemonLink(endpoint, timeout_s=0.1, retry_s=60.0)
        try:
            link.start()
            # Connected (IMMEDIATE: writable only then), so the sends below are taken.
            assert link._socket().poll(5000, zmq.POLLOUT)
            reg = link.register("app", _dag("a"))
            link.event(p.LlmCallStart("app", "a"))
            assert not await reg
            for _ in range(100):
                if link.down and link.inflight == 0:
                    break
                await asyncio.sleep(0.02)
            assert link.down and link.missed == 1 and link.sent == 0
            assert not await link.register("other", _dag("b"))  # at once: down
            link.event(p.LlmCallStart("app", "a"))
            assert link.missed == 2 and link.inflight == 0
        finally:
            await link.close()
            silent.close(linger=0)

    run(main())


async def _settled(link: DaemonLink, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if link.inflight == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{link.inflight} messages still in flight")


def test_one_way_events_are_confirmed_by_a_ping(daemon: procs.Proc) -> None:
    """Events go one-way; with no registration after them, the link's own ``ping`` (sent
    ``confirm_s`` after the first of them) confirms them: all counted sent, none missed.
    An event the daemon refuses is answered, and counted rejected, not sent."""

    async def main() -> None:
        # confirm_s well past the error reply's wait, so the ping cannot come first.
        link = DaemonLink(daemon.endpoint, timeout_s=2.0, confirm_s=3.0)
        link.start()
        assert await link.register("oneway", _dag("a"))
        _tool_round(link, "oneway", "a", 5)
        link.event(p.ToolCallEnd("oneway", "nobody", call_id="x"))  # unknown_agent
        link.event(p.LlmCallStart("oneway", "a", request_id="last"))
        for _ in range(200):  # the ping is due 3 s after the first event
            if link.rejected:
                break
            await asyncio.sleep(0.01)
        # The error reply confirmed the 20 events before it; the last waits for the ping.
        assert (link.sent, link.rejected, link.inflight) == (21, 1, 1)
        await _settled(link, 10.0)
        assert (link.sent, link.missed, link.rejected) == (22, 0, 1)
        assert not link.down
        assert _agents(daemon.endpoint, "oneway")["a"].state == "waiting"
        await link.close()

    run(main())


def test_the_wire_one_way_for_events_acked_for_the_rest(tmp_path: Path) -> None:
    """What the link sends: registrations with a reply, events and app ends one-way
    (``"ack": false``), then a ``ping`` for them, at most one per ``confirm_s`` however many
    events flow. A daemon that stops answering: the ping's reply does not come, so the ping
    and the event before it are missed, and the link is down."""
    endpoint = f"ipc://{tmp_path}/router.sock"
    ctx: Any = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    seen: list[tuple[str, bool]] = []
    answering = [True]

    def answer() -> None:
        while router.poll(0, zmq.POLLIN):
            peer, frame = router.recv_multipart()
            request_id, op, req, ack = p.decode_request_ack(frame)
            seen.append((op, ack))
            if ack and answering[0]:
                reply = p.PingReply("t", 1, 0.0) if isinstance(req, p.Ping) else p.EventAck(True)
                router.send_multipart([peer, p.encode_reply(op, request_id, reply)])

    async def until(done: Any, n: int = 400) -> None:
        for _ in range(n):
            answer()
            if done():
                return
            await asyncio.sleep(0.005)
        raise AssertionError("not settled")

    async def main() -> None:
        link = DaemonLink(endpoint, timeout_s=0.2, retry_s=60.0, confirm_s=0.1)
        try:
            link.start()
            assert link._socket().poll(5000, zmq.POLLOUT)
            reg, other = link.register("w", _dag("a")), link.register("v", _dag("b"))
            link.event(p.LlmCallStart("w", "a"))
            await until(other.done)
            assert await reg and await other
            link.end_app("v")
            await until(lambda: link.inflight == 0)
            assert seen == [
                ("register_app", True),
                ("register_app", True),
                ("llm_call_start", False),
                ("app_end", False),
                ("ping", True),
            ]
            assert (link.sent, link.missed, link.down) == (3, 0, False)
            # Events every 10 ms for 0.45 s: pings at least confirm_s apart.
            seen.clear()
            t0 = asyncio.get_running_loop().time()
            for i in range(45):
                link.event(p.LlmCallStart("w", "a", request_id=str(i)))
                await until(lambda: True, 1)
                await asyncio.sleep(0.01)
            took = asyncio.get_running_loop().time() - t0
            await until(lambda: link.inflight == 0)
            pings = seen.count(("ping", True))
            assert 1 <= pings <= (took + 0.3) / link.confirm_s + 1
            assert (link.sent, link.missed) == (48, 0)
            answering[0] = False
            link.event(p.ToolCallEnd("w", "a"))
            await until(lambda: link.down and link.inflight == 0)
            assert (link.sent, link.missed) == (48, 1)
            assert seen[-2:] == [("tool_call_end", False), ("ping", True)]
        finally:
            await link.close()
            router.close(linger=0)

    run(main())
