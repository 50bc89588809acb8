"""Intervals, tests and spreads against scipy (independent implementations) and known values."""
import math
import random
import statistics

import pytest

from engine.stats import inside, rank_by_accuracy, spread, two_proportion_test, wilson_interval

scipy_stats = pytest.importorskip("scipy.stats")


def test_wilson_interval_of_the_issue():
    low, high = wilson_interval(1550, 2000)
    assert (round(100 * low, 1), round(100 * high, 1)) == (75.6, 79.3)


def test_wilson_interval_matches_scipy_on_random_counts():
    rng = random.Random(0)
    cases = [(0, 7), (7, 7), (1, 1), (0, 2000), (2000, 2000)] + [
        (k, n) for n in (rng.randint(1, 3000) for _ in range(40)) for k in [rng.randint(0, n)]]
    for k, n in cases:
        want = scipy_stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        low, high = wilson_interval(k, n)
        assert low == pytest.approx(want.low, abs=1e-12) and high == pytest.approx(want.high, abs=1e-12), (k, n)
        assert 0 <= low <= k / n <= high <= 1


def test_two_proportion_test_matches_a_chi_square_test_without_correction():
    rng = random.Random(1)
    for _ in range(40):
        n1, n2 = rng.randint(20, 3000), rng.randint(20, 3000)
        k1, k2 = rng.randint(1, n1 - 1), rng.randint(1, n2 - 1)
        chi2, p_value, _, _ = scipy_stats.chi2_contingency([[k1, n1 - k1], [k2, n2 - k2]], correction=False)
        result = two_proportion_test(k1, n1, k2, n2)
        assert result["z"] ** 2 == pytest.approx(chi2, rel=1e-9)
        assert result["p_value"] == pytest.approx(p_value, rel=1e-6, abs=1e-14)
        assert result["significant"] == (p_value < 0.05)
        assert math.copysign(1, result["z"]) == math.copysign(1, k1 / n1 - k2 / n2)


def test_two_proportion_test_known_values_and_degenerate_cases():
    # 1550/2000 vs 1480/2000: z = 0.035 / sqrt(0.7575 * 0.2425 * 2 / 2000) = 2.5824, p = 0.0098
    result = two_proportion_test(1550, 2000, 1480, 2000)
    assert result["z"] == pytest.approx(2.5824, abs=1e-4) and result["p_value"] == pytest.approx(0.0098, abs=1e-4)
    assert result["significant"]
    assert not two_proportion_test(1550, 2000, 1530, 2000)["significant"]
    assert two_proportion_test(5, 5, 9, 9) == {"difference": 0.0, "z": 0.0, "p_value": 1.0, "significant": False}
    with pytest.raises(ValueError, match="successes <= trials"):
        two_proportion_test(3, 2, 1, 2)


def test_spread_is_the_sample_statistics():
    values = [0.775, 0.79, 0.7605]
    got = spread(values)
    assert got["n"] == 3 and got["min"] == 0.7605 and got["max"] == 0.79
    assert got["mean"] == pytest.approx(sum(values) / 3)
    assert got["std"] == pytest.approx(math.sqrt(sum((v - got["mean"]) ** 2 for v in values) / 2))
    assert got["std"] == pytest.approx(statistics.stdev(values))
    assert spread([0.5]) == {"n": 1, "mean": 0.5, "std": None, "min": 0.5, "max": 0.5}
    with pytest.raises(ValueError, match="at least one seed"):
        spread([])


def test_ranking_tests_each_gap_to_the_next_model_down():
    entries = [{"model": "a", "correct": 1480, "n": 2000}, {"model": "b", "correct": 1938, "n": 2000},
               {"model": "c", "correct": 1550, "n": 2000}, {"model": "d", "correct": 1530, "n": 2000}]
    ranked = rank_by_accuracy(entries)
    assert [r["model"] for r in ranked] == ["b", "c", "d", "a"]
    assert ranked[0]["accuracy"] == 0.969 and ranked[0]["interval"] == wilson_interval(1938, 2000)
    assert ranked[0]["vs_next"] == two_proportion_test(1938, 2000, 1550, 2000) and ranked[0]["vs_next"]["significant"]
    assert not ranked[1]["vs_next"]["significant"]          # 77.5% vs 76.5%: within noise at n = 2,000
    assert ranked[2]["vs_next"] == two_proportion_test(1530, 2000, 1480, 2000)
    assert ranked[-1]["vs_next"] is None


def test_paper_figure_inside_the_interval():
    assert inside(1550, 2000, 77.5) and inside(1550, 2000, 75.62) and not inside(1550, 2000, 75.61)
    assert inside(1550, 2000, 79.27) and not inside(1550, 2000, 79.28)
