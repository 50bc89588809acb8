"""How sure the numbers are: intervals for an accuracy, tests between two, spread across seeds.

An accuracy here is k poems recited exactly out of n, a binomial proportion. Ranking models by it
with a test of each gap is the paper's memorization-ability assessment, with the statistics it
lacked. Only the standard library: the normal quantiles come from statistics.NormalDist.
"""
from __future__ import annotations

import math
import statistics

ALPHA = 0.05          # significance level of the tests; 95% intervals


def _check_counts(k: int, n: int) -> None:
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"a proportion needs 0 <= successes <= trials and trials > 0, got {k} of {n}")


def wilson_interval(k: int, n: int, confidence: float = 1 - ALPHA) -> tuple[float, float]:
    """(low, high) of the Wilson score interval (Wilson 1927) for k successes in n trials, as fractions.
    Unlike the normal approximation p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and keeps its
    coverage near 0% and 100%, where memorization runs end up."""
    _check_counts(k, n)
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at k = 0 (k = n) the bound is exactly 0 (1): the formula only rounds to it
    return 0.0 if k == 0 else center - half, 1.0 if k == n else center + half


def two_proportion_test(k1: int, n1: int, k2: int, n2: int, alpha: float = ALPHA) -> dict:
    """Pooled two-sided z-test of p1 = p2 (a 2x2 chi-square test without continuity correction)
    -> {"difference", "z", "p_value", "significant"}."""
    _check_counts(k1, n1)
    _check_counts(k2, n2)
    p1, p2 = k1 / n1, k2 / n2
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:                 # both 0% or both 100%: no evidence of a difference
        return {"difference": p1 - p2, "z": 0.0, "p_value": 1.0, "significant": False}
    z = (p1 - p2) / se
    p_value = math.erfc(abs(z) / math.sqrt(2))      # 2 (1 - Phi(|z|)), without cancellation in the tail
    return {"difference": p1 - p2, "z": z, "p_value": p_value, "significant": p_value < alpha}


def spread(values: list[float]) -> dict:
    """{"n", "mean", "std" (sample; None for one value), "min", "max"} of a metric across seeds."""
    if not values:
        raise ValueError("spread of no values: run at least one seed")
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def rank_by_accuracy(entries: list[dict], alpha: float = ALPHA) -> list[dict]:
    """entries (dicts with "correct" and "n", anything else kept) best first, each given its
    "accuracy", 95% "interval" and "vs_next": two_proportion_test against the next one (None last)."""
    ranked = sorted(entries, key=lambda e: -e["correct"] / e["n"])
    return [{**e, "accuracy": e["correct"] / e["n"], "interval": wilson_interval(e["correct"], e["n"]),
             "vs_next": two_proportion_test(e["correct"], e["n"], lower["correct"], lower["n"], alpha) if lower else None}
            for e, lower in zip(ranked, [*ranked[1:], None])]


def inside(k: int, n: int, percent: float) -> bool:
    """Whether a published accuracy (in %) lies in the 95% Wilson interval of k of n."""
    low, high = wilson_interval(k, n)
    return low <= percent / 100 <= high

