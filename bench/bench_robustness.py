"""Robustness: every policy on scenarios drawn from the seeded workload family.

Each scenario (``tokencake.sim.family``: DAG shape, tool-time law, plain-traffic fraction,
context range, arrival rate from idle to overload) runs with every policy and the oracle
on the same trace. Per scenario it reports tokencake / vllm, / best peer (the lowest among
the non-TokenCake policies, vllm included, for that metric) and / oracle, on mean and p95
latency, overall and per class (plain traffic, agent apps); the worst scenarios with their
seeds (replay: ``tokencake-sim run --workload family:<seed> --qps <qps> --apps <n> --seed
<seed>``: the bench draws each trace with the scenario's seed); the
issue's targets as measured; and the same for the ablations.

    python bench/bench_robustness.py [--scenarios 200] [--first-seed 0] [--apps 12]
        [--workers 2] [--out docs/img/robustness] [--update-doc docs/benchmarks.md]
        [--reuse OLD/results.json --reuse-policies vllm,continuum,oracle [--verify 5]]

Writes ``<out>/results.json`` (every record, with its scenario), ``<out>/summary.md`` and
``<out>/ratios.png``; ``--update-doc`` replaces the text between the robustness markers of
that file with the summary. Simulated time only: the figures are the same on every rerun.

``--reuse`` takes the records of the named policies from an earlier run instead of running
them again (for a change that leaves those policies' code paths alone: a full run is an
hour on a loaded 2-core box). The first ``--verify`` scenarios are rerun for them anyway,
and any difference in their latencies, recompute or host hits is an error (exit 2): a
reused record is never one the current code would not produce.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BEGIN = "<!-- robustness:begin -->"
END = "<!-- robustness:end -->"
TC = "tokencake"
ABLATIONS = ("tokencake-temporal", "tokencake-spatial")
CLASSES = ("all", "plain", "agent")
METRICS = ("mean", "p95")
EPS_S = 0.05
"""Latencies within this many seconds count as equal in ratios (both sides get it added):
a ratio of two tiny latencies is noise, not a loss."""


def _job(args: tuple[int, int, str, str]) -> dict[str, Any]:
    from tokencake.sim.family import draw_scenario, scenario_qps
    from tokencake.sim.profiles import get_profile
    from tokencake.sim.runner import run_one

    seed, n_apps, policy, profile_name = args
    profile = get_profile(profile_name)
    sc = draw_scenario(seed, n_apps)
    qps = scenario_qps(sc, profile)
    rec, _ = run_one(f"family:{seed}", policy, qps, profile, seed=seed, n_apps=n_apps)
    rec["scenario"] = sc.describe()
    return rec


def latency(rec: dict[str, Any], cls: str, metric: str) -> float | None:
    key = f"{metric}_latency_s"
    if rec.get("error"):
        return None
    v = rec.get(key) if cls == "all" else rec["by_class"][cls][key]
    return None if v is None else float(v)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return (a + EPS_S) / (b + EPS_S)


def scenario_ratios(recs: dict[str, dict[str, Any]], subject: str) -> dict[str, float | None]:
    """``subject`` against vllm, the best peer and the oracle, per class and metric."""
    peers = [p for p in recs if p != "oracle" and not p.startswith("tokencake")]
    out: dict[str, float | None] = {}
    for cls in CLASSES:
        for m in METRICS:
            mine = latency(recs[subject], cls, m)
            vals = [v for p in peers if (v := latency(recs[p], cls, m)) is not None]
            best = min(vals) if vals else None
            out[f"{cls}/{m}/vllm"] = ratio(mine, latency(recs["vllm"], cls, m))
            out[f"{cls}/{m}/best_peer"] = ratio(mine, best)
            out[f"{cls}/{m}/oracle"] = ratio(mine, latency(recs["oracle"], cls, m))
    return out


def geomean(xs: list[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarise(by_seed: dict[int, dict[str, dict[str, Any]]], n_apps: int) -> dict[str, Any]:
    subjects = [TC, *ABLATIONS]
    table: dict[str, dict[str, dict[str, float | int | None]]] = {}
    per_seed: dict[int, dict[str, dict[str, float | None]]] = {}
    for seed, recs in by_seed.items():
        per_seed[seed] = {s: scenario_ratios(recs, s) for s in subjects if s in recs}
    keys = [
        f"{c}/{m}/{b}" for c in CLASSES for m in METRICS for b in ("vllm", "best_peer", "oracle")
    ]
    for s in subjects:
        table[s] = {}
        for k in keys:
            xs = [x for r in per_seed.values() if s in r and (x := r[s][k]) is not None]
            table[s][k] = {
                "n": len(xs),
                "geomean": geomean(xs),
                "worst": max(xs) if xs else None,
                "over_1.02": sum(x > 1.02 for x in xs),
            }
    failures = [
        {"seed": seed, "policy": p, "error": rec["error"]}
        for seed, recs in by_seed.items()
        for p, rec in recs.items()
        if rec.get("error")
    ]
    return {
        "scenarios": len(by_seed),
        "n_apps": n_apps,
        "table": table,
        "worst": worst_scenarios(by_seed, per_seed),
        "failures": failures,
        "per_seed": {str(k): v for k, v in per_seed.items()},
    }


def worst_scenarios(
    by_seed: dict[int, dict[str, dict[str, Any]]],
    per_seed: dict[int, dict[str, dict[str, float | None]]],
    n: int = 10,
) -> list[dict[str, Any]]:
    """The scenarios where tokencake / best peer is highest, on the mean or on p95, with
    the best peer (on the mean) and both runs' breakdown."""
    keyed = []
    for seed, r in per_seed.items():
        if TC not in r:
            continue
        xs = [x for m in METRICS if (x := r[TC][f"all/{m}/best_peer"]) is not None]
        if xs:
            keyed.append((max(xs), seed))
    out = []
    for ratio_, seed in sorted(keyed, reverse=True)[:n]:
        recs = by_seed[seed]
        best = min(
            (p for p in recs if p != "oracle" and not p.startswith("tokencake")),
            key=lambda p: latency(recs[p], "all", "mean") or math.inf,
        )
        out.append(
            {
                "seed": seed,
                "ratio": ratio_,
                "scenario": recs[TC]["scenario"],
                "qps": recs[TC]["qps"],
                "best_peer": best,
                "ratios": per_seed[seed][TC],
                "breakdown": {p: run_breakdown(recs[p]) for p in (TC, best)},
            }
        )
    return out


def _fmt(x: float | int | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


def markdown(summary: dict[str, Any], command: str, wall_s: float) -> str:
    lines = [
        f"`{command}`: {summary['scenarios']} scenarios x every policy "
        f"({summary['n_apps']} apps each), {wall_s:.0f} s wall. Ratios add {EPS_S} s to both "
        "sides (two near-zero latencies are a tie, not a 10x loss).",
        "",
    ]
    lines += _ratio_table(summary["table"])
    lines += _targets(summary["table"][TC])
    lines += _worst_table(summary)
    lines += breakdown_table(summary)
    if summary["failures"]:
        lines += ["", f"Runs that did not finish: {len(summary['failures'])}"]
        for f in summary["failures"][:10]:
            lines.append(f"- seed {f['seed']} {f['policy']}: {f['error']}")
    lines += ["", "![tokencake / vllm and / best peer per scenario](img/robustness/ratios.png)"]
    return "\n".join(lines) + "\n"


def _ratio_table(table: dict[str, Any]) -> list[str]:
    """Each policy's ratios to vllm, the best peer and the oracle, per class and metric."""
    lines = [
        "| policy | class | metric | / vllm geomean | / vllm worst | / best peer geomean "
        "| / best peer worst | scenarios > 1.02x best peer | / oracle geomean |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s, rows in table.items():
        for c in CLASSES:
            for m in METRICS:
                v = rows[f"{c}/{m}/vllm"]
                b = rows[f"{c}/{m}/best_peer"]
                o = rows[f"{c}/{m}/oracle"]
                if not b["n"]:
                    continue
                lines.append(
                    f"| {s} | {c} | {m} | {_fmt(v['geomean'])} | {_fmt(v['worst'])} | "
                    f"{_fmt(b['geomean'])} | {_fmt(b['worst'])} | {b['over_1.02']} of {b['n']} | "
                    f"{_fmt(o['geomean'])} |"
                )
    return lines


def _targets(tc: dict[str, Any]) -> list[str]:
    """Issue 18's three targets, each with its measured figure and verdict."""
    worst_all = max((tc[f"all/{m}/best_peer"]["worst"] or 0.0) for m in METRICS)
    plain = tc["plain/mean/vllm"]
    return [
        "",
        "Targets (issue 18), measured:",
        "",
        f"- worst tokencake / best peer (mean and p95; the best peer is never worse than vllm): "
        f"{worst_all:.3f} (target <= 1.02: {'met' if worst_all <= 1.02 else 'not met'})",
        f"- plain traffic's mean / its mean under vllm: worst {_fmt(plain['worst'])}, geomean "
        f"{_fmt(plain['geomean'])} (target <= 1.10: "
        f"{'met' if plain['worst'] is not None and plain['worst'] <= 1.10 else 'not met'})",
        f"- geomean tokencake / best peer (mean): {_fmt(tc['all/mean/best_peer']['geomean'])} "
        f"(target <= 0.85: "
        f"{'met' if (tc['all/mean/best_peer']['geomean'] or 9) <= 0.85 else 'not met'})",
    ]


def _worst_table(summary: dict[str, Any]) -> list[str]:
    """The scenarios where tokencake did worst against the best peer, each with its replay."""
    lines = [
        "",
        "Worst scenarios (tokencake / best peer, the higher of mean and p95; the best peer "
        "is the one with the lowest mean):",
        "",
        "| seed | / best peer (mean) | / best peer (p95) | best peer | / vllm | plain / vllm "
        "| scenario | replay |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in summary["worst"]:
        r = w["ratios"]
        lines.append(
            f"| {w['seed']} | {_fmt(r['all/mean/best_peer'])} | {_fmt(r['all/p95/best_peer'])} | "
            f"{w['best_peer']} | {_fmt(r['all/mean/vllm'])} | "
            f"{_fmt(r['plain/mean/vllm'])} | {w['scenario']} | `tokencake-sim run --workload "
            f"family:{w['seed']} --qps {w['qps']:.6g} --apps {summary['n_apps']} "
            f"--seed {w['seed']} --policies all` |"
        )
    return lines


BREAKDOWN = (
    ("recompute_tokens", "recomputed tokens"),
    ("host_hit_tokens", "host-hit tokens"),
    ("offload_blocks", "offloaded blocks"),
    ("offload_unread_blocks", "offloaded, never read"),
)


def run_breakdown(rec: dict[str, Any]) -> dict[str, float | int | None]:
    """Where one run's time went: per-request means of queueing, transfer wait and
    recompute prefill (seconds), and the counts behind them."""
    out: dict[str, float | int | None] = {k: rec.get(k) for k, _ in BREAKDOWN}
    per = rec.get("breakdown_s") or {}
    for k in ("queueing", "transfer_wait", "prefill_recompute"):
        out[f"{k}_s"] = per.get(k)
    return out


def breakdown_table(summary: dict[str, Any]) -> list[str]:
    """The worst scenarios' runs side by side: tokencake against its best peer."""
    lines = [
        "",
        "Where the time goes in those scenarios (per-request means of queueing, transfer "
        "wait and recompute prefill, in s; token and block counts over the run):",
        "",
        "| seed | policy | queueing | transfer wait | recompute prefill | "
        + " | ".join(label for _, label in BREAKDOWN)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(BREAKDOWN),
    ]
    for w in summary["worst"]:
        for policy in (TC, w["best_peer"]):
            b = w["breakdown"][policy]
            cells = [
                _fmt(b[f"{k}_s"], 2) for k in ("queueing", "transfer_wait", "prefill_recompute")
            ]
            cells += [
                _fmt(b[k], 0) if isinstance(b[k], float) else _fmt(b[k]) for k, _ in BREAKDOWN
            ]
            lines.append(f"| {w['seed']} | {policy} | " + " | ".join(cells) + " |")
    return lines


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, (cls, m) in zip(
        axes, (("all", "mean"), ("all", "p95"), ("plain", "mean")), strict=True
    ):
        for s in (TC, *ABLATIONS):
            for base, style in (("vllm", "-"), ("best_peer", "--")):
                xs = sorted(
                    r[s][f"{cls}/{m}/{base}"]
                    for r in summary["per_seed"].values()
                    if s in r and r[s][f"{cls}/{m}/{base}"] is not None
                )
                if not xs or (s != TC and base == "best_peer"):
                    continue
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, style, where="post", label=f"{s} / {base.replace('_', ' ')}")
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{cls} traffic, {m} latency")
        ax.set_xlabel("ratio (log)")
    axes[0].set_ylabel("share of scenarios (CDF)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_doc(doc: Path, text: str) -> None:
    body = doc.read_text(encoding="utf-8")
    if BEGIN not in body or END not in body:
        raise SystemExit(f"error: {doc} has no {BEGIN} ... {END} section")
    head, rest = body.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{text}{END}{tail}", encoding="utf-8")


SAME = ("mean_latency_s", "p95_latency_s", "recompute_tokens", "host_hit_tokens", "by_class")
"""Fields a reused record must match exactly when its run is repeated (``--reuse``)."""


class ReuseError(ValueError):
    """Reused records that are missing, or that a rerun does not reproduce."""


def load_reused(
    path: Path, policies: list[str], seeds: range, n_apps: int
) -> dict[int, dict[str, dict[str, Any]]]:
    """Records of ``policies`` for ``seeds`` from an earlier run's results.json."""
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReuseError(f"cannot read {path}: {e}") from None
    out: dict[int, dict[str, dict[str, Any]]] = {s: {} for s in seeds}
    for rec in records:
        if rec.get("policy") in policies and rec.get("seed") in out and rec.get("n_apps") == n_apps:
            out[rec["seed"]][rec["policy"]] = rec
    missing = [(s, p) for s in seeds for p in policies if p not in out[s]]
    if missing:
        raise ReuseError(
            f"{path} lacks {len(missing)} records, e.g. seed {missing[0][0]} {missing[0][1]}"
        )
    return out


def run_jobs(
    jobs: list[tuple[int, int, str, str]], workers: int, by_seed: dict[int, dict[str, Any]]
) -> None:
    """Run the jobs into ``by_seed``; Ctrl-C keeps what finished."""
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        for i, rec in enumerate(pool.map(_job, jobs, chunksize=4)):
            by_seed[rec["seed"]][rec["policy"]] = rec
            if (i + 1) % 200 == 0:
                print(
                    f"{i + 1} of {len(jobs)} runs, {time.perf_counter() - t0:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    except KeyboardInterrupt:  # Ctrl-C: report the scenarios that finished
        pool.shutdown(wait=False, cancel_futures=True)
        print("interrupted: summarising the scenarios that finished", file=sys.stderr)
    else:
        pool.shutdown()


def check_reused(
    reused: dict[int, dict[str, dict[str, Any]]], fresh: dict[int, dict[str, dict[str, Any]]]
) -> None:
    """Every rerun of a reused record reproduces it (``SAME``)."""
    for seed, recs in fresh.items():
        for policy, rec in recs.items():
            old = reused[seed].get(policy)
            if old is not None and any(old.get(k) != rec.get(k) for k in SAME):
                raise ReuseError(f"seed {seed} {policy}: the rerun differs from the reused record")


def main(argv: list[str] | None = None) -> int:
    from tokencake.sim.runner import all_policies

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", type=int, default=200)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--apps", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--profile", default="qwen2.5-14b-a800")
    ap.add_argument("--out", type=Path, default=REPO / "docs/img/robustness")
    ap.add_argument("--update-doc", type=Path, default=None)
    ap.add_argument("--reuse", type=Path, default=None, help="an earlier run's results.json")
    ap.add_argument("--reuse-policies", default="", help="policies whose records are reused")
    ap.add_argument("--verify", type=int, default=5, help="scenarios rerun to check reuse")
    args = ap.parse_args(argv)
    policies = all_policies()
    keep = [p for p in args.reuse_policies.split(",") if p]
    if args.scenarios < 1 or args.apps < 1 or args.workers < 1 or args.verify < 1:
        print("error: --scenarios, --apps, --workers and --verify must be >= 1", file=sys.stderr)
        return 2
    if [p for p in keep if p not in policies] or bool(keep) != (args.reuse is not None):
        print("error: --reuse needs --reuse-policies, known policies only", file=sys.stderr)
        return 2
    seeds = range(args.first_seed, args.first_seed + args.scenarios)
    t0 = time.perf_counter()
    try:
        reused = load_reused(args.reuse, keep, seeds, args.apps) if keep else {}
        checked = seeds[: args.verify]
        # the reruns that check the reused records first, so an interrupted run has them
        jobs = [(s, args.apps, p, args.profile) for s in checked for p in keep]
        jobs += [(s, args.apps, p, args.profile) for s in seeds for p in policies if p not in keep]
        by_seed: dict[int, dict[str, dict[str, Any]]] = {s: {} for s in seeds}
        run_jobs(jobs, args.workers, by_seed)
        if keep:
            if any(p not in by_seed[s] for s in checked for p in keep):
                raise ReuseError("interrupted before the reused records were checked")
            check_reused(reused, {s: by_seed[s] for s in checked})
    except ReuseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s, recs in reused.items():
        for p, rec in recs.items():
            by_seed[s].setdefault(p, rec)
    return report(args, by_seed, policies, keep, time.perf_counter() - t0)


def report(
    args: argparse.Namespace,
    by_seed: dict[int, dict[str, dict[str, Any]]],
    policies: list[str],
    reused: list[str],
    wall: float,
) -> int:
    by_seed = {s: r for s, r in by_seed.items() if len(r) == len(policies)}
    if not by_seed:
        print("error: no scenario finished", file=sys.stderr)
        return 1
    summary = summarise(by_seed, args.apps)
    args.out.mkdir(parents=True, exist_ok=True)
    records = [r for recs in by_seed.values() for r in recs.values()]
    (args.out / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    cmd = (
        f"python bench/bench_robustness.py --scenarios {args.scenarios} "
        f"--first-seed {args.first_seed} --apps {args.apps}"
    )
    text = markdown(summary, cmd, wall)
    if reused:
        text = (
            f"Records of {', '.join(reused)} reused from an earlier run (`--reuse`): their "
            f"code paths did not change, and a rerun of the first {args.verify} scenarios "
            "reproduced them exactly.\n\n" + text
        )
    if len(by_seed) < args.scenarios:
        text = f"Interrupted: {len(by_seed)} of {args.scenarios} scenarios finished.\n\n" + text
    (args.out / "summary.md").write_text(text)
    plot(summary, args.out / "ratios.png")
    if args.update_doc is not None:
        update_doc(args.update_doc, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
