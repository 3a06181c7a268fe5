"""Tool-duration prediction per (agent type, tool kind).

Tool durations are heavy-tailed and positive (the TokenCake paper, arXiv 2510.18586: a median of
0.2 s with a mean of 5 s is common), so a running mean is a poor centre and says nothing
about risk. We model ln(duration) as normal per key (a log-normal), which gives:

* the median as the point estimate, and quantiles for decisions that must be risk-aware:
  the offload test uses a low quantile (an offload only pays if the tool is still running
  when the KV comes back), the upload lands by a low quantile (slack = median - q_low,
  learned from the observed spread), the safety deadline uses a high quantile;
* a cold start that uses the caller's hint as a prior worth ``PRIOR_WEIGHT`` observations,
  corrected by the hint's learned bias (callers are often systematically optimistic);
* tracked prediction error (mean and mean-absolute log error), reported in reasons.

Updates are O(1) (Welford); lookups are two dict probes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from tokencake.daemon.scheduler.learned import learned

PRIOR_WEIGHT = 2.0
"""A hint counts as this many observations against the measured history."""
SIGMA_WITH_HINT = 0.5
SIGMA_NO_HINT = 1.0
"""Prior log-space spread: a hint is believed within ~x1.6, nothing within ~x2.7."""
ERROR_DECAY = 0.1
"""Weight of the newest sample in the error averages (about the last 10 calls)."""
MIN_S = 1e-4

# standard-normal quantiles used by callers
_STD_NORMAL = NormalDist()
Z_Q10 = -1.2816
Z_Q20 = -0.8416
Z_Q95 = 1.6449


@dataclass(slots=True)
class _Stats:
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    hint_bias_n: int = 0
    hint_bias: float = 0.0  # mean of ln(actual / hint)
    err_mean: float = 0.0  # EWMA of ln(actual / predicted median)
    err_abs: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)


@dataclass(slots=True)
class Prediction:
    """A log-normal duration estimate: ``mu``/``sigma`` of ln(seconds)."""

    mu: float
    sigma: float
    n: int
    source: str
    err_mean: float = 0.0
    err_abs: float = 0.0

    @property
    def median_s(self) -> float:
        return math.exp(self.mu)

    @property
    def mean_s(self) -> float:
        return math.exp(self.mu + 0.5 * self.sigma * self.sigma)

    def quantile_s(self, z: float) -> float:
        return math.exp(self.mu + z * self.sigma)

    def remaining_quantile_s(self, elapsed_s: float, z: float) -> float:
        """The ``z`` quantile of the time still to go, given the call has run ``elapsed_s``
        (the log-normal conditioned on lasting that long). Never negative."""
        if elapsed_s <= 0:
            return self.quantile_s(z)
        sigma = max(self.sigma, 1e-6)
        survived = _STD_NORMAL.cdf((math.log(elapsed_s) - self.mu) / sigma)
        target = survived + _STD_NORMAL.cdf(z) * (1.0 - survived)
        target = min(max(target, 1e-12), 1.0 - 1e-12)
        total = math.exp(self.mu + sigma * _STD_NORMAL.inv_cdf(target))
        return max(0.0, total - elapsed_s)

    def terms(self) -> dict[str, float | int | str]:
        return {
            "pred_median_s": self.median_s,
            "pred_sigma": self.sigma,
            "pred_n": self.n,
            "pred_source": self.source,
            "pred_err_mean_log": self.err_mean,
            "pred_err_abs_log": self.err_abs,
        }


class ToolDurationPredictor:
    """Per-key log-normal with a hint prior; falls back to the tool kind across types."""

    __slots__ = ("_by_key", "_by_kind", "default_s")

    def __init__(self, default_s: float = 1.0) -> None:
        self.default_s = default_s
        self._by_key: dict[tuple[str, str], _Stats] = {}
        self._by_kind: dict[str, _Stats] = {}

    def predict(self, agent_type: str, tool_kind: str, hint_s: float | None) -> Prediction:
        st = self._by_key.get((agent_type, tool_kind))
        source = "type+kind"
        if st is None or st.n == 0:
            st = self._by_kind.get(tool_kind)
            source = "kind"
        hint_ok = hint_s is not None and math.isfinite(hint_s) and hint_s > 0
        n = st.n if st is not None else 0
        if n == 0 and not hint_ok:
            return Prediction(math.log(self.default_s), SIGMA_NO_HINT, 0, "default")
        assert st is not None or hint_ok
        if hint_ok:
            assert hint_s is not None
            bias = st.hint_bias if st is not None and st.hint_bias_n > 0 else 0.0
            prior_mu = math.log(max(hint_s, MIN_S)) + bias
            prior_sigma = SIGMA_WITH_HINT
            weight = PRIOR_WEIGHT
        else:
            prior_mu = st.mean if st is not None else 0.0
            prior_sigma = SIGMA_NO_HINT
            weight = 1.0
        if n == 0 or st is None:
            return Prediction(prior_mu, prior_sigma, 0, "hint")
        mu = (weight * prior_mu + n * st.mean) / (weight + n)
        var = (weight * prior_sigma * prior_sigma + st.m2) / (weight + n)
        sigma = math.sqrt(max(var, 1e-6))
        src = source + ("+hint" if hint_ok else "")
        return Prediction(mu, sigma, n, src, st.err_mean, st.err_abs)

    def observe(
        self,
        agent_type: str,
        tool_kind: str,
        actual_s: float,
        hint_s: float | None,
        predicted: Prediction | None,
    ) -> None:
        """Learn from one finished call; ``predicted`` is what we said at its start."""
        if not (math.isfinite(actual_s) and actual_s >= 0):
            return
        x = math.log(max(actual_s, MIN_S))
        hint_err = None  # ln(actual / hint), the same for both tables
        if hint_s is not None and math.isfinite(hint_s) and hint_s > 0:
            hint_err = x - math.log(max(hint_s, MIN_S))
        for st in self._stats_for(agent_type, tool_kind):
            st.add(x)
            if hint_err is not None:
                st.hint_bias_n += 1
                st.hint_bias += (hint_err - st.hint_bias) / st.hint_bias_n
            if predicted is not None:
                err = x - predicted.mu
                st.err_mean += ERROR_DECAY * (err - st.err_mean)
                st.err_abs += ERROR_DECAY * (abs(err) - st.err_abs)

    def _stats_for(self, agent_type: str, tool_kind: str) -> tuple[_Stats, _Stats]:
        return (
            learned(self._by_key, (agent_type, tool_kind), _Stats),
            learned(self._by_kind, tool_kind, _Stats),
        )


class RunningMeanPredictor:
    """The estimator of the TokenCake authors' vLLM fork (github.com/pku-lemonade/TokenCake):
    the hint, the running mean, or their average. The peers use it."""

    __slots__ = ("_sums", "default_s")

    def __init__(self, default_s: float = 1.0) -> None:
        self.default_s = default_s
        self._sums: dict[tuple[str, str], list[float]] = {}  # [calls, seconds]

    def predict_s(self, agent_type: str, tool_kind: str, hint_s: float | None) -> float:
        n, total = self._sums.get((agent_type, tool_kind), (0, 0.0))
        hint_ok = hint_s is not None and math.isfinite(hint_s) and hint_s > 0
        if n and hint_ok:
            assert hint_s is not None
            return 0.5 * (total / n + hint_s)
        if n:
            return total / n
        if hint_ok:
            assert hint_s is not None
            return hint_s
        return self.default_s

    def observe(self, agent_type: str, tool_kind: str, actual_s: float) -> None:
        if math.isfinite(actual_s) and actual_s >= 0:
            sums = learned(self._sums, (agent_type, tool_kind), lambda: [0, 0.0])
            sums[0] += 1
            sums[1] += actual_s
