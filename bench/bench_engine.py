"""Whole agent apps on a real vLLM-CPU engine: plain vLLM, LMCache, swap, Continuum, TokenCake.

    python bench/bench_engine.py [--code-writer 3] [--react 1] [--qps 0.1] [--gpu-blocks 120]
        [--setups plain,lmcache,swap,continuum,tokencake] [--lmcache-python PY]
        [--json out.json] [--plot docs/img/bench_engine.png]

The apps are the simulator's, scaled to fit a CPU engine (``bench/common/
vllm_apps.py``): the authors' Code-Writer DAG (27 LLM calls, 18 tool waits) and ReAct
coding chains, contexts x1/8, outputs x1/64, tool times x1/4 (at most 3 s), arriving as a
Poisson process; tool calls really sleep. The model is a random-weight 12-layer Llama
(hidden 768, GQA 12/4 heads of 64, fp32), so a prefill costs far more than a copy; the
engine's KV pool is ``--gpu-blocks`` blocks of 32 tokens (``kv_cache_memory_bytes``, which
is what bounds the pool on vLLM-CPU).

Setups, each in its own child process (vLLM keeps its KV connector in a process-wide global),
one after the other, each with a fresh daemon:

* ``plain``: vLLM with prefix caching, nothing else;
* ``lmcache``: vLLM's ``LMCacheConnectorV1`` with LMCache's local CPU backend, run with
  ``--lmcache-python`` (a venv with ``lmcache==0.5.6``; see docs/benchmarks.md). When it
  cannot run, the error is recorded and reported;
* ``swap``: TokenCake's connector with ``tool_offload=always`` (store at every tool call and
  free the GPU blocks; load on the next call), no apps registered;
* ``continuum``: the connector (``tool_offload=daemon``), apps registered, the daemon's
  ``continuum`` policy (pin the KV across the tool call);
* ``tokencake``: the connector, apps registered, the daemon's ``tokencake`` policy and
  ``TokenCakeScheduler``.

Reported per setup: app latency (mean, p95), critical-path latency (the time the nodes on an
app's critical path spent in the engine, as the simulator defines it), prompt tokens
computed, recomputed (KV an earlier call of the app had computed) and loaded from the host,
time to first token of each continuation (a call after a tool call), and whether every call's
greedy tokens equal plain vLLM's (logprobs within 1e-3). Ratios are against plain vLLM in
the same run. The machine is shared: the load average is printed at the start and end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOGPROB_TOL = 1e-3


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_setup(cfg: dict[str, Any]) -> dict[str, Any]:
    """One setup, in this (child) process: build the engine, warm it up, run the apps."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    sys.path.insert(0, str(ROOT))
    from vllm import LLM

    from bench.common.app_driver import AppDriver
    from bench.common.vllm_apps import AppSet, build_trace, lmcache_start_error, setup_kwargs

    setup = cfg["setup"]
    trace = build_trace(AppSet(**cfg["apps"]))
    kwargs = setup_kwargs(
        setup,
        cfg["model"],
        kv_bytes=cfg["kv_bytes"],
        endpoint=cfg["endpoint"],
        max_model_len=cfg["max_model_len"],
    )
    llm = LLM(**kwargs)
    failed = lmcache_start_error(llm) if setup == "lmcache" else ""
    if failed:
        raise RuntimeError(f"LMCache did not start: {failed}")
    warmup = warm_up(llm, cfg["max_model_len"])
    client: Any = llm.llm_engine.engine_core  # in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    sched = client.engine_core.scheduler
    steps: list[tuple[int, int, float, float, float]] = []
    driver = AppDriver(
        llm,
        trace,
        agent_params=setup in ("swap", "continuum", "tokencake"),
        register=setup in ("continuum", "tokencake"),
        endpoint=cfg["endpoint"],
        decode_s=cfg["decode_s"],
        step_log=steps,
    )
    t0 = time.monotonic()
    driver.run(timeout_s=cfg["timeout_s"])
    out = driver.summary()
    out["setup"] = setup
    out["wall_s"] = time.monotonic() - t0
    out["outputs"] = driver.outputs_by_call()
    out["trace"] = driver.call_trace()
    out["steps"] = steps
    out["warmup"] = warmup
    conn = sched.connector
    out["connector"] = conn.get_stats() if conn is not None and hasattr(conn, "get_stats") else {}
    tc_stats = getattr(sched, "tc_stats", None)  # TokenCakeScheduler's (guard deferrals)
    out["scheduler"] = asdict(tc_stats) if tc_stats is not None else {}
    return out


WARM_TOKENS = (32, 128, 512, 1024)
"""Prompt lengths of the warm-up (and the longest prompt the engine takes)."""


def warm_up(llm: Any, max_model_len: int) -> list[tuple[str, float]]:
    """Run what the apps will run before the clock starts, the same way in every setup;
    returns (what, seconds) per warm-up batch.

    The apps ask for logprobs, and vLLM's sampler computes their ranks with a
    ``torch.compile``d function (``batched_count_greater_than``): its first call with a
    batch of one compiles it, its first call with a larger batch compiles it again for
    dynamic shapes. With an empty inductor cache (a fresh machine: ``/tmp/torchinductor_*``)
    that took 23.8 s inside the first setup's first step, and 2-3 s in each later setup
    (loading the cache): a warm-up without logprobs left it all to the timed run. So every
    prompt length the apps reach runs here with the apps' sampling parameters, alone and
    then batched, and the prefix cache is emptied after. Token ids no app uses (>= 500).
    """
    from vllm import SamplingParams

    warm = SamplingParams(temperature=0.0, max_tokens=3, logprobs=1, ignore_eos=True)
    lengths = sorted({n for n in WARM_TOKENS if n < max_model_len - 8} | {max_model_len - 8})
    seq = 0

    def prompt(n: int) -> Any:
        nonlocal seq
        seq += 1
        rng = random.Random(seq)  # distinct prompts: no prefix hits among them
        return {"prompt_token_ids": [rng.randrange(500, 508) for _ in range(n)]}

    out: list[tuple[str, float]] = []
    for batch in [[n] for n in lengths] + [[32] * 3, lengths[:-1] or lengths]:
        t = time.perf_counter()
        llm.generate([prompt(n) for n in batch], warm, use_tqdm=False)
        out.append(("+".join(map(str, batch)) + " tokens", time.perf_counter() - t))
    llm.reset_prefix_cache()
    return out


def _daemon_for(setup: str, work: Path, arena: str) -> Any:
    from bench.common.vllm_apps import DAEMON_POLICY
    from tokencake.clients.launcher import daemon_flags, launch

    if setup not in DAEMON_POLICY:
        return None
    (work / setup).mkdir()
    return launch(
        *daemon_flags(arena=arena), "--policy", DAEMON_POLICY[setup], workdir=work / setup
    )


def compare(plain: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Greedy tokens per call equal to plain vLLM's; the largest logprob difference."""
    po, oo = plain["outputs"], other["outputs"]
    same = mismatched = 0
    worst = 0.0
    for key, (toks, lps) in po.items():
        if key not in oo:
            mismatched += 1
            continue
        t2, l2 = oo[key]
        if t2 != toks:
            mismatched += 1
            continue
        same += 1
        diffs = [abs(a - b) for a, b in zip(lps, l2, strict=True) if math.isfinite(a - b)]
        worst = max([worst, *diffs])
    return {"calls_identical": same, "calls_differing": mismatched, "max_logprob_diff": worst}


ROWS = (
    ("mean app latency (s)", "mean_latency_s", "{:.1f}"),
    ("p95 app latency (s)", "p95_latency_s", "{:.1f}"),
    ("critical-path latency (s)", "critical_path_latency_s", "{:.1f}"),
    ("prompt tokens computed", "prefill_computed_tokens", "{:,}"),
    ("recomputed tokens", "recomputed_tokens", "{:,}"),
    ("tokens loaded from the host", "loaded_tokens", "{:,}"),
    ("continuation TTFT mean (s)", "continuation_ttft_mean_s", "{:.2f}"),
    ("continuation TTFT p95 (s)", "continuation_ttft_p95_s", "{:.2f}"),
    ("run wall time (s)", "wall_s", "{:.0f}"),
)


def table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, key, fmt in ROWS:
        cells = []
        for n in names:
            r = results[n]
            cells.append(fmt.format(r[key]) if "error" not in r else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    base = results.get("plain", {})
    if "mean_latency_s" in base:
        cells = [
            f"{r['mean_latency_s'] / base['mean_latency_s']:.2f}x" if "error" not in r else "-"
            for r in results.values()
        ]
        lines.append("| mean app latency / plain | " + " | ".join(cells) + " |")
        cells = []
        for n, r in results.items():
            if "error" in r:
                cells.append("-")
            elif n == "plain":
                cells.append("(reference)")
            else:
                c = r["vs_plain"]
                tot = c["calls_identical"] + c["calls_differing"]
                cells.append(f"{c['calls_identical']}/{tot}, {c['max_logprob_diff']:.0e}")
        lines.append("| calls identical to plain, max logprob diff | " + " | ".join(cells) + " |")
    for n, r in results.items():
        if "error" in r:
            lines.append(f"\n`{n}` did not run: {r['error']}")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: r for n, r in results.items() if "error" not in r}
    names = list(ok)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = range(len(names))
    mean = [ok[n]["mean_latency_s"] for n in names]
    p95 = [ok[n]["p95_latency_s"] for n in names]
    axes[0].bar([i - 0.2 for i in x], mean, 0.4, label="mean")
    axes[0].bar([i + 0.2 for i in x], p95, 0.4, label="p95")
    axes[0].set_title("app latency (s)")
    axes[0].legend()
    rec = [ok[n]["recomputed_tokens"] for n in names]
    loaded = [ok[n]["loaded_tokens"] for n in names]
    axes[1].bar([i - 0.2 for i in x], rec, 0.4, label="recomputed")
    axes[1].bar([i + 0.2 for i in x], loaded, 0.4, label="loaded from host")
    axes[1].set_title("tokens")
    axes[1].legend()
    ttfts = [sorted(ok[n]["continuation_ttft_s"].values()) for n in names]
    axes[2].boxplot(ttfts)
    axes[2].set_title("continuation TTFT (s)")
    for ax in axes:
        ax.set_xticks(list(x) if ax is not axes[2] else [i + 1 for i in x])
        ax.set_xticklabels(names, rotation=20)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _child_result(setup: str, stdout: str) -> dict[str, Any]:
    """The child's result: its last line of output that is a JSON object (a library may
    print after it), or an error naming the last line."""
    lines = stdout.strip().splitlines()
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                out: dict[str, Any] = json.loads(line)
                return out
            except ValueError:
                break
    last = lines[-1][:200] if lines else "no output"
    return {"setup": setup, "error": f"no result from the child; its last line: {last}"}


def run_all(
    setups: list[str],
    apps: dict[str, Any],
    *,
    model: Path,
    kv_bytes: int,
    max_model_len: int,
    lmcache_python: str,
    decode_s: float,
    timeout_s: float,
    work: Path,
    arena: str,
    log: Any = None,
    partial: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Every setup in a child process; ``plain`` first (the others are compared with it)."""
    results: dict[str, dict[str, Any]] = {}
    for setup in setups:
        daemon = _daemon_for(setup, work, arena)
        cfg = {
            "setup": setup,
            "model": str(model),
            "kv_bytes": kv_bytes,
            "max_model_len": max_model_len,
            "endpoint": daemon.endpoint if daemon is not None else "",
            "apps": apps,
            "decode_s": decode_s,
            "timeout_s": timeout_s,
        }
        python = lmcache_python if setup == "lmcache" else sys.executable
        try:
            results[setup] = _run_child(cfg, python, timeout_s, log)
        finally:
            if daemon is not None:
                daemon.stop()
        print(f"[{setup}] done, load {_load()}", file=sys.stderr, flush=True)
        if partial is not None:  # a long run keeps what it measured so far
            partial.write_text(json.dumps(results))
    plain = results.get("plain")
    for r in results.values():
        if plain is not None and "error" not in plain and "error" not in r:
            r["vs_plain"] = compare(plain, r)
    return results


def _run_child(cfg: dict[str, Any], python: str, timeout_s: float, log: Any) -> dict[str, Any]:
    """One setup in its child process: its result, or the error it ended with (the child's
    stderr tail goes to ``log``)."""
    setup = cfg["setup"]
    env = dict(os.environ)
    if setup == "lmcache":
        # LMCache's local CPU backend, chunks of one vLLM block.
        env.update(
            LMCACHE_CHUNK_SIZE="32", LMCACHE_LOCAL_CPU="True", LMCACHE_MAX_LOCAL_CPU_SIZE="2"
        )
    try:
        proc = subprocess.run(
            [python, __file__, "--child", json.dumps(cfg)],
            capture_output=True,
            text=True,
            check=False,
            env=env,
            timeout=timeout_s + 300,
        )
    except subprocess.TimeoutExpired:
        return {"setup": setup, "error": f"no result within {timeout_s + 300:.0f} s"}
    if proc.returncode == 0:
        return _child_result(setup, proc.stdout)
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    why = next((ln for ln in reversed(err) if "Error" in ln or "error" in ln), "")
    if log is not None:
        log.write(proc.stderr[-6000:])
    return {"setup": setup, "error": why or (err[-1] if err else "no output")}


SMOKE_BLOCKS = 16


def smoke(args: argparse.Namespace, setups: list[str]) -> None:
    """The CI size: every setup on the tests' tiny model, 2 apps, a 16-block pool (the apps'
    contexts do not all fit). ``--json`` gets every call's output, for the test to compare."""
    from bench.common.vllm_apps import SMOKE_APPS, TINY_SHAPE
    from bench.common.vllm_models import build_tiny_llama

    with tempfile.TemporaryDirectory(prefix="tc-bench-engine-") as tmp:
        work = Path(tmp)
        results = run_all(
            setups,
            asdict(SMOKE_APPS),
            model=build_tiny_llama(work / "model"),
            kv_bytes=SMOKE_BLOCKS * 32 * 1024,
            max_model_len=(SMOKE_BLOCKS - 1) * 32,  # what fits the pool less vLLM's null block
            lmcache_python=args.lmcache_python,
            decode_s=0.01,
            timeout_s=120.0,
            work=work,
            arena="64MiB",
            log=sys.stderr,
        )
    print(table(results))
    if args.json is not None:
        meta = {
            "apps": asdict(SMOKE_APPS),
            "gpu_blocks": SMOKE_BLOCKS,
            "max_model_len": (SMOKE_BLOCKS - 1) * 32,
            "model": asdict(TINY_SHAPE),
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results}))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code-writer", type=int, default=3)
    ap.add_argument("--react", type=int, default=1)
    ap.add_argument("--qps", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu-blocks", type=int, default=120)
    ap.add_argument("--max-model-len", type=int, default=3072)
    ap.add_argument("--setups", default="plain,lmcache,swap,continuum,tokencake")
    ap.add_argument(
        "--lmcache-python",
        default=os.environ.get("TOKENCAKE_LMCACHE_PYTHON", sys.executable),
        help="python of a venv with lmcache==0.5.6 (default: $TOKENCAKE_LMCACHE_PYTHON)",
    )
    ap.add_argument("--model-dir", type=Path, default=None, help="reuse a built model here")
    ap.add_argument("--decode-s", type=float, default=0.5, help="the DAG's decode estimate")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CI size: the tests' 2-layer model, 2 small apps, 16 KV blocks",
    )
    ap.add_argument(
        "--sim-from",
        type=Path,
        default=None,
        help="only the simulator comparison, from a previous run's --json",
    )
    ap.add_argument(
        "--trace",
        default="",
        help="setups (comma-separated) whose calls to diff with the simulator's, one by one",
    )
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    return ap


def _setups(
    ap: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[str], tuple[str, ...]]:
    """The setups to run, ``plain`` first, and those whose calls are traced; checks the
    other arguments too (an argparse error, exit 2)."""
    if min(args.code_writer, args.react) < 0 or args.code_writer + args.react < 1:
        ap.error("--code-writer and --react must be >= 0, with at least one app in all")
    if args.qps <= 0 or args.decode_s <= 0 or min(args.gpu_blocks, args.max_model_len) < 1:
        ap.error("--qps and --decode-s must be > 0, --gpu-blocks and --max-model-len >= 1")
    from bench.common.vllm_apps import SETUPS

    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    bad = [s for s in setups if s not in SETUPS]
    if bad or not setups:
        ap.error(f"unknown setup {bad}; known: {', '.join(SETUPS)}")
    traced = tuple(s.strip() for s in args.trace.split(",") if s.strip())
    if any(s not in SETUPS for s in traced):
        ap.error(f"--trace: unknown setup in {args.trace!r}; known: {', '.join(SETUPS)}")
    if "plain" in setups:
        setups.remove("plain")
    setups.insert(0, "plain")
    return setups, traced


def _sim_from(ap: argparse.ArgumentParser, path: Path, traced: tuple[str, ...]) -> None:
    """``--sim-from``: only the simulator comparison, from a previous run's ``--json``."""
    try:
        doc = json.loads(path.read_text())
        meta, results = doc["meta"], doc["results"]
        recorded = (doc.get("sim") or {}).get("copy_bytes_per_s")
    except (OSError, ValueError, KeyError, TypeError) as e:
        ap.error(f"--sim-from {path}: not a bench_engine --json file ({e})")
    missing = [k for k in ("apps", "gpu_blocks", "max_model_len") if k not in meta]
    if missing:  # --smoke files written before the smoke run recorded its engine
        ap.error(f"--sim-from {path}: the run did not record {', '.join(missing)}; rerun it")
    if "error" in results.get("plain", {"error": "did not run"}):
        ap.error(f"--sim-from {path}: plain vLLM did not run, nothing to compare with")
    from bench.common.engine_sim import simulate

    try:
        simulate(meta, results, recorded, traced)
    except (ValueError, TypeError, KeyError) as e:  # too few steps, or a malformed record
        ap.error(f"--sim-from {path}: {e!r}")


def _full(args: argparse.Namespace, setups: list[str], traced: tuple[str, ...]) -> None:
    """The full run: every setup on the 12-layer model, the table, the simulator's view."""
    from bench.common.vllm_apps import ModelShape, build_llama
    from bench.common.vllm_apps import kv_bytes_per_block as kvb

    apps = {
        "code_writer": args.code_writer,
        "react": args.react,
        "qps": args.qps,
        "seed": args.seed,
        "context_scale": 1 / 8,
        "output_scale": 1 / 64,
        "time_scale": 0.25,
        "max_tool_s": 3.0,
        "react_steps": 6,
    }
    started = _load()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tc-bench-engine-") as tmp:
        work = Path(tmp)
        model = args.model_dir or work / "model"
        if not (model / "config.json").exists():
            build_llama(model, ModelShape())
        block = kvb(ModelShape())
        arena = f"{max(256, 4 * args.gpu_blocks * block // 2**20)}MiB"
        with (work / "children.log").open("w") as log:
            results = run_all(
                setups,
                apps,
                model=model,
                kv_bytes=args.gpu_blocks * block,
                max_model_len=args.max_model_len,
                lmcache_python=args.lmcache_python,
                decode_s=args.decode_s,
                timeout_s=900.0,
                work=work,
                arena=arena,
                log=log,
                partial=args.json.with_suffix(".partial.json") if args.json else None,
            )
        child_log = (work / "children.log").read_text()
    ended = _load()
    print(table(results))
    print(f"\nload average (1, 5, 15 min) at start: {started}; at end: {ended}")
    print(f"total wall time: {time.monotonic() - t0:.0f} s")
    if any("error" in r for r in results.values()):
        print(f"\nstderr tail of the setups that failed:\n{child_log[-3000:]}", file=sys.stderr)
    if args.plot is not None:
        plot(results, args.plot)
    meta = {"apps": apps, "gpu_blocks": args.gpu_blocks, "max_model_len": args.max_model_len}
    meta["model"] = asdict(ModelShape())
    meta.update(load_start=started, load_end=ended)
    from bench.common.engine_sim import simulate

    sim: dict[str, Any] = {}
    try:
        if "error" not in results["plain"]:
            sim = simulate(meta, results, None, traced)
    except ValueError as e:  # too few steps to fit: the run's results still count
        print(f"\nno simulator comparison: {e}")
    if args.json is not None:
        doc = {"meta": meta, "results": results, "sim": sim}
        args.json.write_text(json.dumps(doc, indent=1))


def main() -> None:
    ap = _parser()
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_setup(json.loads(args.child))))
        return
    sys.path.insert(0, str(ROOT))
    setups, traced = _setups(ap, args)
    if args.smoke:
        smoke(args, setups)
    elif args.sim_from is not None:
        _sim_from(ap, args.sim_from, traced)
    else:
        _full(args, setups, traced)


if __name__ == "__main__":
    main()
