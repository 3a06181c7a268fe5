"""What the vLLM tests and benchmarks run: engine settings, a generate helper, a daemon they
can kill and restart on one socket, and an engine's shutdown.

Prompts are given as token ids, so their block boundaries are known exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class Turn:
    token_ids: list[int]
    logprobs: list[float]
    cached_tokens: int
    loaded_tokens: int


def engine_kwargs(model: str, *, kv_bytes: int, connector: dict[str, Any] | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": model,
        "dtype": "float32",
        "max_model_len": 1024,
        "block_size": 32,
        "enable_prefix_caching": True,
        "kv_cache_memory_bytes": kv_bytes,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 1024,
        "seed": 0,
        "enforce_eager": True,
    }
    if connector is not None:
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="TokenCakeConnector",
            kv_connector_module_path="tokencake.connectors.vllm.connector",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=connector,
        )
    return kwargs


def to_turn(output: Any) -> Turn:
    completion = output.outputs[0]
    logprobs = [
        float(step[tok].logprob)
        for step, tok in zip(completion.logprobs, completion.token_ids, strict=True)
    ]
    params = output.kv_transfer_params or {}
    loaded = int(params.get("tokencake", {}).get("loaded_tokens", 0))
    return Turn(list(completion.token_ids), logprobs, int(output.num_cached_tokens or 0), loaded)


def generate(
    llm: Any, prompts: list[list[int]], params: list[dict[str, Any] | None], max_tokens: int
) -> list[Turn]:
    from vllm import SamplingParams

    sps = [
        SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            logprobs=1,
            ignore_eos=True,
            extra_args={"kv_transfer_params": p} if p else None,
        )
        for p in params
    ]
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], sps, use_tqdm=False)
    return [to_turn(o) for o in outs]


class Stepper:
    """Drives the engine one step at a time, so the app can act between steps."""

    def __init__(self, llm: Any, prefix: str = "step") -> None:
        self.prefix = prefix
        self.engine = llm.llm_engine
        self.done: dict[str, Turn] = {}
        self._n = 0

    def add(self, ids: list[int], params: dict[str, Any] | None, max_tokens: int) -> str:
        from vllm import SamplingParams

        self._n += 1
        req_id = f"{self.prefix}-{self._n}"
        sp = SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            logprobs=1,
            ignore_eos=True,
            extra_args={"kv_transfer_params": params} if params else None,
        )
        self.engine.add_request(req_id, {"prompt_token_ids": ids}, sp)
        return req_id

    def step(self) -> None:
        for out in self.engine.step():
            if out.finished:
                self.done[out.request_id] = to_turn(out)

    def until(self, cond: Callable[[], bool], timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            assert time.monotonic() < deadline, "timed out"
            if self.engine.has_unfinished_requests():
                self.step()
            else:
                time.sleep(0.05)


class DaemonProcess:
    """tokencaked as a child process that a test can kill and start again on one socket."""

    def __init__(self, workdir: Path, instance: str, policy: str = "tokencake") -> None:
        self.policy = policy
        self.workdir = workdir
        self.sock = workdir / "tokencaked.sock"
        self.endpoint = f"ipc://{self.sock}"
        self.instance = instance
        self.log = workdir / "tokencaked.log"
        self._daemon: Any = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self._daemon.proc if self._daemon is not None else None

    def start(self, timeout_s: float = 20.0) -> None:
        from tokencake.clients.launcher import daemon_flags, spawn

        self._daemon = spawn(
            *daemon_flags(arena="64MiB", policy=self.policy),
            endpoint=self.endpoint,
            instance=self.instance,
            workdir=self.workdir,
            log_path=self.log,
            inherit_settings=True,
        )
        self._daemon.wait_ready(timeout_s)

    def kill(self) -> None:
        if self._daemon is not None:
            self._daemon.kill9()
        self._daemon = None

    def stop(self) -> None:
        if self._daemon is not None:
            self._daemon.stop()
        self._daemon = None


def run_phase_process(
    script: str, phase: str, model: Path, endpoint: str, *extra: str
) -> dict[str, Any]:
    """``script --phase PHASE --model MODEL --endpoint ENDPOINT EXTRA`` in a Python of its own
    (one vLLM engine per process): the JSON of its last line of output (vLLM may print
    before it). A failed phase prints the tail of its stderr and exits."""
    cmd = [sys.executable, script, "--phase", phase, "--model", str(model)]
    cmd += ["--endpoint", endpoint, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"phase {phase} failed")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def shutdown_engine(llm: Any) -> None:
    """Shut an in-process engine down, including vLLM's process-wide worker connector, so a
    later engine in the same process builds its own instead of inheriting this one."""
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    llm.llm_engine.engine_core.shutdown()
    ensure_kv_transfer_shutdown()
