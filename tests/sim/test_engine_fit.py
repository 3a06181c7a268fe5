"""The engine bench's step-time fit (``bench/common/engine_sim.py``) and the profile it
builds: a cost per token and per attention pair, stalls listed instead of fitted, and the
simulator's step time on that profile equal to the fit."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from bench.common.app_driver import step_pairs
from bench.common.engine_sim import StepFit, engine_profile, fit_steps
from bench.common.vllm_apps import TINY_SHAPE, ModelShape
from tokencake.sim.profiles import get_profile

A, B, C, DECODE = 0.012, 0.6e-3, 0.3e-6, 0.021
"""Intercept, seconds per token, seconds per pair, decode step: the synthetic engine."""


def _pairs(chunks: list[tuple[int, int]]) -> float:
    """(context, chunk) pieces of a step: the pairs it attends, as the engine model counts."""
    return sum(c * s + c * (c + 1) / 2 for s, c in chunks)


def _steps() -> list[list[float]]:
    """Prefills of many sizes at many contexts, decode steps of 1-6 requests, exactly on the
    synthetic engine's cost; step 0 is a 20 s stall (a compile) and step 7 a slow decode."""
    steps: list[list[float]] = []
    for i, (ctx, chunk, reqs) in enumerate(
        (s, c, r) for s in (0, 300, 900, 1500) for c in (32, 200, 579, 1100) for r in (1, 3)
    ):
        pieces = [(ctx, chunk)] + [(ctx + 40 * j, 1) for j in range(1, reqs)]
        tokens = chunk + reqs - 1
        pairs = _pairs(pieces)
        steps.append([tokens, reqs, A + B * tokens + C * pairs, pairs])
        steps.append([1 + i % 6, 1 + i % 6, DECODE, _pairs([(700, 1)] * (1 + i % 6))])
    steps[0][2] = 20.0
    steps[7][2] = 0.2
    return steps


def test_the_fit_recovers_token_and_pair_costs_and_lists_the_stalls() -> None:
    steps = _steps()
    fit = fit_steps(steps)
    assert fit.prefill_s == pytest.approx(A, rel=1e-6)
    assert fit.s_per_token == pytest.approx(B, rel=1e-6)
    assert fit.s_per_pair == pytest.approx(C, rel=1e-6)
    assert fit.decode_s == pytest.approx(DECODE)
    assert [o[0] for o in fit.outliers] == ["step 0", "step 7"]
    # (which, tokens, requests, seconds, the fit's seconds): a 32-token prefill from scratch.
    assert fit.outliers[0][1:4] == (32, 1, 20.0)
    assert fit.outliers[0][4] == pytest.approx(A + B * 32 + C * _pairs([(0, 32)]))
    assert fit.steps == len(steps) - 2
    assert "2 left out: step 0" in str(fit)
    names = [f"plain step {i}" for i in range(len(steps))]
    assert fit_steps(steps, names).outliers[0][0] == "plain step 0"


def test_a_run_without_pairs_fits_tokens_only_and_costs_stay_non_negative() -> None:
    old = [s[:3] for s in _steps()[2:]]  # the 3-field steps of runs before pairs were logged
    fit = fit_steps(old)
    assert fit.s_per_pair == 0.0
    assert fit.s_per_token > B  # attention's cost is inside the slope
    # A line through steps that get cheaper with size has a negative slope: dropped to 0.
    falling = [[t, 1, 1.0 - t * 1e-4] for t in (10, 100, 500, 900)] + [[1, 1, 0.02]]
    fit = fit_steps(falling)
    assert fit.s_per_token == 0.0 and fit.prefill_s > 0


def test_too_few_steps_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="too few steps"):
        fit_steps([[100, 1, 0.1, 5050.0], [1, 1, 0.02, 700.0]])


@pytest.mark.parametrize("shape", [ModelShape(), TINY_SHAPE])
def test_the_simulator_on_the_fitted_profile_takes_the_fitted_time(shape: ModelShape) -> None:
    fit = StepFit(DECODE, A, B, 100, s_per_pair=C)
    prof = engine_profile("t", fit, 1e9, 64, 2016, shape)
    assert prof.model.q_heads == shape.heads and prof.attn_mfu is not None
    for ctx, chunk in ((0, 579), (1500, 32), (900, 1100)):
        pairs = _pairs([(ctx, chunk)])
        want = A + B * chunk + C * pairs
        assert prof.step_s(chunk, pairs, ctx + chunk) == pytest.approx(want, rel=1e-9)
    assert prof.step_s(3, 2103.0, 2103.0) == DECODE  # three decodes
    # Without a pair cost the profile has no attention term at all, as before.
    flat = engine_profile("t", replace(fit, s_per_pair=0.0), 1e9, 64, 2016, shape)
    assert flat.model.q_heads == 0 and flat.attn_mfu is None
    assert flat.step_s(579, _pairs([(900, 579)]), 1479) == pytest.approx(A + B * 579)


def test_attention_at_its_own_rate_equals_the_shared_rate_when_they_are_equal() -> None:
    """``attn_mfu`` splits the compute time; set to ``mfu`` it is the roofline as before
    (which the built-in GPU profiles keep: ``attn_mfu`` None)."""
    for name in ("qwen2.5-14b-a800", "llama3.1-8b-h100"):
        prof = get_profile(name)
        assert prof.attn_mfu is None
        split = replace(prof, attn_mfu=prof.mfu)
        for tokens, pairs, kv in ((4096, 4096 * 2048.0, 6144.0), (64, 64 * 9000.0, 9000.0)):
            assert split.step_s(tokens, pairs, kv) == pytest.approx(
                prof.step_s(tokens, pairs, kv), rel=1e-12
            )
        slow = replace(prof, attn_mfu=prof.mfu / 4)
        assert slow.step_s(4096, 4096 * 2048.0, 6144.0) > prof.step_s(4096, 4096 * 2048.0, 6144.0)


def test_step_pairs_reads_new_and_running_requests_of_a_vllm_step() -> None:
    """A new request on a 320-token cached prefix, scheduled for 100 tokens, and a running
    one decoding at 700 computed tokens."""
    out = SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id="a", num_computed_tokens=320)],
        scheduled_cached_reqs=SimpleNamespace(req_ids=["b"], num_computed_tokens=[700]),
        num_scheduled_tokens={"a": 100, "b": 1},
    )
    assert step_pairs(out) == 100 * 320 + 100 * 101 / 2 + 700 + 1


def test_the_drivers_time_between_busy_steps_is_added_to_every_simulated_step() -> None:
    """Steps logged with their starts: 3 ms from each step's end to the next one's start
    while the engine is busy; a 2 s wait for a tool call's end is not driver time."""
    steps: list[list[float]] = []
    t = 0.0
    for i in range(12):
        tokens, dur = (200, A + B * 200) if i % 3 == 0 else (2, DECODE)
        steps.append([tokens, 2 if tokens == 2 else 1, dur, 1000.0 * tokens, t])
        t += dur + (2.0 if i == 5 else 0.003)
    fit = fit_steps(steps)
    assert fit.between_s == pytest.approx(0.003, abs=1e-9)
    assert "3.0 ms between steps" in str(fit)
    prof = engine_profile("t", fit, 1e9, 64, 2016)
    assert prof.decode_step_s == pytest.approx(fit.decode_s + 0.003)
    assert prof.step_overhead_s == pytest.approx(fit.prefill_s + 0.003)
    # Runs that did not log the starts have no gap term.
    assert fit_steps([s[:4] for s in steps]).between_s == 0.0
