"""The four figures of a sweep, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from tokencake.sim.runner import Series

logger = logging.getLogger(__name__)

BREAKDOWN = ("queueing", "transfer_wait", "prefill_recompute", "prefill_new", "decode")


def _policies(records: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        seen[r["policy"]] = None
    return list(seen)


def plot_all(
    records: list[dict[str, Any]], series: list[Series], out: Path, focus_qps: float
) -> list[Path]:
    """Write per-workload PNGs into ``out``; ``focus_qps`` picks the run for the
    timeline, CDF and breakdown figures (the issue's targets are at 1 app/s)."""
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    for wl in workloads:
        recs = [r for r in records if r["workload"] == wl]
        ser = [s for s in series if s.workload == wl]
        pols = _policies(recs)
        paths.append(_latency_vs_qps(recs, pols, out / f"{wl}_latency_vs_qps.png", wl))
        qps_here = sorted({r["qps"] for r in recs})
        q = focus_qps if focus_qps in qps_here else qps_here[-1]
        paths.append(_util_timeline(ser, pols, q, out / f"{wl}_gpu_kv_util.png", wl))
        paths.append(_latency_cdf(ser, pols, q, out / f"{wl}_latency_cdf.png", wl))
        paths.append(_breakdown(recs, pols, q, out / f"{wl}_time_breakdown.png", wl))
    return paths


def _latency_vs_qps(recs: list[dict[str, Any]], pols: list[str], path: Path, wl: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in pols:
        pts = sorted(
            (r["qps"], r["mean_latency_s"])
            for r in recs
            if r["policy"] == p and r["mean_latency_s"] is not None
        )
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("application arrival rate (app/s)")
    ax.set_ylabel("mean end-to-end latency (s)")
    ax.set_title(f"{wl}: latency vs load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


UTIL_SMOOTH_S = 30.0
"""Window of the moving average drawn over each utilisation trace."""


def _smooth(t: np.ndarray, u: np.ndarray, window_s: float) -> np.ndarray:
    """Moving average of ``u`` over the samples within ``window_s`` before each one."""
    c = np.concatenate(([0.0], np.cumsum(u)))
    lo = np.searchsorted(t, t - window_s, side="left")
    hi = np.arange(1, len(u) + 1)
    return (c[hi] - c[lo]) / (hi - lo)


def _util_timeline(ser: list[Series], pols: list[str], q: float, path: Path, wl: str) -> Path:
    """One panel per policy (same axes): the raw trace faint, its 30 s moving average, and
    the run's time average as a dashed line (its value in the panel title)."""
    runs = [
        (p, s)
        for p in pols
        if p != "oracle"
        for s in ser
        if s.policy == p and s.qps == q and s.timeline
    ]
    cols = 2
    rows = max(1, -(-len(runs) // cols))
    fig, axes = plt.subplots(
        rows, cols, figsize=(10, 1.9 * rows + 0.8), sharex=True, sharey=True, squeeze=False
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (p, s) in enumerate(runs):
        ax = axes[i // cols][i % cols]
        t = np.array([x for x, _ in s.timeline])
        t = t - t[0]
        u = np.array([y for _, y in s.timeline])
        colour = colours[i % len(colours)]
        ax.plot(t, u, color=colour, alpha=0.25, linewidth=0.6)
        ax.plot(t, _smooth(t, u, UTIL_SMOOTH_S), color=colour, linewidth=1.6)
        span = t[-1] - t[0] if len(t) > 1 else 0.0
        mean = float(np.trapezoid(u, t) / span) if span > 0 else float(u.mean())
        ax.axhline(mean, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(f"{p}: mean {mean:.2f}", fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.grid(True, alpha=0.3)
    for j in range(len(runs), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("time since first arrival (s)")
    for row in axes:
        row[0].set_ylabel("GPU KV util")
    fig.suptitle(
        f"{wl}: GPU KV held by running / about-to-run requests, {q:g} app/s "
        f"(faint: raw; line: {UTIL_SMOOTH_S:g} s average; dashed: run mean)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latency_cdf(ser: list[Series], pols: list[str], q: float, path: Path, wl: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in pols:
        for s in ser:
            if s.policy == p and s.qps == q and s.app_latency_s:
                x = np.sort(np.asarray(s.app_latency_s))
                y = np.arange(1, len(x) + 1) / len(x)
                ax.step(x, y, where="post", label=p)
    ax.set_xlabel("application latency (s)")
    ax.set_ylabel("fraction of applications")
    ax.set_title(f"{wl}: latency CDF, {q:g} app/s")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _breakdown(recs: list[dict[str, Any]], pols: list[str], q: float, path: Path, wl: str) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    rows = [
        r for p in pols for r in recs if r["policy"] == p and r["qps"] == q and "breakdown_s" in r
    ]
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for part in BREAKDOWN:
        vals = np.array([r["breakdown_s"][part] for r in rows])
        ax.bar(x, vals, bottom=bottom, label=part.replace("_", " "))
        bottom += vals
    ax.set_xticks(x, [r["policy"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("request-seconds per application")
    ax.set_title(f"{wl}: where the time went, {q:g} app/s")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
