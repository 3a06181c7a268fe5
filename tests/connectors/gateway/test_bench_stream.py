"""The gateway bench's streaming figures (``bench/bench_gateway_stream.py``): the summary of
paired ratios, and the CPU ratios from per-stream CPU."""

from __future__ import annotations

import pytest

from bench.bench_gateway_stream import _figures, _Path, rotations, spread


def test_the_spread_of_paired_ratios() -> None:
    ratios = [0.90, 0.94, 0.96, 0.97, 0.98, 1.00, 1.02, 1.05, 1.30]
    s = spread(ratios)
    assert s["median"] == 0.98
    assert s["pairs"] == 9
    assert s["under_0.95"] == round(2 / 9, 3)
    assert s["q25"] <= s["median"] <= s["q75"]
    low, high = s["ci95"]
    assert min(ratios) <= low <= s["median"] <= high <= max(ratios)
    assert spread(ratios) == s  # seeded: the same ratios give the same interval
    assert spread([1.0])["ci95"] == [1.0, 1.0]


def test_an_outlier_pair_moves_the_median_little() -> None:
    steady = [1.0 + 0.01 * (i % 5 - 2) for i in range(60)]
    assert spread([*steady, 0.2, 0.3])["median"] == pytest.approx(1.0, abs=0.011)


def test_every_target_takes_every_place_in_turn() -> None:
    names = ["gateway", "plain", "baseline"]
    firsts = {rotations(names, i)[0] for i in range(3)}
    assert firsts == set(names)
    assert sorted(rotations(names, 7)) == sorted(names)


def test_cpu_ratios_from_the_cpu_per_stream() -> None:
    """Direct: stub 4 + client 4 ms per stream. Via plain: stub 4, client 1, proxy 3 -> 8/8.
    Via the gateway: the same and 1 ms more of its own, 0.5 of its daemon's net of the
    daemon's idle rate (0.1 s/s over a 10 s phase: 1 s, over 2 streams) -> 8/9.5."""
    paths = {name: _Path() for name in ("direct", "gateway", "plain")}
    for name, path in paths.items():
        path.wall_s = [0.01, 0.01]
        path.stub_s = 0.008
        path.client_s = 0.008 if name == "direct" else 0.002
        path.size = 1000
    paths["gateway"].ratios = [0.9, 1.0]
    paths["plain"].ratios = [1.0, 1.1]
    used = {"gateway": 0.008, "plain": 0.006, "daemon": 1.001}
    out = _figures(paths, ["gateway", "plain"], used, {"daemon": 0.1}, 10.0)
    assert out["cpu_ms_per_stream"]["gateway"] == {
        "stub": 4.0,
        "client": 1.0,
        "proxy": 4.0,
        "daemon": 0.5,
        "daemon_gross": 500.5,
    }
    assert out["plain"]["cpu_ratio"] == 1.0
    assert out["gateway"]["cpu_ratio"] == round(8 / 9.5, 4)
    assert out["gateway"]["relay_cpu_vs_plain"] == round(3 / 4.5, 4)
    assert out["gateway"]["median"] == 0.95
