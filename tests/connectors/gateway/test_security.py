"""Tenants at the gateway (``connectors/gateway/tenants.py``, docs/security.md): one API
key's requests never carry another's conversation, app, hints or KV salt, and the gateway's
own views are for local peers only.

Real gateway (tenants on, its default), real daemon, the scripted upstream recording what
the engine receives.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any
from unittest import mock

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from click.testing import CliRunner
from openai import AsyncOpenAI

from tests import procs
from tests.connectors.gateway.test_gateway import TOOLS, daemon, run, stack
from tests.connectors.gateway.upstream import MODEL
from tokencake.connectors.gateway.server import Gateway
from tokencake.connectors.gateway.tenants import Tenants

__all__ = ["daemon"]  # the module-scoped daemon fixture, shared with test_gateway

SECRET = b"s" * 32


def _client(url: str, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def _sent(s: Any) -> list[dict[str, Any]]:
    """The bodies the engine received, in order."""
    return [body for _path, _headers, body in s.upstream.requests]


def test_two_keys_declaring_the_same_ids_stay_apart(daemon: procs.Proc) -> None:
    """Alice and Bob both declare conversation ``chat`` and app ``wf``: two conversations,
    two apps in the daemon, each request tagged with its own tenant's app only, and two
    cache salts; Alice's second request continues Alice's conversation only."""
    tenants = Tenants(SECRET)
    hdrs = {"X-TokenCake-Conversation": "chat", "X-TokenCake-App": "wf"}
    msgs: list[Any] = [{"role": "user", "content": "same task"}]

    async def main() -> None:
        async with stack(daemon.endpoint, tenants=tenants) as s:
            alice, bob = _client(s.gw_url, "alice-key"), _client(s.gw_url, "bob-key")
            for c in (alice, bob, alice, bob):
                await c.chat.completions.create(model=MODEL, messages=msgs, extra_headers=hdrs)
                await s.drained()  # registered: the next request of the app is tagged
            ta = tenants.of({"Authorization": "Bearer alice-key"})
            tb = tenants.of({"Authorization": "Bearer bob-key"})
            assert ta != tb and ta and tb
            convs = {c["conversation"]: c for c in s.view()["conversations"]}
            assert set(convs) == {f"chat@{ta}", f"chat@{tb}"}
            assert convs[f"chat@{ta}"]["requests"] == convs[f"chat@{tb}"]["requests"] == 2
            a_app, b_app = convs[f"chat@{ta}"]["app_id"], convs[f"chat@{tb}"]["app_id"]
            assert a_app == f"wf@{ta}" and b_app == f"wf@{tb}"
            sent = _sent(s)
            tags = [b.get("kv_transfer_params", {}).get("tokencake", {}) for b in sent]
            assert [t.get("app_id") for t in tags[2:]] == [a_app, b_app]
            assert all(
                t.get("app_id") in (None, own)
                for t, own in zip(tags, [a_app, b_app] * 2, strict=True)
            )
            assert [b["cache_salt"] for b in sent] == [ta, tb, ta, tb]
            await alice.close()
            await bob.close()

    run(main())


def test_history_and_data_flow_never_cross_tenants(daemon: procs.Proc) -> None:
    """Bob resends Alice's exact history (her prompt, the model's tool call, a tool result)
    and quotes her final answer: without tenants that would continue Alice's conversation
    and make Bob's a child of her app. With them Bob's requests start conversations of his
    own, in apps of his own."""
    tenants = Tenants(SECRET)
    system = {"role": "system", "content": "coder: you write code and run the tests"}

    async def main() -> None:
        async with stack(daemon.endpoint, tenants=tenants) as s:
            alice, bob = _client(s.gw_url, "alice-key"), _client(s.gw_url, "bob-key")
            history: list[Any] = [system, {"role": "user", "content": "fix the bug"}]
            r = await alice.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
            call = r.choices[0].message.model_dump(exclude_none=True)
            history += [call, {"role": "tool", "tool_call_id": "x", "content": "2 passed"}]
            final = await alice.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
            answer = final.choices[0].message.content or ""
            assert answer
            await bob.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
            quote: list[Any] = [system, {"role": "user", "content": f"review this: {answer}"}]
            await bob.chat.completions.create(model=MODEL, messages=quote, tools=TOOLS)
            ta = tenants.of({"Authorization": "Bearer alice-key"})
            tb = tenants.of({"Authorization": "Bearer bob-key"})
            view = s.view()["conversations"]
            tracked = s.gateway.tracker.conversations
            by_tenant = {
                t: [c for c in view if tracked[c["conversation"]].tenant == t] for t in (ta, tb)
            }
            assert len(by_tenant[ta]) == 1 and by_tenant[ta][0]["requests"] == 2
            assert len(by_tenant[tb]) == 2
            alice_apps = {c["app_id"] for c in by_tenant[ta]}
            assert not alice_apps & {c["app_id"] for c in by_tenant[tb]}
            sent = _sent(s)
            assert [b["cache_salt"] for b in sent] == [ta, ta, tb, tb]
            await alice.close()
            await bob.close()

    run(main())


def test_client_salts_are_scoped_and_cannot_name_a_tenants_salt(daemon: procs.Proc) -> None:
    tenants = Tenants(SECRET)
    ta = tenants.of({"Authorization": "Bearer alice-key"})
    msgs: list[Any] = [{"role": "user", "content": "salted"}]

    async def main() -> None:
        async with stack(daemon.endpoint, tenants=tenants) as s:
            alice = _client(s.gw_url, "alice-key")
            await alice.chat.completions.create(
                model=MODEL, messages=msgs, extra_body={"cache_salt": "mine"}
            )
            await alice.close()
            import aiohttp

            async with aiohttp.ClientSession() as http:
                for salt in (None, ta, f"{ta}:mine"):
                    body: dict[str, Any] = {"model": MODEL, "messages": msgs}
                    if salt is not None:
                        body["cache_salt"] = salt
                    async with http.post(f"{s.gw_url}/v1/chat/completions", json=body) as r:
                        assert r.status == 200
            got = [b.get("cache_salt") for b in _sent(s)]
            # No key: the anonymous tenant; its own salt, if any, behind "anon:".
            assert got == [f"{ta}:mine", None, f"anon:{ta}", f"anon:{ta}:mine"]

    run(main())


def test_gateway_views_are_for_local_peers_only() -> None:
    """``/tokencake/*`` name every tenant's conversations: refused to a remote peer."""
    gateway = Gateway(["http://127.0.0.1:9"], daemon_endpoint="ipc:///nonexistent")
    for peer, status in ((("203.0.113.7", 4000), 403), (("127.0.0.1", 4000), 200)):
        for path in ("/tokencake/conversations", "/tokencake/metrics"):
            transport = mock.Mock()
            transport.get_extra_info.side_effect = lambda name, p=peer: (
                p if name == "peername" else None
            )
            request = make_mocked_request("GET", path, transport=transport)
            response = asyncio.run(gateway.handle(request))
            assert response.status == status, (peer, path)
            if status == 403:
                assert isinstance(response, web.Response) and isinstance(response.body, bytes)
                assert json.loads(response.body)["error"]["code"] == "403"


def test_tenant_secret_file_must_be_private(tmp_path: Path) -> None:
    from tokencake.connectors.gateway.cli import main

    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(16).hex().encode())
    runner = CliRunner()
    for mode, size, words in ((0o644, 32, "mode 0600"), (0o600, 8, "at least 32 bytes")):
        secret.write_bytes(b"k" * size)
        secret.chmod(mode)
        args = ["--upstream", "http://127.0.0.1:9", "--tenant-secret-file", str(secret)]
        out = runner.invoke(main, args)
        assert out.exit_code == 2 and words in out.output
        assert "Traceback" not in out.output
