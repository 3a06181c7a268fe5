"""The GPU-KV utilisation figure: one panel per policy, smoothed, with the run mean."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tokencake.sim.plots import _smooth, _util_timeline
from tokencake.sim.runner import Series


def test_smooth_is_a_trailing_moving_average() -> None:
    t = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    u = np.array([0.0, 1.0, 0.0, 1.0, 0.0])
    got = _smooth(t, u, 1.0)  # each sample with the one 1 s before it
    assert got.tolist() == [0.0, 0.5, 0.5, 0.5, 0.5]
    assert _smooth(t, u, 100.0)[-1] == pytest.approx(0.4)


def test_util_figure_has_one_panel_per_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.pyplot as plt

    ser = [
        Series("w", p, 1.0, timeline=[(float(i), (i % 7) / 7) for i in range(50)])
        for p in ("vllm", "tokencake", "continuum", "oracle")
    ]
    panels: list[int] = []
    save = plt.Figure.savefig

    def spy(fig: plt.Figure, *a: Any, **k: Any) -> None:
        panels.append(sum(ax.get_visible() for ax in fig.axes))
        save(fig, *a, **k)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    pols = ["vllm", "tokencake", "continuum", "oracle"]
    path = _util_timeline(ser, pols, 1.0, tmp_path / "u.png", "w")
    assert path.stat().st_size > 0
    assert panels == [3]  # the oracle has no pool: no panel
