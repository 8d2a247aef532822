"""The grading pool: the same grades as :func:`is_correct`, each answer under its deadline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sept_megatron.eval import grading
from sept_megatron.eval.grading import GradingPool, is_correct

# (response, ground truth): string fast path, numbers, sympy path, wrong, unboxed, no truth,
# repeats (graded once), and an answer that needs the deadline. No slow symbolic algebra: an
# answer near its deadline may grade differently under load, in any process.
CASES = [
    (r"so \boxed{0.5}", r"\frac{1}{2}"),
    (r"so \boxed{\frac12}", "0.5"),
    (r"\boxed{\dfrac{3}{4}}", r"\frac34"),
    (r"\boxed{0.6}", r"\frac{1}{2}"),
    (r"\boxed{27,648}", "27648"),
    (r"\boxed{(1,2)}", r"(1, 3)"),
    (r"\boxed{[0, 1)}", r"[0,1)"),
    ("The answer is 4.", "4"),
    (r"\boxed{4}", None),
    (r"\boxed{}", "4"),
    (r"first \boxed{3}, then \boxed{4}", "4"),
    (r"so \boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{2^{2^{2^{2^{2^{2^{2^{2^{2^{2}}}}}}}}}}", "2"),
]


def test_pool_and_in_process_grades_equal_is_correct():
    expected = [is_correct(response, truth) for response, truth in CASES]
    assert expected[:3] == [True, True, True] and expected[3] is False  # both kinds present
    responses, truths = zip(*CASES)
    with GradingPool(0) as in_process:
        assert in_process.grade(responses, truths) == expected
    with GradingPool(2) as pool:
        pending = pool.submit(responses, truths)  # returns at once; grading runs meanwhile
        assert pending.result() == expected
        assert pool.grade(responses[:2], truths[:2]) == expected[:2]  # workers are reused


def test_pool_workers_keep_the_per_answer_deadline():
    tower = r"\boxed{2^{2^{2^{2^{2^{2^{2^{2^{2^{2}}}}}}}}}}"
    with GradingPool(1) as pool:
        assert pool.grade([r"\boxed{0.5}"], [r"\frac{1}{2}"]) == [True]  # started and warm
        started = time.monotonic()
        assert pool.grade([tower], ["2"]) == [False]
        assert time.monotonic() - started < grading.ANSWER_TIMEOUT_S + 3.0


def test_bad_pool_arguments():
    with pytest.raises(ValueError, match="grading workers must be >= 0"):
        GradingPool(-1)
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        GradingPool(0).grade(["a", "b"], ["1"])


def test_pool_grades_real_ground_truths_like_one_process(benchmark_dir: Path):
    import pandas as pd

    truths = []
    for name in ("amc23", "minerva"):
        frame = pd.read_parquet(benchmark_dir / f"{name}.parquet")
        truths += [row["ground_truth"] for row in frame["reward_model"]][:40]
    responses = [f"so \\boxed{{{t}}}" if i % 2 else f"so \\boxed{{{t}+1}}" for i, t in enumerate(truths)]
    with GradingPool(2) as pool:
        assert pool.grade(responses, truths) == [is_correct(r, t) for r, t in zip(responses, truths)]
