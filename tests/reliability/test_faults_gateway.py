"""The gateway's pipelined daemon link when the daemon is killed (-9) mid-batch.

Events go out in batches, never awaited (``connectors/gateway/link.py``). A daemon killed with
a batch queued or in flight must cost events, counted once each as missed, and never a
request: the link must not hang on replies that will not come, count an event twice, or
hold a request back. Real daemon processes, real gateway, real HTTP on loopback; the engine
is the scripted upstream.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from tests import procs
from tests.connectors.gateway.test_gateway import TOOLS, run, stack
from tests.connectors.gateway.upstream import MODEL
from tokencake import protocol as p
from tokencake.connectors.gateway.link import DaemonLink

ROUNDS = 50  # tool rounds per batch: four events each


def _tool_round(link: DaemonLink, app: str, n: int) -> None:
    for i in range(n):
        link.event(p.LlmCallStart(app, "a", request_id=f"r{i}"))
        link.event(p.LlmCallFinish(app, "a", request_id=f"r{i}", output_tokens=3))
        link.event(p.ToolCallStart(app, "a", "run_tests", predicted_s=1.0, call_id=f"c{i}"))
        link.event(p.ToolCallEnd(app, "a", call_id=f"c{i}"))


async def _settled(link: DaemonLink) -> None:
    for _ in range(500):
        if link.inflight == 0 and not link._out:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the link still waits on {link.inflight} replies")


def test_daemon_killed_mid_batch_costs_each_event_once(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/d.sock"

    async def main() -> None:
        d = procs.start(tmp_path, endpoint=endpoint)
        link = DaemonLink(endpoint, timeout_s=0.5, retry_s=60.0)
        try:
            link.start()
            dag = p.AppDag(nodes=[p.DagNode(id="a", agent_type="coder")])
            assert await link.register("batch", dag)
            _tool_round(link, "batch", ROUNDS)  # the first batch: answered
            assert await link.register("probe", dag)
            assert (link.sent, link.missed, link.rejected) == (2 + 4 * ROUNDS, 0, 0)
            _tool_round(link, "batch", ROUNDS)  # the second: queued, then the daemon dies
            d.kill9()
            await _settled(link)
            assert link.sent + link.missed + link.rejected == 2 + 8 * ROUNDS
            assert link.missed > 0 and link.rejected == 0 and link.down
            assert not await link.register("later", dag)  # at once while down, no wait
        finally:
            await link.close()
            d.kill9()

    run(main())


def test_requests_in_flight_when_the_daemon_dies_are_answered_unchanged(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/d.sock"

    def body(i: int) -> dict[str, Any]:
        return {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "coder: you write code"},
                {"role": "user", "content": f"request {i}"},
            ],
            "tools": TOOLS,
        }

    async def main() -> None:
        d = procs.start(tmp_path, endpoint=endpoint)
        try:
            async with stack(endpoint, daemon_timeout_s=0.5) as s, aiohttp.ClientSession() as http:

                async def post(url: str, i: int) -> tuple[int, bytes]:
                    async with http.post(f"{url}/v1/chat/completions", json=body(i)) as r:
                        return r.status, await r.read()

                assert (await post(s.gw_url, 0))[0] == 200  # tracked: the daemon is up
                await s.drained()
                tasks = [asyncio.create_task(post(s.gw_url, i)) for i in range(1, 9)]
                await asyncio.sleep(0.01)  # some answered, some on their way, events queued
                d.kill9()
                via = await asyncio.gather(*tasks)
                direct = [await post(s.up_url, i) for i in range(1, 9)]
                assert via == direct and all(status == 200 for status, _ in via)
                await _settled(s.gateway.link)
                assert s.gateway.link.rejected == 0
                # Afterwards, with the daemon gone: still answered, at once.
                assert await post(s.gw_url, 9) == await post(s.up_url, 9)
        finally:
            d.kill9()

    run(main())
