"""The soak's figures: samples, the daemon's memory reports, slopes, report rows, the plot.

``bench_soak.py`` drives the daemon and samples it; this module reads the daemon's memory
reports (``tokencake.daemon.memwatch``) and turns both into the slopes (least squares after
the warm-up), the allocators' rows of the printed report and the PNG. Besides the slopes it
prints the swing of live objects after the warm-up (pymalloc keeps an arena for every new
peak) and the objects the cycle collector freed then, with its full collections: objects
left to the collector are what makes the peaks (docs/benchmarks.md, the memory line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_load import slope_per_min


@dataclass
class Sample:
    t_min: float
    rss_kib: int
    anon_kib: int
    fds: int
    socket_fds: int


def memory_reports(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def growth_sites(reports: list[dict[str, Any]], warm_s: float) -> list[tuple[str, int]]:
    """Sites (listed in both reports) whose size grew from the first report after the
    warm-up to the last."""
    warm = next((r for r in reports if r["t"] >= warm_s), None)
    if warm is None or warm is reports[-1] or "top_growth" not in warm:
        return []
    before = {s["site"]: s["size"] for s in warm["top_growth"]}
    after = {s["site"]: s["size"] for s in reports[-1]["top_growth"]}
    grown = [(site, size - before[site]) for site, size in after.items() if site in before]
    return sorted(grown, key=lambda x: -x[1])[:8]


def plot(path: Path, samples: list[Sample], reports: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, fds) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    t = [s.t_min for s in samples]
    mem.plot(t, [s.rss_kib / 1024 for s in samples], label="RSS")
    mem.plot(t, [s.anon_kib / 1024 for s in samples], label="RssAnon")
    rt = [r["t"] / 60.0 for r in reports]
    if reports and "traced_bytes" in reports[-1]:
        mem.plot(rt, [r["traced_bytes"] / 2**20 for r in reports], label="Python heap (traced)")
    if reports and "mallinfo2" in reports[-1]:
        mi = [r["mallinfo2"] for r in reports]
        mem.plot(rt, [m["uordblks"] / 2**20 for m in mi], label="malloc in use")
        mem.plot(rt, [m["arena"] / 2**20 for m in mi], label="malloc arena")
    if reports and reports[-1].get("obmalloc"):
        ob = [r.get("obmalloc", {}) for r in reports]
        mem.plot(rt, [o.get("arena_bytes", 0) / 2**20 for o in ob], label="pymalloc arenas")
        mem.plot(rt, [o.get("allocated_bytes", 0) / 2**20 for o in ob], label="pymalloc in use")
    mem.set_ylabel("MiB")
    mem.set_ylim(bottom=0)
    mem.legend(loc="center right")
    mem.set_title(title)
    fds.plot(t, [s.fds for s in samples], label="open fds")
    fds.plot(t, [s.socket_fds for s in samples], label="of which sockets")
    fds.set_ylabel("count")
    fds.set_ylim(bottom=0)
    fds.set_xlabel("minutes")
    fds.legend(loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def slopes(
    samples: list[Sample], reports: list[dict[str, Any]], warm_min: float
) -> dict[str, float]:
    warm = [s for s in samples if s.t_min >= warm_min] or samples
    t = [s.t_min * 60.0 for s in warm]
    out = {
        "rss_kib_min": slope_per_min(t, [s.rss_kib for s in warm]),
        "anon_kib_min": slope_per_min(t, [s.anon_kib for s in warm]),
        "fds_min": slope_per_min(t, [s.fds for s in warm]),
        "rss_whole_kib_min": slope_per_min(
            [s.t_min * 60.0 for s in samples], [s.rss_kib for s in samples]
        ),
    }
    rwarm = [r for r in reports if r["t"] >= warm_min * 60.0]
    rt = [r["t"] for r in rwarm]
    if len(rwarm) >= 2 and "traced_bytes" in rwarm[-1]:
        out["heap_kib_min"] = slope_per_min(rt, [r["traced_bytes"] / 1024 for r in rwarm])
    if len(rwarm) >= 2 and "mallinfo2" in rwarm[-1]:
        for key in ("uordblks", "arena", "hblkhd"):
            out[f"malloc_{key}_kib_min"] = slope_per_min(
                rt, [r["mallinfo2"][key] / 1024 for r in rwarm]
            )
    if len(rwarm) >= 2 and rwarm[-1].get("obmalloc"):
        for key in ("arena_bytes", "allocated_bytes"):
            out[f"pymalloc_{key}_kib_min"] = slope_per_min(
                rt, [r["obmalloc"].get(key, 0) / 1024 for r in rwarm]
            )
    if len(rwarm) >= 2:
        out["gc_objects_min"] = slope_per_min(rt, [r["gc_objects"] for r in rwarm])
    return out


def report_rows(sl: dict[str, float], reports: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """The daemon's own figures: traced heap, glibc's allocator, live objects."""
    rows: list[tuple[str, Any]] = []
    if not reports:
        return rows
    first, last = reports[0], reports[-1]
    if "heap_kib_min" in sl:
        rows.append(("Python heap slope after warm-up (KiB/min)", f"{sl['heap_kib_min']:.2f}"))
        rows.append(
            (
                "Python heap first / last (KiB)",
                f"{first['traced_bytes'] // 1024} / {last['traced_bytes'] // 1024}",
            )
        )
    if "mallinfo2" in last:
        mi = last["mallinfo2"]
        rows.append(
            (
                "malloc in use / free / mmapped (KiB)",
                f"{mi['uordblks'] // 1024} / {mi['fordblks'] // 1024} / {mi['hblkhd'] // 1024}",
            )
        )
        rows.append(
            (
                "malloc in use / arena / mmapped slope (KiB/min)",
                " / ".join(
                    f"{sl.get(f'malloc_{k}_kib_min', 0.0):.2f}"
                    for k in ("uordblks", "arena", "hblkhd")
                ),
            )
        )
    if last.get("obmalloc"):
        ob0, ob1 = first.get("obmalloc", {}), last["obmalloc"]
        rows.append(
            (
                "pymalloc arenas first / last / high-water",
                f"{ob0.get('arenas', 0)} / {ob1.get('arenas', 0)} / "
                f"{ob1.get('arenas_highwater', 0)}",
            )
        )
        rows.append(
            (
                "pymalloc arenas / in use slope (KiB/min)",
                f"{sl.get('pymalloc_arena_bytes_kib_min', 0.0):.2f} / "
                f"{sl.get('pymalloc_allocated_bytes_kib_min', 0.0):.2f}",
            )
        )
    if "gc_objects_min" in sl:
        rows.append(
            (
                "live objects first / last (slope /min)",
                f"{first['gc_objects']:,} / {last['gc_objects']:,} ({sl['gc_objects_min']:.1f})",
            )
        )
    return rows


def collector_rows(reports: list[dict[str, Any]], warm_s: float) -> list[tuple[str, Any]]:
    """Live objects' swing after the warm-up and what the cycle collector freed meanwhile:
    objects that only a full collection frees pile up between those, and each new peak of
    live objects keeps pymalloc arenas (docs/benchmarks.md, the memory line)."""
    warm = [r for r in reports if r["t"] >= warm_s]
    if len(warm) < 2:
        return []
    live = [r["gc_objects"] for r in warm]
    rows: list[tuple[str, Any]] = [
        ("live objects after warm-up min / max", f"{min(live):,} / {max(live):,}")
    ]
    if "gc_collected" in warm[-1]:
        pairs = zip(warm[0]["gc_collected"], warm[-1]["gc_collected"], strict=True)
        freed = [after - before for before, after in pairs]
        rows.append(("cyclic garbage freed after warm-up, gen 0/1/2", " / ".join(map(str, freed))))
    if "gc_collections" in warm[-1] and "gc_collections" in warm[0]:
        full = warm[-1]["gc_collections"][2] - warm[0]["gc_collections"][2]
        rows.append(("full collections after warm-up", f"{full:,}"))
    return rows
