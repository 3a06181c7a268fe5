"""``tokencake-sim``: replay workloads against every policy and report what each one costs.

``tokencake-sim run`` sweeps (workload x qps x policy) on one engine profile, prints a table,
and writes ``results.json``, ``table.md`` and the PNG figures into ``--out``. With ``--live
ENDPOINT`` (or ``--live-embedded``) and ``--time-scale S`` each run is replayed against a real
``tokencaked`` instead (``tokencake.sim.live``, swept by ``live_runner``): the daemon's one
policy decides.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from tokencake import protocol as p
from tokencake.cli import HELP_OPTIONS, NON_NEGATIVE, POSITIVE, FloatRange, Group, option
from tokencake.sim.generators import BUILTIN, get_generator
from tokencake.sim.metrics import target_ratios
from tokencake.sim.profiles import DEFAULT_PROFILE, PROFILES, Profile, get_profile
from tokencake.sim.report import format_table, format_targets, run_progress
from tokencake.sim.runner import ORACLE, Series, all_policies, resolve_policies, sweep
from tokencake.sim.workload import NoiseConfig
from tokencake.tables import render_table

logger = logging.getLogger(__name__)


@click.group(cls=Group, context_settings=HELP_OPTIONS)
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
def main(verbose: bool) -> None:
    """TokenCake's trace-driven simulator: the real scheduler policies on a modelled engine."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@main.command("list")
def list_cmd() -> None:
    """Built-in workloads, engine profiles and policies."""
    click.echo("workloads:")
    for name, cls in BUILTIN.items():
        click.echo(f"  {name:18s} {cls.description}")
    click.echo("profiles:")
    for name, prof in PROFILES.items():
        default = " (default)" if name == DEFAULT_PROFILE else ""
        click.echo(f"  {name:18s} {prof.gpu_blocks} blocks of {prof.block_tokens} tokens{default}")
    click.echo("policies: " + ", ".join(all_policies()))


def _rates(_ctx: click.Context, _param: click.Parameter, s: str) -> list[float]:
    """``--qps 0.1,1``: arrival rates, each a finite number > 0."""
    try:
        rates = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of numbers: {s!r}") from None
    if not rates or not all(0 < r < math.inf for r in rates):
        raise click.BadParameter(f"rates must be numbers > 0 (applications/s), got {s!r}")
    return rates


def _workloads(_ctx: click.Context, _param: click.Parameter, s: str) -> list[str]:
    """``--workload``: built-in names or workload JSON files, each loaded once to check it."""
    names = [w.strip() for w in s.split(",") if w.strip()]
    if not names:
        raise click.BadParameter("name a built-in workload or a workload JSON file")
    for name in names:
        path = Path(name)
        is_file = name not in BUILTIN and (path.suffix == ".json" or path.exists())
        if is_file and path.suffix.lower() != ".json":
            raise click.BadParameter(
                f"{name}: a workload file must be JSON (FILE.json); its schema is in "
                "docs/workloads.md"
            )
        try:
            get_generator(name)
        except ValueError as e:
            hint = " (the workload file schema: docs/workloads.md)" if is_file else ""
            raise click.BadParameter(f"{e}{hint}") from None
    return names


WORKLOAD = click.option(
    "--workload",
    default="code-writer",
    show_default=True,
    callback=_workloads,
    help="Built-in name(s), comma-separated, or a workload JSON file (docs/workloads.md).",
)
"""``--workload``, shared by ``run`` and ``cluster``."""
SEED = option("--seed", click.IntRange(min=0), 0, "Seed of the applications and their arrivals.")
PROFILE = click.Choice(sorted(PROFILES))


@main.command("run", short_help="Sweep workloads x rates x policies: table and targets.")
@WORKLOAD
@click.option(
    "--qps",
    default="0.05,0.1,0.2,0.5,1",
    show_default=True,
    callback=_rates,
    help="Application arrival rates (Poisson), comma-separated.",
)
@click.option(
    "--policies",
    default=None,
    show_default="all",
    help="'all' or comma-separated policy names (oracle included in all). Live mode runs "
    "the daemon's one policy: at most one name, the daemon's (--live-embedded: the policy "
    "to start it with, default tokencake).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for results.json, table.md and PNGs.",
)
@option(
    "--profile",
    PROFILE,
    DEFAULT_PROFILE,
    "Engine profile: model, GPU and KV pool (tokencake-sim list).",
)
@option(
    "--gpu-mem-util",
    FloatRange(0, 1, min_open=True),
    None,
    "Override the profile's GPU memory fraction.",
)
@SEED
@option("--apps", click.IntRange(min=1), None, "Applications per run (default: workload's).")
@option(
    "--tool-noise",
    click.Choice(["none", "gaussian", "uniform"]),
    "none",
    "Noise on the real tool durations (docs/workloads.md).",
)
@option("--noise-scale", NON_NEGATIVE, 0.0, "Relative scale of the tool-duration noise.")
@option(
    "--predict-error",
    NON_NEGATIVE,
    0.0,
    "Sigma of the log-normal error on predicted tool durations.",
)
@click.option("--no-hints", is_flag=True, help="Send no tool-duration hints to the scheduler.")
@option(
    "--focus-qps", POSITIVE, 1.0, "Rate whose runs feed the targets, timeline, CDF and breakdown."
)
@click.option(
    "--no-plots",
    is_flag=True,
    help="Write results.json and table.md only, no PNG figures (no matplotlib needed).",
)
@option(
    "--engine-eviction",
    click.Choice(["policy", "lru"]),
    "policy",
    "Who orders evictions in the engine: the policy (eviction_order), or LRU as vLLM "
    "does (the connector cannot reorder vLLM's free queue; pins still hold).",
)
@click.option(
    "--live",
    "live_endpoint",
    default=None,
    metavar="ENDPOINT",
    help="Live mode: replay each run against the tokencaked at ENDPOINT (its policy "
    "decides, over its socket) on a compressed clock; see docs/benchmarks.md.",
)
@click.option(
    "--live-embedded",
    is_flag=True,
    help="Live mode against a tokencaked started for this command on a temporary ipc "
    "socket, and stopped after.",
)
@option(
    "--time-scale",
    FloatRange(0, 1000, min_open=True),
    0.05,
    "Live mode: wall seconds per simulated second.",
)
def run_cmd(
    workload: list[str],
    qps: list[float],
    policies: str,
    out_dir: Path,
    profile: str,
    gpu_mem_util: float | None,
    seed: int,
    apps: int | None,
    tool_noise: str,
    noise_scale: float,
    predict_error: float,
    no_hints: bool,
    focus_qps: float,
    no_plots: bool,
    engine_eviction: str,
    live_endpoint: str | None,
    live_embedded: bool,
    time_scale: float,
) -> None:
    """Sweep workloads x rates x policies; print the table and the targets.

    With --live ENDPOINT or --live-embedded, each (workload, rate) is replayed against a
    real tokencaked instead (live mode: one policy, the daemon's; --time-scale wall seconds
    per simulated second).
    """
    live = live_endpoint is not None or live_embedded
    noise_args = (tool_noise, noise_scale, predict_error, not no_hints)
    prof, pols, noise = _run_setup(
        profile, gpu_mem_util, policies, (live_endpoint, live_embedded, time_scale), noise_args
    )
    if not no_plots and importlib.util.find_spec("matplotlib") is None:
        raise click.UsageError(
            "the figures need matplotlib, which is not installed: pip install "
            "'tokencake[sim]' (in a checkout: .venv/bin/pip install -e '.[sim]'), or pass "
            "--no-plots"
        )
    _writable_dir(out_dir)
    click.echo(
        f"profile {prof.name}: {prof.gpu_blocks} GPU blocks x {prof.block_tokens} tokens, "
        f"{prof.host_blocks} host blocks; seed {seed}; policies {', '.join(pols)}",
    )
    t0 = time.perf_counter()
    with run_progress(len(workload) * len(qps) * len(pols)) as progress:
        common: dict[str, Any] = {"seed": seed, "n_apps": apps, "noise": noise}
        if live:
            records, series = _sweep_live(
                workload, qps, pols, prof, live_endpoint, time_scale, progress=progress, **common
            )
        else:
            lru = engine_eviction == "lru"
            records, series = sweep(
                workload, qps, pols, prof, progress=progress, lru_eviction=lru, **common
            )
    wall = time.perf_counter() - t0
    doc = _results_doc(prof.name, seed, noise_args, records, wall, focus_qps)
    _report(out_dir, doc, series, focus_qps, no_plots)


def _results_doc(
    profile: str,
    seed: int,
    noise_args: tuple[str, float, float, bool],
    records: list[dict[str, Any]],
    wall: float,
    focus_qps: float,
) -> dict[str, Any]:
    """results.json: the settings, the speed, each workload's targets and every record."""
    targets = {
        w: target_ratios([r for r in records if r["workload"] == w], focus_qps)
        for w in dict.fromkeys(r["workload"] for r in records)
    }
    events = sum(r.get("events", 0) for r in records)
    sim_wall = sum(r["wall_s"] for r in records)
    tool_noise, noise_scale, predict_error, hints = noise_args
    return {
        "profile": profile,
        "seed": seed,
        "noise": {
            "tool_noise": tool_noise,
            "noise_scale": noise_scale,
            "predict_error": predict_error,
            "hints": hints,
        },
        "events_per_s": events / sim_wall if sim_wall > 0 else None,
        "wall_s": wall,
        "targets": targets,
        "records": records,
    }


def _run_setup(
    profile: str,
    gpu_mem_util: float | None,
    policies: str,
    live: tuple[str | None, bool, float],
    noise_args: tuple[str, float, float, bool],
) -> tuple[Profile, list[str], NoiseConfig]:
    """The profile, the policies (the daemon's one, live) and the noise of a ``run``,
    checked before anything runs; bad values are usage errors."""
    live_endpoint, live_embedded, time_scale = live
    try:
        prof = get_profile(profile).with_overrides(gpu_mem_util)
        pols = resolve_policies(policies or "all")
        if not pols:
            raise ValueError(f"--policies {policies!r} names no policy")
        if live_endpoint is not None or live_embedded:
            pols = _live_policies(policies, live_endpoint, live_embedded, time_scale)
        noise = NoiseConfig(*noise_args)  # type: ignore[arg-type]
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    return prof, pols, noise


def _writable_dir(out_dir: Path) -> None:
    """Before the sweep, not after it: an unwritable --out must not waste the runs."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise click.BadParameter(
            f"cannot create {out_dir}: {e.strerror}", param_hint="--out"
        ) from None
    if not os.access(out_dir, os.W_OK):
        raise click.BadParameter(f"cannot write to {out_dir}", param_hint="--out")


def _report(
    out_dir: Path, doc: dict[str, Any], series: list[Series], focus_qps: float, no_plots: bool
) -> None:
    """Write results.json, table.md (and the figures); print the table and the targets."""
    records: list[dict[str, Any]] = doc["records"]
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    table_md = format_table(records, markdown=True)
    (out_dir / "table.md").write_text(table_md + "\n", encoding="utf-8")
    click.echo(format_table(records))
    for workload, t in doc["targets"].items():
        if t is not None:
            click.echo(f"[{workload}] " + format_targets(t))
    events = sum(r.get("events", 0) for r in records)
    sim_wall = sum(r["wall_s"] for r in records)
    click.echo(
        f"{len(records)} runs in {doc['wall_s']:.1f}s; {events:,} events, "
        f"{events / sim_wall if sim_wall else 0:,.0f} events/s"
    )
    written = f"wrote {out_dir / 'results.json'}, {out_dir / 'table.md'}"
    if no_plots:
        click.echo(f"{written} (no figures: --no-plots)")
    else:
        from tokencake.sim.plots import plot_all

        paths = plot_all(records, series, out_dir, focus_qps)
        click.echo(f"{written} and {len(paths)} figures")
    failed = [r for r in records if r.get("error")]
    if failed:
        click.echo(f"{len(failed)} run(s) did not finish; see 'error' in results.json", err=True)
        sys.exit(2)


def _live_policies(
    policies: str | None, endpoint: str | None, embedded: bool, scale: float
) -> list[str]:
    """The one policy of a live run: the daemon's (checked when --policies names one)."""
    if endpoint is not None and embedded:
        raise ValueError("--live and --live-embedded exclude each other")
    if not 0 < scale <= 1000:
        raise ValueError(f"--time-scale must be in (0, 1000], got {scale}")
    names = resolve_policies(policies) if policies else []
    if len(names) > 1 or ORACLE in names:
        raise ValueError(
            f"live mode runs one policy, the daemon's; --policies names {', '.join(names)}"
        )
    if embedded:
        return names or ["tokencake"]
    assert endpoint is not None
    import zmq

    from tokencake.clients.client import DaemonUnavailable, TokenCakeClient
    from tokencake.protocol import RemoteError

    socket_path = Path(endpoint.removeprefix("ipc://"))
    if endpoint.startswith("ipc://") and not socket_path.exists():
        raise ValueError(f"--live {endpoint}: no daemon (no socket at {socket_path})")
    try:
        with TokenCakeClient(endpoint) as client:
            running = str(client.call(p.GetConfig()).config.get("policy", ""))
    except (DaemonUnavailable, RemoteError, zmq.ZMQError) as e:
        raise ValueError(f"--live {endpoint}: {e}") from e
    if names and names[0] != running:
        raise ValueError(f"the daemon at {endpoint} runs policy {running!r}, not {names[0]!r}")
    return [running]


def _sweep_live(
    workloads: list[str],
    rates: list[float],
    pols: list[str],
    prof: Profile,
    endpoint: str | None,
    scale: float,
    **kwargs: Any,
) -> tuple[list[dict[str, Any]], list[Series]]:
    from tokencake.sim.live import DaemonLost, LiveError
    from tokencake.sim.live_runner import embedded_daemon, sweep_live

    try:
        if endpoint is not None:
            return sweep_live(workloads, rates, prof, endpoint, scale=scale, **kwargs)
        with embedded_daemon(pols[0], prof) as daemon:
            click.echo(f"live: tokencaked (policy {pols[0]}) on {daemon.endpoint}", err=True)
            return sweep_live(workloads, rates, prof, daemon.endpoint, scale=scale, **kwargs)
    except (DaemonLost, LiveError) as e:
        raise click.ClickException(f"live mode: {type(e).__name__}: {e}") from e


CLUSTER_COLUMNS: tuple[str, ...] = ("workload", "routing", "L2", "mean s", "p95 s", "host hit")
CLUSTER_COLUMNS += ("L2 hit", "prefill", "restore ms", "link", "wb dropped")


@main.command("cluster", short_help="N engine hosts sharing one L2: routing x shared L2.")
@WORKLOAD
@option("--apps", click.IntRange(1, 1_000_000), 2000, "Applications in the trace.")
@option("--qps", POSITIVE, 0.5, "Application arrivals per second across the whole cluster.")
@option("--hosts", click.IntRange(1, 4096), 16, "Engine hosts sharing the L2.")
@option("--lanes", click.IntRange(1, 4096), 32, "Concurrent requests per host (its batch).")
@option("--host-gib", POSITIVE, 16.0, "Host KV cache (arena) per host.")
@option("--l2-gbps", POSITIVE, 25.0, "Shared L2 link, GB/s, for all hosts together.")
@option("--l2-latency-ms", NON_NEGATIVE, 2.0, "L2 round-trip latency, ms.")
@option("--l2-tib", POSITIVE, 4.0, "L2 capacity.")
@click.option(
    "--predictive-upload",
    is_flag=True,
    help="Bring a call's KV back ahead of it by the policy's rule (L2 fetch, then host copy), "
    "within the tool call before it; with the trace's tool times, an upper bound.",
)
@option("--profile", PROFILE, DEFAULT_PROFILE, "Engine profile of every host (tokencake-sim list).")
@SEED
@option(
    ("--json", "json_path"),
    click.Path(dir_okay=False, path_type=Path),
    None,
    "Also write the rows as JSON.",
)
def cluster_cmd(
    workload: list[str],
    apps: int,
    qps: float,
    hosts: int,
    lanes: int,
    host_gib: float,
    l2_gbps: float,
    l2_latency_ms: float,
    l2_tib: float,
    predictive_upload: bool,
    profile: str,
    seed: int,
    json_path: Path | None,
) -> None:
    """N engine hosts sharing one L2 (sim/cluster.py): routing x shared L2, same trace."""
    from tokencake.sim.cluster import ClusterConfig, simulate

    if json_path is not None and not json_path.parent.is_dir():
        raise click.BadParameter(f"no directory {json_path.parent}", param_hint="--json")
    prof = get_profile(profile)
    rows: list[dict[str, Any]] = []
    for wl in workload:
        for routing in ("random", "affinity"):
            for l2 in (False, True):
                cfg = ClusterConfig(
                    hosts=hosts,
                    lanes=lanes,
                    host_bytes=host_gib * 2**30,
                    l2=l2,
                    l2_capacity_bytes=l2_tib * 2**40,
                    l2_bytes_per_s=l2_gbps * 1e9,
                    l2_latency_s=l2_latency_ms / 1e3,
                    routing=routing,
                    predictive_upload=predictive_upload,
                )
                res = simulate(wl, prof, cfg, apps=apps, qps=qps, seed=seed)
                rows.append({"workload": wl, "qps": qps, **res.to_dict()})
    click.echo(
        f"{hosts} hosts x {host_gib:g} GiB host KV, {lanes} lanes; L2 {l2_gbps:g} GB/s shared, "
        f"{l2_latency_ms:g} ms; {apps} apps at {qps:g}/s; profile {profile}; seed {seed}"
        + ("; predictive upload" if predictive_upload else "")
    )
    click.echo(_cluster_table(rows))
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=2))


def _cluster_table(rows: list[dict[str, Any]]) -> str:
    """The ``cluster`` rows as the table it prints (CLUSTER_COLUMNS)."""
    table = [
        [
            r["workload"],
            r["routing"],
            "yes" if r["l2"] else "no",
            f"{r['mean_latency_s']:.1f}",
            f"{r['p95_latency_s']:.1f}",
            f"{r['host_hit_rate']:.3f}",
            f"{r['l2_hit_rate']:.3f}",
            f"{r['prefill_tokens'] / max(1, r['prompt_tokens']):.3f}",
            f"{r['mean_restore_s'] * 1e3:.1f}",
            f"{r['l2_link_util']:.2f}",
            r["l2_dropped_writes"],
        ]
        for r in rows
    ]
    return render_table(CLUSTER_COLUMNS, table, right=range(3, len(CLUSTER_COLUMNS)))


if __name__ == "__main__":  # pragma: no cover
    main()
