"""The documented launch command, run as written: vLLM's OpenAI server with TokenCake.

The command is read from ``docs/vllm.md`` (between the ``launch`` markers), its
placeholders filled in, and started as a real server process beside a real tokencaked; the
``openai`` client drives it. An agent's call with a tool hint, then its continuation after
the tool: the continuation's output equals the same prompt on a fresh request, the daemon
saw the engine and the app's events, and the connector's lines are in vLLM's log.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from bench.common.vllm_models import WORDS
from bench.common.vllm_workload import DaemonProcess

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

DOC = Path(__file__).resolve().parents[3] / "docs" / "vllm.md"
APP = "app-openai"
START_TIMEOUT_S = 240.0


def documented_command() -> str:
    text = DOC.read_text()
    match = re.search(r"<!-- launch:begin -->\s*```sh\n(.*?)```\s*<!-- launch:end -->", text, re.S)
    assert match, "docs/vllm.md has no launch block"
    return match.group(1).replace("\\\n", " ").strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tiny_model: Path, daemon: DaemonProcess, tmp_path_factory: Any) -> Iterator[Any]:
    port = _free_port()
    command = documented_command()
    for name, value in (("$MODEL", str(tiny_model)), ("$PORT", str(port))):
        command = command.replace(name, value)
    command = command.replace("$ENDPOINT", daemon.endpoint)
    argv = shlex.split(command)
    assert argv[0] == "python"
    # Small enough for the test machine; everything else is the documented command.
    argv = [sys.executable, *argv[1:], "--dtype", "float32", "--max-model-len", "1024"]
    argv += ["--kv-cache-memory-bytes", str(64 * 32 * 1024), "--enforce-eager"]
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the documented command exited: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_documented_launch_serves_agents_through_tokencake(
    server: Any, daemon: DaemonProcess, tiny_model: Path
) -> None:
    from openai import OpenAI

    from tokencake import protocol as p
    from tokencake.agent_params import kv_transfer_params
    from tokencake.clients.client import AppSession, TokenCakeClient

    url, log = server
    api = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
    model = api.models.list().data[0].id
    words = WORDS[3:14]  # agent tool call search read write file code test plan result
    prompt = " ".join(words[i % len(words)] for i in range(150))
    dag = p.AppDag(nodes=[p.DagNode("coder", expected_tool_s=2.0, tool_kind="pytest")], edges=[])
    with (
        TokenCakeClient(daemon.endpoint, timeout_s=2.0) as client,
        AppSession(client, APP, dag, strict=True),
    ):
        first = api.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=8,
            temperature=0.0,
            extra_body={
                "kv_transfer_params": kv_transfer_params(
                    APP, "coder", tool_kind="pytest", tool_predicted_s=2.0
                )
            },
        )
        text = first.choices[0].text
        assert first.usage is not None and first.usage.completion_tokens == 8
        continuation = prompt + text + " result ok done"
        second = api.completions.create(
            model=model,
            prompt=continuation,
            max_tokens=8,
            temperature=0.0,
            extra_body={"kv_transfer_params": kv_transfer_params(APP, "coder")},
        )
        # The same prompt again, with no agent metadata: greedy output must not depend on
        # where the prefix came from.
        plain = api.completions.create(
            model=model, prompt=continuation, max_tokens=8, temperature=0.0
        )
        assert second.choices[0].text == plain.choices[0].text
        engines = client.call(p.ListEngines()).engines
        agents = {a.agent_id: a for a in client.call(p.ListAgents(APP)).agents}
    assert [e.name for e in engines if e.name.startswith("vllm:")], engines
    assert "coder" in agents
    out = log.read_text()
    assert "TokenCake: registered with tokencaked" in out
    assert "(APIServer" in out or "INFO" in out
