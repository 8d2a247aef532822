"""pass@k and the AVG score used to pick the baseline temperature.

pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained
on Code", eq. 1): with ``n`` samples of which ``c`` are correct, the probability that at least
one of ``k`` samples drawn without replacement is correct, ``1 - C(n-c, k) / C(n, k)``.

AVG (the SePT paper's model-selection score) is the mean of pass@1, pass@8 and pass@32, each
first averaged over the benchmarks. Two edge cases are defined here once:

* **Greedy decoding** (temperature 0) produces one sample, and every further sample would be
  the same, so pass@k equals pass@1 for every k: :func:`benchmark_metrics` fills all of
  :data:`KS` when called with ``greedy=True``.
* **Sampled runs with n < 32** cannot estimate pass@32. Their AVG is restricted to the targets
  that every benchmark has (e.g. pass@1 and pass@8 for n = 8) rather than substituting a smaller
  k; :func:`avg_ks` reports which were used so results files can say so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import fmean

KS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
AVG_KS: tuple[int, ...] = (1, 8, 32)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for ``c`` correct out of ``n`` samples.

    Uses the product form ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` (as in the Codex paper's
    reference code): the binomials themselves overflow floats for n in the hundreds.
    """
    if n < 1:
        raise ValueError(f"pass_at_k: n must be >= 1, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}; draw more samples")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    probability_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        probability_all_wrong *= 1.0 - k / i
    return 1.0 - probability_all_wrong


def benchmark_metrics(correct_counts: Sequence[int], n: int, *, greedy: bool = False) -> dict[int, float]:
    """Mean pass@k over a benchmark's questions, for each k in :data:`KS` with k <= n.

    ``correct_counts[i]`` is how many of question i's ``n`` samples are correct. With
    ``greedy=True`` (which requires n == 1) every k in :data:`KS` is reported as pass@1.
    """
    if not correct_counts:
        raise ValueError("benchmark_metrics: no questions (correct_counts is empty)")
    if greedy and n != 1:
        raise ValueError(f"benchmark_metrics: greedy decoding has n=1 sample, got n={n}")
    if greedy:
        pass_at_1 = fmean(pass_at_k(1, c, 1) for c in correct_counts)
        return {k: pass_at_1 for k in KS}
    return {k: fmean(pass_at_k(n, c, k) for c in correct_counts) for k in KS if k <= n}


def avg_ks(per_benchmark: Mapping[str, Mapping[int, float]]) -> tuple[int, ...]:
    """The AVG targets (of 1, 8, 32) that every benchmark has a value for."""
    if not per_benchmark:
        raise ValueError("avg_score: no benchmarks")
    available = [k for k in AVG_KS if all(k in values for values in per_benchmark.values())]
    if not available:
        raise ValueError("avg_score: some benchmark has no pass@1")
    return tuple(available)


def avg_score(per_benchmark: Mapping[str, Mapping[int, float]]) -> float:
    """Mean over pass@1, pass@8, pass@32 of the benchmark-averaged values.

    ``per_benchmark`` maps a benchmark name to ``{k: pass@k}``. Targets missing from any
    benchmark (n < k) are left out; see the module docstring.
    """
    return fmean(fmean(values[k] for values in per_benchmark.values()) for k in avg_ks(per_benchmark))
