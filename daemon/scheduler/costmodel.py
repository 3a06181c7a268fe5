"""Transfer-time estimates from online measurements.

Per direction we fit ``seconds = overhead + bytes / bandwidth`` by exponentially weighted
least squares over measured copies, so both the bandwidth and the per-copy overhead track
the machine (PCIe generation, pinned or not, contention) instead of a constant. With too
few distinct copy sizes for a line, the bandwidth alone is refined and the overhead kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAY = 0.05
"""Weight of the newest measurement (about the last 20 copies dominate)."""
BW_DECAY = 0.2
"""Faster weight for the bandwidth-only update used before a line can be fitted."""


@dataclass(slots=True)
class _Fit:
    bytes_per_s: float
    overhead_s: float
    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    samples: int = 0

    def add(self, nbytes: float, seconds: float) -> None:
        a = DECAY
        keep = 1.0 - a
        self.w = keep * self.w + a
        self.sx = keep * self.sx + a * nbytes
        self.sy = keep * self.sy + a * seconds
        self.sxx = keep * self.sxx + a * nbytes * nbytes
        self.sxy = keep * self.sxy + a * nbytes * seconds
        self.samples += 1
        mx = self.sx / self.w
        my = self.sy / self.w
        var = self.sxx / self.w - mx * mx
        cov = self.sxy / self.w - mx * my
        if self.samples >= 3 and var > (0.01 * mx) ** 2 and cov > 0:
            slope = cov / var
            self.bytes_per_s = 1.0 / slope
            self.overhead_s = max(0.0, my - slope * mx)
        else:
            moving = seconds - self.overhead_s
            if moving > 0 and nbytes > 0:
                sample_bw = nbytes / moving
                if self.samples == 1:
                    self.bytes_per_s = sample_bw
                else:
                    self.bytes_per_s += BW_DECAY * (sample_bw - self.bytes_per_s)


class TransferCostModel:
    """Estimates copy times in each direction from measured copies."""

    __slots__ = ("_fits", "bytes_per_block")

    def __init__(
        self,
        bytes_per_block: int,
        d2h_bytes_per_s: float,
        h2d_bytes_per_s: float,
        overhead_s: float,
        l2_bytes_per_s: float = 1e9,
        l2_overhead_s: float = 0.001,
    ) -> None:
        self.bytes_per_block = bytes_per_block
        self._fits = {
            "d2h": _Fit(d2h_bytes_per_s, overhead_s),
            "h2d": _Fit(h2d_bytes_per_s, overhead_s),
            "l2": _Fit(l2_bytes_per_s, l2_overhead_s),  # L2 -> host arena, one chain's fetch
        }

    def observe(self, direction: str, nbytes: int, seconds: float) -> None:
        fit = self._fits.get(direction)
        if fit is None or not (math.isfinite(seconds) and seconds > 0 and nbytes > 0):
            return
        fit.add(float(nbytes), seconds)

    def seconds(self, direction: str, blocks: int, copies: int = 1) -> float:
        """Time to move ``blocks`` in ``copies`` separate copies (0 blocks cost nothing)."""
        if blocks <= 0:
            return 0.0
        fit = self._fits[direction]
        return copies * fit.overhead_s + blocks * self.bytes_per_block / fit.bytes_per_s

    def bandwidth(self, direction: str) -> float:
        return self._fits[direction].bytes_per_s

    def overhead(self, direction: str) -> float:
        return self._fits[direction].overhead_s


def upload_lead_s(cost: TransferCostModel, blocks: int, l2_blocks: int, piece_blocks: int) -> float:
    """How long before it is needed an upload of ``blocks`` must start when ``l2_blocks`` of
    them left the host arena for the L2 tier: one fetch L2 -> arena, then the arena -> GPU
    copies in pieces. The daemon's policy and the simulator's cluster model share this rule.
    """
    if blocks <= 0:
        return 0.0
    pieces = -(-blocks // max(1, piece_blocks))
    return cost.seconds("l2", min(max(l2_blocks, 0), blocks)) + cost.seconds("h2d", blocks, pieces)
