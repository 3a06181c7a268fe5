"""Live sweeps: ``runner.run_one`` and ``runner.sweep`` against a real ``tokencaked``.

Each run replays one (workload, rate) through ``live.DaemonPolicy`` and returns the same
record a simulated run does, with ``mode: "live"`` and the exchange counters added.
``embedded_daemon`` starts a private daemon for ``tokencake-sim run --live-embedded``.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tokencake.clients.client import TokenCakeClient
from tokencake.clients.launcher import DaemonProcess, LaunchError, daemon_flags, spawn
from tokencake.sim.engine import SimulationError
from tokencake.sim.generators import get_generator, make_trace
from tokencake.sim.kvpool import PoolInvariantError
from tokencake.sim.live import DaemonLost, DaemonPolicy, LiveError, arena_bytes_for
from tokencake.sim.metrics import RunMeta, summarise
from tokencake.sim.profiles import Profile
from tokencake.sim.runner import Series, failure_record
from tokencake.sim.workload import NoiseConfig

logger = logging.getLogger(__name__)

EMBEDDED_START_S = 20.0
"""How long an embedded daemon may take to answer its first ping."""


# --------------------------------------------------------------------------- embedded daemon


@contextmanager
def embedded_daemon(policy: str, profile: Profile) -> Iterator[DaemonProcess]:
    """Start ``tokencaked`` with ``policy`` and an arena for the profile's host store, on a
    private ipc socket (``--live-embedded``); stop it (SIGTERM) on exit."""
    with tempfile.TemporaryDirectory(prefix="tokencake-sim-") as tmp:
        daemon = spawn(
            *daemon_flags(arena=arena_bytes_for(profile), policy=policy),
            instance=f"sim{uuid.uuid4().hex[:10]}",
            workdir=Path(tmp),
        )
        try:
            try:
                daemon.wait_ready(EMBEDDED_START_S)
            except LaunchError as exc:
                raise LiveError(str(exc)) from None
            yield daemon
        finally:
            daemon.stop()


# --------------------------------------------------------------------------- sweeps


def run_one_live(
    workload: str,
    qps: float,
    profile: Profile,
    endpoint: str,
    *,
    scale: float,
    seed: int,
    n_apps: int | None = None,
    noise: NoiseConfig | None = None,
) -> tuple[dict[str, Any], Series]:
    """``runner.run_one`` against a daemon: the record of one live replay.

    The record is ``metrics.summarise``'s, with ``policy`` the daemon's policy and
    ``mode: "live"``, ``time_scale``, ``endpoint`` and the exchange counters (``live``) added.
    ``DaemonLost`` is raised, not recorded: a sweep against a dead daemon cannot go on.
    """
    gen = get_generator(workload)
    trace = make_trace(gen, qps=qps, seed=seed, n_apps=n_apps, noise=noise)
    prefix = f"sim-{uuid.uuid4().hex[:8]}-"
    t0 = time.perf_counter()
    with TokenCakeClient(endpoint) as client:
        policy = DaemonPolicy(client, profile, scale=scale, app_prefix=prefix)
        sim = policy.simulator(trace)
        error: SimulationError | PoolInvariantError | None = None
        try:
            res = sim.run()
        except DaemonLost:
            raise
        except (SimulationError, PoolInvariantError) as exc:
            error = exc
        finally:
            policy.close()
    wall = time.perf_counter() - t0
    daemon_policy = policy.daemon_policy
    meta = RunMeta(
        policy=daemon_policy,
        engine_policy=f"live:{daemon_policy}",
        workload=gen.name,
        profile=profile.name,
        seed=seed,
        qps=qps,
        n_apps=len(trace.apps),
        unbounded_gpu=False,
        wall_s=wall,
    )
    series = Series(gen.name, daemon_policy, qps)
    live = {"mode": "live", "time_scale": scale, "endpoint": endpoint, "live": asdict(policy.stats)}
    if error is not None:
        logger.warning("live %s at %.3g app/s did not finish: %s", workload, qps, error)
        return {**failure_record(meta, sim, error), **live}, series
    series.app_latency_s = list(res.app_latency_s)
    series.timeline = list(res.timeline)
    return {**summarise(res, meta), **live}, series


def sweep_live(
    workloads: list[str],
    qps_list: list[float],
    profile: Profile,
    endpoint: str,
    *,
    scale: float,
    seed: int,
    n_apps: int | None = None,
    noise: NoiseConfig | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], list[Series]]:
    """``runner.sweep`` for live mode: one run per (workload, qps), the daemon's policy."""
    records: list[dict[str, Any]] = []
    series: list[Series] = []
    for wl in workloads:
        for qps in qps_list:
            rec, s = run_one_live(
                wl, qps, profile, endpoint, scale=scale, seed=seed, n_apps=n_apps, noise=noise
            )
            records.append(rec)
            series.append(s)
            if progress is not None:
                progress(rec)
    return records, series
