"""A per-call record of a simulated run, in the terms ``bench/bench_engine.py`` records on the
real engine: when each call was submitted, first admitted (its prefix-cache lookup), and
finished; its prompt; how much of it an earlier finished call of the app had computed
(``reusable``); how much the GPU prefix cache and the host gave it at its first admission
(``cached``, ``loaded``); how often it was preempted.

``reusable`` and ``cached`` are counted as the engine bench counts them: full blocks, at most
the prompt less its last token; only the first admission counts (vLLM reports
``num_cached_tokens`` for a request's first scheduling only, not after a preemption), so
``reusable - cached`` is the prefix an earlier call left and the cache had lost by then.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tokencake.sim.records import Request


@dataclass(slots=True)
class CallRecord:
    submit_s: float
    prompt: int
    reusable: int
    source: str
    scheduled_s: float | None = None
    finish_s: float | None = None
    cached: int = 0
    loaded: int = 0
    preemptions: int = 0


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class CallTrace:
    """Fed by the simulator (``Simulator(call_trace=CallTrace(bt))``); read with ``calls``."""

    def __init__(self, block_tokens: int) -> None:
        self.bt = block_tokens
        self.records: dict[str, CallRecord] = {}
        self._left: dict[str, dict[str, list[int]]] = {}
        """Per app: each finished call's chain keys (the KV it left), by call."""

    @staticmethod
    def key(req: Request) -> str:
        return f"{req.app.spec.app_id}/{req.node.id}"

    def submitted(self, req: Request, now: float) -> None:
        left = self._left.setdefault(req.app.spec.app_id, {})
        # The KV a finished call left covers its prompt and output but the last token.
        last_full = (req.prompt_tokens + req.output_tokens - 1) // self.bt
        common = {k: _common(req.keys, keys[:last_full]) for k, keys in left.items()}
        source = max(common, key=lambda k: common[k], default="")
        blocks = min(common.get(source, 0), (req.prompt_tokens - 1) // self.bt)
        self.records[self.key(req)] = CallRecord(
            now, req.prompt_tokens, blocks * self.bt, source if blocks else ""
        )

    def admitted(self, req: Request, now: float, gpu_blocks: int, host_blocks: int) -> None:
        rec = self.records[self.key(req)]
        if rec.scheduled_s is None:
            rec.scheduled_s = now
            rec.cached = (gpu_blocks + host_blocks) * self.bt
            rec.loaded = host_blocks * self.bt

    def preempted(self, req: Request) -> None:
        self.records[self.key(req)].preemptions += 1

    def finished(self, req: Request, now: float) -> None:
        self.records[self.key(req)].finish_s = now
        self._left[req.app.spec.app_id][self.key(req)] = req.keys

    def calls(self) -> dict[str, dict[str, Any]]:
        return {k: asdict(r) for k, r in self.records.items()}
