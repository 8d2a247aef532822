"""pass@k against brute-force enumeration, and the AVG score's edge cases."""

from __future__ import annotations

import itertools
import math

import pytest

from sept_megatron.eval.metrics import AVG_KS, KS, avg_ks, avg_score, benchmark_metrics, pass_at_k


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (the first c correct) containing a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_matches_binomial_form_for_large_n() -> None:
    for n, c, k in [(64, 3, 32), (200, 17, 8), (500, 250, 32), (1000, 1, 1)]:
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-9)


def test_pass_at_k_is_stable_where_binomials_overflow_floats() -> None:
    value = pass_at_k(5000, 2, 32)  # C(5000, 32) ~ 1e82; the product form never builds it
    assert 0 < value < 1
    assert pass_at_k(5000, 0, 32) == 0.0
    assert pass_at_k(5000, 4990, 32) == 1.0


@pytest.mark.parametrize(("n", "c", "k"), [(4, 1, 5), (4, 1, 0), (4, 5, 1), (4, -1, 1), (0, 0, 1)])
def test_pass_at_k_rejects_impossible_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_benchmark_metrics_reports_only_k_up_to_n() -> None:
    metrics = benchmark_metrics([0, 2, 4], n=4)
    assert sorted(metrics) == [1, 2, 4]
    assert metrics[1] == pytest.approx((0 + 0.5 + 1) / 3)
    assert metrics[4] == pytest.approx((0 + 1 + 1) / 3)
    assert sorted(benchmark_metrics([1] * 5, n=32)) == list(KS)


def test_greedy_fills_every_k_with_pass_at_1() -> None:
    metrics = benchmark_metrics([1, 0, 1, 1], n=1, greedy=True)
    assert sorted(metrics) == list(KS)
    assert set(metrics.values()) == {0.75}
    assert benchmark_metrics([1, 0], n=1) == {1: 0.5}  # sampled n=1 only estimates pass@1


def test_benchmark_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="greedy"):
        benchmark_metrics([1], n=2, greedy=True)
    with pytest.raises(ValueError, match="no questions"):
        benchmark_metrics([], n=4)


def test_avg_score_is_mean_of_pass_1_8_32_over_benchmark_means() -> None:
    per_benchmark = {
        "a": {1: 0.1, 2: 0.9, 8: 0.3, 32: 0.5},
        "b": {1: 0.3, 2: 0.9, 8: 0.5, 32: 0.7},
    }
    assert avg_ks(per_benchmark) == AVG_KS
    assert avg_score(per_benchmark) == pytest.approx((0.2 + 0.4 + 0.6) / 3)


def test_avg_score_with_fewer_than_32_samples_uses_the_available_targets() -> None:
    per_benchmark = {"a": benchmark_metrics([1, 3], n=8), "b": benchmark_metrics([0, 8], n=8)}
    assert avg_ks(per_benchmark) == (1, 8)
    expected = (
        (per_benchmark["a"][1] + per_benchmark["b"][1]) / 2
        + (per_benchmark["a"][8] + per_benchmark["b"][8]) / 2
    ) / 2
    assert avg_score(per_benchmark) == pytest.approx(expected)


def test_avg_score_of_greedy_run_equals_pass_at_1() -> None:
    per_benchmark = {"a": benchmark_metrics([1, 0], n=1, greedy=True)}
    assert avg_score(per_benchmark) == pytest.approx(0.5)


def test_avg_score_rejects_empty_or_incomplete_input() -> None:
    with pytest.raises(ValueError):
        avg_score({})
    with pytest.raises(ValueError, match="pass@1"):
        avg_score({"a": {2: 0.5}})
