"""The simulator against the engine (``bench/bench_engine.py``): a simulator profile fitted to an
engine run's measured steps and copy speed, the same apps replayed in ``tokencake-sim``'s
engine as each engine setup schedules them, and the comparison, setup by setup and call by
call.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, replace
from typing import Any

SIM_POLICY = {"plain": "vllm", "lmcache": "lru-offload", "continuum": "continuum"}
SIM_POLICY["tokencake"] = "tokencake"
"""The simulator policy that models each setup. ``swap`` (offload at every tool call, no
policy) has none."""
RANKED = {"tokencake"}
"""Setups whose engine runs ``TokenCakeScheduler`` (the daemon's admission order, guard and
preemption victim). The others run vLLM's own FCFS scheduler whatever the daemon decides."""


@dataclass(slots=True, frozen=True)
class StepFit:
    """An engine's measured step time: steps in which every request moved one token
    (decoding) take ``decode_s``; the others ``prefill_s + s_per_token x tokens +
    s_per_pair x attention pairs`` (the (query, key) pairs the step attends: a chunk of
    ``c`` tokens on ``s`` computed ones attends ``c*s + c*(c+1)/2``). Steps the fit left
    out (``outliers``: which step, tokens, requests, seconds, the fit's seconds) are
    listed, not hidden."""

    decode_s: float
    prefill_s: float
    s_per_token: float
    steps: int
    s_per_pair: float = 0.0
    outliers: tuple[tuple[str, int, int, float, float], ...] = ()
    between_s: float = 0.0
    """The driver's time from one busy step's end to the next one's start (submissions,
    outputs; the mean gap under ``BUSY_GAP_S`` between two steps that did work), which
    the simulator adds to every step: its steps follow each other with no gap."""

    def __str__(self) -> str:
        pair = f" + {self.s_per_pair * 1e9:.0f} ns x pairs" if self.s_per_pair else ""
        gap = f", {self.between_s * 1e3:.1f} ms between steps" if self.between_s else ""
        out = (
            f"decode-only steps {self.decode_s * 1e3:.0f} ms, others "
            f"{self.prefill_s * 1e3:.0f} ms + {self.s_per_token * 1e3:.2f} ms x tokens{pair}"
            f"{gap} ({self.steps} steps"
        )
        if self.outliers:
            out += f"; {len(self.outliers)} left out: " + ", ".join(
                f"{i} ({t} tokens, {r} requests) {s:.2f} s, fit {f:.2f} s"
                for i, t, r, s, f in self.outliers[:5]
            )
            out += ", ..." if len(self.outliers) > 5 else ""
        return out + ")"


OUTLIER_RATIO = 2.0
"""A step is left out of the fit when it took more than this many times the fit's time, or
less than its inverse, and at least ``OUTLIER_MIN_S`` off: a stall of another kind (a
compile, a page fault storm, the machine's other load), not a point of the cost model."""
OUTLIER_MIN_S = 0.05
BUSY_GAP_S = 0.05
"""A gap between two steps that did work longer than this is the engine waiting (for a
tool call's end), not the driver's time between steps."""


def _nonneg_lstsq(x: Any, y: Any) -> Any:
    """Least squares with coefficients >= 0: a negative one is dropped (0) and the rest
    refitted, until none is negative (costs do not go negative)."""
    import numpy as np

    keep = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while keep:
        sol, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        if (sol >= 0).all():
            coef[keep] = sol
            break
        keep.pop(int(np.argmin(sol)))
    return coef


def _outliers(took: Any, fit: Any) -> Any:
    import numpy as np

    ratio = took / np.maximum(fit, 1e-9)
    off = (ratio > OUTLIER_RATIO) | (ratio < 1 / OUTLIER_RATIO)
    return off & (np.abs(took - fit) > OUTLIER_MIN_S)


def fit_steps(steps: list[list[float]], names: list[str] | None = None) -> StepFit:
    """The mean of the decode-only steps, and least squares (non-negative) over the others
    on tokens and, where the run recorded them, attention pairs; steps far off the fit
    (``OUTLIER_RATIO``; decode steps against their median) are left out and listed.

    On this CPU engine a decode step of 1-8 requests costs about the same (about 1 s on the
    loaded machine), while one line through every step put 1.85-2.03 s on each of them.
    A prefill's cost grows with its context: attention is quadratic in a chunk's length.
    ``names``: what to call each step in the list of outliers (default ``step N``).
    """
    import numpy as np

    rows = [
        (i, s[0], s[1], s[2], s[3] if len(s) > 3 else 0.0)
        for i, s in enumerate(steps)
        if s[0] > 0 and s[2] > 0
    ]
    arr = np.asarray(rows, dtype=float).reshape(-1, 5)
    decode = arr[:, 1] == arr[:, 2]
    rest = arr[~decode]
    if not decode.any() or len(rest) < 3:
        raise ValueError(f"too few steps to fit: {int(decode.sum())} decode, {len(rest)} other")
    dec_t = arr[decode, 3]
    dec_out = _outliers(dec_t, np.full(len(dec_t), float(np.median(dec_t))))
    x = np.stack([np.ones(len(rest)), rest[:, 1], rest[:, 4]], axis=1)
    out = np.zeros(len(rest), dtype=bool)
    for _ in range(5):  # refit without the outliers until they stay the same
        coef = _nonneg_lstsq(x[~out], rest[~out, 3])
        new = _outliers(rest[:, 3], x @ coef)
        if (new == out).all() or (~new).sum() < 3:
            break
        out = new
    decode_s = float(dec_t[~dec_out].mean())
    left = [(r, decode_s) for r in arr[decode][dec_out]] + [
        (r, float(x[j] @ coef)) for j, r in enumerate(rest) if out[j]
    ]
    name = names or [f"step {i}" for i in range(len(steps))]
    listed = tuple(
        (name[int(r[0])], int(r[1]), int(r[2]), float(r[3]), f)
        for r, f in sorted(left, key=lambda t: float(t[0][0]))
    )
    return StepFit(
        decode_s,
        float(coef[0]),
        float(coef[1]),
        len(arr) - len(listed),
        s_per_pair=float(coef[2]),
        outliers=listed,
        between_s=_between(steps),
    )


def _between(steps: list[list[float]]) -> float:
    """The mean gap from a step's end to the next step's start, over consecutive steps
    that both did work and are at most ``BUSY_GAP_S`` apart (0 for runs that did not log
    the steps' starts). The mean, not the median: most gaps are some 20 µs, and the few of
    a few ms (a call submitted, its prompt built) are the time that adds up."""
    import numpy as np

    gaps = [
        b[4] - a[4] - a[2]
        for a, b in itertools.pairwise(steps)
        if len(a) > 4 and len(b) > 4 and a[0] > 0 and b[0] > 0 and a[2] > 0 and b[2] > 0
    ]
    busy = [g for g in gaps if -1e-3 <= g <= BUSY_GAP_S]
    return max(0.0, float(np.mean(busy))) if busy else 0.0


def measure_copy(block_bytes: int, blocks: int = 64, reps: int = 5) -> float:
    """Bytes/s of copying ``blocks`` KV blocks between scattered engine blocks and a host
    buffer, as the connector's CPU copier does (best of ``reps``, both directions)."""
    import numpy as np

    rng = np.random.default_rng(0)
    engine = np.ones((blocks * 2, block_bytes), dtype=np.uint8)
    host = np.zeros((blocks, block_bytes), dtype=np.uint8)
    ids = rng.permutation(blocks * 2)[:blocks]
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        host[:] = engine[ids]
        engine[ids] = host
        best = min(best, (time.perf_counter() - t) / 2)
    return blocks * block_bytes / best


def engine_profile(
    name: str, fit: StepFit, copy_bps: float, gpu_blocks: int, max_len: int, shape: Any = None
) -> Any:
    """A simulator profile whose step time is the fit and whose host link is the copy;
    ``shape``: the engine's ``ModelShape`` (default: the bench's 12-layer model)."""
    from bench.common.vllm_apps import ModelShape, count_params
    from tokencake.sim.profiles import GpuSpec, ModelSpec, Profile

    shape = shape or ModelShape()
    params = count_params(shape)
    # q_heads 0 when the fit has no attention term (a run that did not record pairs): the
    # attention cost is then inside the fitted slope, not added on top of it.
    heads = shape.heads if fit.s_per_pair > 0 else 0
    model = ModelSpec(
        "llama-random", params, shape.layers, heads, shape.kv_heads, shape.head_dim, 4
    )
    # Linear in tokens: compute = 2 x params x tokens / peak = b x tokens; attention at its
    # own rate, attn_flops_per_pair x pairs / (peak x attn_mfu) = c x pairs; memory bandwidth
    # so high that the fixed cost is all ``a`` (the step overhead).
    peak = 2 * params / fit.s_per_token if fit.s_per_token > 0 else 1e30
    attn_mfu = model.attn_flops_per_pair / (peak * fit.s_per_pair) if heads else None
    cpu = GpuSpec(
        "cpu-fit", mem_bytes=0.0, peak_flops=peak, hbm_bytes_per_s=1e18, host_bytes_per_s=copy_bps
    )
    return Profile(
        name=name,
        model=model,
        gpu=cpu,
        gpu_mem_util=1.0,
        reserve_bytes=0.0,
        block_tokens=32,
        mfu=1.0,
        mbu=1.0,
        step_overhead_s=fit.prefill_s + fit.between_s,
        decode_step_s=fit.decode_s + fit.between_s,
        max_batched_tokens=max(1024, max_len),  # as bench/common/vllm_apps.setup_kwargs
        max_num_seqs=8,
        copy_overhead_s=0.0,
        host_kv_bytes=float(4 * gpu_blocks * 32 * model.kv_bytes_per_token),
        source="bench/bench_engine.py: fitted to the engine's measured steps",
        fixed_gpu_blocks=gpu_blocks - 1,  # vLLM keeps block 0 as its null block
        attn_mfu=attn_mfu,
    )


def run_sim(apps: dict[str, Any], profile: Any, setups: list[str]) -> dict[str, dict[str, Any]]:
    import numpy as np

    from bench.common.vllm_apps import AppSet, build_trace
    from tokencake.daemon.scheduler import create_policy
    from tokencake.sim.calltrace import CallTrace
    from tokencake.sim.engine import Simulator
    from tokencake.sim.runner import policy_config

    out: dict[str, dict[str, Any]] = {}
    for setup in setups:
        if setup not in SIM_POLICY:
            continue
        trace = build_trace(AppSet(**apps))
        policy = create_policy(SIM_POLICY[setup], policy_config(profile))
        if setup not in RANKED:
            vllm_scheduled(policy)
        # vLLM's block pool evicts least recently used whatever the policy (pins hold blocks).
        calls = CallTrace(profile.block_tokens)
        # TokenCakeScheduler's pins give way to a request they keep out; vLLM's do not.
        sim = Simulator(
            trace,
            policy,
            profile,
            lru_eviction=True,
            call_trace=calls,
            vllm_rules=True,
            pin_yield=setup in RANKED,
        )
        res = sim.run()
        per_call = calls.calls()
        out[setup] = {
            "policy": SIM_POLICY[setup],
            "mean_latency_s": float(np.mean(res.app_latency_s)),
            "p95_latency_s": float(np.percentile(res.app_latency_s, 95)),
            "critical_path_latency_s": float(np.mean(res.critical_llm_s)),
            "recompute_tokens": sim.c.recompute_tokens,
            "recomputed_tokens": lost_prefix(per_call),
            "preemptions": sim.c.preemptions,
            "pins_yielded": sim.pins_yielded,
            "trace": per_call,
        }
    return out


SPREAD = (0.97, 0.98, 0.99, 1.01, 1.02, 1.03)
"""Factors on every step time for ``sim_spread``."""


def sim_spread(
    apps: dict[str, Any],
    fit: StepFit,
    copy_bps: float,
    blocks: int,
    max_len: int,
    shape: Any,
    setups: list[str],
) -> dict[str, tuple[float, float]]:
    """Each setup's simulated mean app latency, lowest and highest, with every step time
    of ``fit`` scaled by each factor of ``SPREAD`` (and by 1): under memory pressure which
    prefixes LRU evicts turns on the order of events within a step or two, so a few percent
    on the step times can move a run's recompute, and its latency, by more than that."""
    out: dict[str, list[float]] = {k: [] for k in setups}
    for f in (1.0, *SPREAD):
        scaled = replace(
            fit,
            decode_s=fit.decode_s * f,
            prefill_s=fit.prefill_s * f,
            s_per_token=fit.s_per_token * f,
            s_per_pair=fit.s_per_pair * f,
            between_s=fit.between_s * f,
        )
        prof = engine_profile(f"x{f}", scaled, copy_bps, blocks, max_len, shape)
        for k, r in run_sim(apps, prof, setups).items():
            out[k].append(r["mean_latency_s"])
    return {k: (min(v), max(v)) for k, v in out.items()}


def vllm_scheduled(policy: Any) -> None:
    """The engine runs vLLM's own scheduler: admission in arrival order (the simulator's
    waiting list is in that order, preempted requests first, as vLLM's), no allocation
    guard, the last running request preempted. The policy's decisions (pins, offloads,
    uploads) still reach the engine through the connector."""
    setattr(policy, "admission_order", lambda waiting, now: list(waiting))  # noqa: B010
    setattr(policy, "may_allocate", lambda *args: True)  # noqa: B010
    policy.ranks_running = False


def sim_table(real: dict[str, dict[str, Any]], sim: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| setup | simulator policy | engine mean app latency (s) | simulator (s) | sim/engine "
        "| recomputed tokens, engine / simulator |",
        "|---|---|---|---|---|---|",
    ]
    for setup, s in sim.items():
        r = real[setup]["mean_latency_s"]
        d = (s["mean_latency_s"] - r) / r
        flag = "" if abs(d) <= 0.15 else " (outside 15 %)"
        rec = f"{real[setup]['recomputed_tokens']:,} / {s['recomputed_tokens']:,}"
        lines.append(
            f"| {setup} | {s['policy']} | {r:.1f} | {s['mean_latency_s']:.1f} | {d:+.1%}{flag} "
            f"| {rec} |"
        )
    rank_real = sorted(sim, key=lambda k: real[k]["mean_latency_s"])
    rank_sim = sorted(sim, key=lambda k: sim[k]["mean_latency_s"])
    same = "same" if rank_real == rank_sim else "DIFFERENT"
    lines.append(
        f"\nranking by mean app latency, engine: {' < '.join(rank_real)}; simulator: "
        f"{' < '.join(rank_sim)} ({same})"
    )
    return "\n".join(lines)


def lost_prefix(calls: dict[str, dict[str, Any]]) -> int:
    """Tokens an earlier call of the app had computed and the prefix cache had lost by the
    call's admission: the engine bench's "recomputed tokens"."""
    return sum(max(0, c["reusable"] - c["cached"]) for c in calls.values())


def trace_diff(real: dict[str, dict[str, Any]], sim: dict[str, dict[str, Any]]) -> str:
    """Call by call, in the engine's submit order: times (submitted, first scheduled,
    finished; seconds from the run's start), the prefix an earlier call left (``reusable``,
    and which call) and what the prefix cache still had of it at admission, engine / sim."""

    def t(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    lines = [
        "| call | submitted | scheduled | finished | prompt | reusable (from) | cached "
        "| preempted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(real, key=lambda k: real[k]["submit_s"] or 0.0):
        e, m = real[key], sim.get(key)
        if m is None:
            lines.append(f"| {key} | not simulated |")
            continue
        mark = " **" if e["cached"] != m["cached"] else ""
        lines.append(
            f"| {key} | {t(e['submit_s'])} / {t(m['submit_s'])} "
            f"| {t(e['scheduled_s'])} / {t(m['scheduled_s'])} "
            f"| {t(e['finish_s'])} / {t(m['finish_s'])} | {e['prompt']} "
            f"| {e['reusable']} / {m['reusable']} ({e['source'] or '-'}) "
            f"| {e['cached']} / {m['cached']}{mark} | {e['preemptions']} / {m['preemptions']} |"
        )
    lost_e, lost_s = lost_prefix(real), lost_prefix(sim)
    differ = sum(1 for k in real if k in sim and real[k]["cached"] != sim[k]["cached"])
    lines.append(
        f"\n{differ} of {len(real)} calls found a different cached prefix; reusable tokens "
        f"lost (recomputed), engine / simulator: {lost_e:,} / {lost_s:,}"
    )
    return "\n".join(lines)


def simulate(
    meta: dict[str, Any],
    results: dict[str, dict[str, Any]],
    copy_bps: float | None = None,
    trace_setups: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Calibrate a profile from every setup's steps and this machine's copy speed, replay
    the same apps in the simulator, print the comparison. Raises ``ValueError`` when the
    run has too few steps to fit."""
    from bench.common.vllm_apps import ModelShape, kv_bytes_per_block

    shape = ModelShape(**meta["model"]) if "model" in meta else ModelShape()
    blocks, max_len = meta["gpu_blocks"], meta["max_model_len"]
    ran = [k for k, r in results.items() if "error" not in r]
    # Every setup's steps: each setup ran at its own moment of the machine's load, and
    # plain vLLM's alone carry the load of one moment.
    steps = [s for k in ran for s in results[k]["steps"]]
    names = [f"{k} step {i}" for k in ran for i in range(len(results[k]["steps"]))]
    fit = fit_steps(steps, names)
    copy_what = "recorded"
    if copy_bps is None:
        copy_bps = measure_copy(kv_bytes_per_block(shape))
        copy_what = "numpy block gather/scatter, best of 5"
    profile = engine_profile("cpu-fit", fit, copy_bps, blocks, max_len, shape)
    sim = run_sim(meta["apps"], profile, ran)
    print(
        f"\nsimulator profile: {fit}, every setup's steps; "
        f"host copy {copy_bps / 1e9:.2f} GB/s ({copy_what})"
    )
    for k in ran:
        warm = results[k].get("warmup")
        if warm:
            print(f"{k} warm-up: " + ", ".join(f"{w} {t:.2f} s" for w, t in warm))
    print(sim_table(results, sim))
    spread = sim_spread(meta["apps"], fit, copy_bps, blocks, max_len, shape, list(sim))
    print(
        f"\nthe simulator with every step {SPREAD[0] - 1:+.0%} .. {SPREAD[-1] - 1:+.0%} "
        "(how much its answer moves with the step times alone): "
        + "; ".join(
            f"{k} {lo:.1f}-{hi:.1f} s ({lo / eng - 1:+.1%} to {hi / eng - 1:+.1%})"
            for k, (lo, hi) in spread.items()
            for eng in [results[k]["mean_latency_s"]]
        )
    )
    # Diagnosis, not the comparison: each setup with a fit of its own steps only, i.e. at
    # the machine's speed while that setup ran. What is left is not the machine's load.
    own: dict[str, dict[str, Any]] = {}
    decode: list[float] = []
    for k in sim:
        own_fit = fit_steps(results[k]["steps"])
        decode.append(own_fit.decode_s)
        own_profile = engine_profile(f"{k}-own-fit", own_fit, copy_bps, blocks, max_len, shape)
        own.update(run_sim(meta["apps"], own_profile, [k]))
        print(f"{k}: its own steps: {own_fit}")
    print("\neach setup simulated with a fit of its own steps (diagnosis):")
    print(sim_table(results, own))
    if len(decode) > 1 and max(decode) > 1.15 * min(decode):
        print(
            f"\nThe setups' own decode steps took {min(decode) * 1e3:.0f}-"
            f"{max(decode) * 1e3:.0f} ms ({max(decode) / min(decode):.1f}x): the machine's "
            "speed changed between setups, and the first table (one fit for all) carries "
            "that; the second one does not. Judge the model on a quiet machine."
        )
    for k in trace_setups:
        if k in sim and "trace" in results[k]:
            print(f"\n{k}, call by call, engine / simulator (own steps' fit):")
            print(trace_diff(results[k]["trace"], own[k]["trace"]))
    return {
        "decode_step_s": fit.decode_s,
        "step_overhead_s": fit.prefill_s,
        "s_per_token": fit.s_per_token,
        "s_per_pair": fit.s_per_pair,
        "outliers": fit.outliers,
        "copy_bytes_per_s": copy_bps,
        "between_s": fit.between_s,
        "spread": spread,
        "runs": sim,
        "own_fit_runs": own,
    }
