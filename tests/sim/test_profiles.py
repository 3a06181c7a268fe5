"""Step-time models of the profiles: the roofline, and the measured decode step of a CPU fit."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tokencake.daemon.scheduler import create_policy
from tokencake.sim.engine import Simulator
from tokencake.sim.profiles import get_profile
from tokencake.sim.runner import policy_config
from tokencake.sim.workload import AppSpec, NodeSpec, SegmentIds, Trace, compose

CPU_FIT = get_profile("llama-79m-cpu")


def _counts(chunks: list[tuple[int, int]]) -> tuple[int, float, float]:
    """(tokens, attention pairs, KV tokens read) of a step, summed as the engine model sums
    them, for (context, chunk) pieces."""
    tokens, pairs, kv = 0, 0.0, 0.0
    for s, c in chunks:
        tokens += c
        pairs += c * s + c * (c + 1) / 2
        kv += s + c
    return tokens, pairs, kv


def test_a_decode_step_takes_the_measured_time_whatever_the_batch() -> None:
    assert CPU_FIT.decode_step_s is not None
    for batch in ([(700, 1)], [(10, 1), (1500, 1), (2900, 1)], [(0, 1)] * 8):
        assert CPU_FIT.step_s(*_counts(batch)) == CPU_FIT.decode_step_s
    # A prefill chunk, alone or beside decodes, is on the fitted line instead.
    line = CPU_FIT.step_overhead_s + 2.0 * CPU_FIT.model.params / CPU_FIT.gpu.peak_flops
    for batch in ([(0, 100)], [(0, 100), (900, 1)], [(64, 2)]):
        tokens, pairs, kv = _counts(batch)
        assert pairs > kv
        assert CPU_FIT.step_s(tokens, pairs, kv) == pytest.approx(
            CPU_FIT.step_overhead_s + tokens * (line - CPU_FIT.step_overhead_s)
        )
    # Said outright, the flag wins over the counts.
    tokens, pairs, kv = _counts([(700, 1), (20, 1)])
    assert CPU_FIT.step_s(tokens, pairs, kv, decode_only=False) > CPU_FIT.decode_step_s
    assert CPU_FIT.step_s(*_counts([(0, 50)]), decode_only=True) == CPU_FIT.decode_step_s


def test_without_a_measured_decode_step_every_step_is_the_roofline() -> None:
    roofline = replace(CPU_FIT, decode_step_s=None)
    tokens, pairs, kv = _counts([(700, 1), (20, 1)])
    assert roofline.step_s(tokens, pairs, kv) == roofline.step_s(tokens, pairs, kv, False)
    a800 = get_profile("qwen2.5-14b-a800")
    assert a800.decode_step_s is None
    assert a800.step_s(tokens, pairs, kv) == a800.step_s(tokens, pairs, kv, decode_only=False)


def test_a_simulated_call_takes_one_prefill_and_one_decode_step_per_further_token() -> None:
    """320 prompt tokens and 5 output tokens on the fitted CPU profile: the prefill step
    makes the first token, four decode steps the rest."""
    prompt, output = 320, 5
    app = AppSpec("app-0", "one-call", [NodeSpec("a", "agent", output_tokens=output)], prompt)
    compose(app, SegmentIds())
    sim = Simulator(
        Trace("one-call", 0, 0.0, [app]),
        create_policy("vllm", policy_config(CPU_FIT)),
        CPU_FIT,
    )
    res = sim.run()
    assert CPU_FIT.decode_step_s is not None
    prefill = CPU_FIT.step_s(*_counts([(0, prompt)]))
    assert res.app_latency_s == [pytest.approx(prefill + (output - 1) * CPU_FIT.decode_step_s)]
    assert sim.c.steps == output
