"""Numeric grading at the edge of its tolerance, and the always-safe normalisation.

Decimals compare with a relative tolerance of 1e-6 (grading._numbers_equal), integers exactly.
The pairs sit just inside and just outside that tolerance, so exact equality or a looser bar
both fail here. Every pair is a plain number: graded without math-verify, in microseconds.
"""

from __future__ import annotations

import pytest

from sept_megatron.eval.grading import is_correct, normalise_answer

JUST_INSIDE = [  # relative difference below 1e-6
    ("0.333333", "0.3333333"),  # 3e-7
    ("2", "2.0000001"),  # 5e-8
    ("2.5", "2.4999980"),  # 8e-7
    ("-1.5e-8", r"-1.500001 \times 10^{-8}"),  # 6.7e-7, scale-free
    ("1000000.5", "1000001.2"),  # 7e-7 of a large value
]
JUST_OUTSIDE = [  # relative difference above 1e-6
    ("0.333333", "0.333334"),  # 3e-6
    ("2", "2.000003"),  # 1.5e-6
    ("2.5", "2.499995"),  # 2e-6
    ("-1.5e-8", r"-1.50001 \times 10^{-8}"),  # 6.7e-6
    ("1000000", "1000001"),  # integers: exactly, whatever the size
]


@pytest.mark.parametrize(("truth", "answer"), JUST_INSIDE)
def test_numbers_within_one_part_per_million_grade_correct(truth: str, answer: str) -> None:
    assert is_correct(f"so the answer is \\boxed{{{answer}}}", truth)


@pytest.mark.parametrize(("truth", "answer"), JUST_OUTSIDE)
def test_numbers_beyond_one_part_per_million_grade_wrong(truth: str, answer: str) -> None:
    assert not is_correct(f"so the answer is \\boxed{{{answer}}}", truth)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        (r"\text{yes}", "yes"),
        (r"\textbf{(B)}", "(B)"),
        (r"\mathrm{east}", "east"),
        (r" \text{ 12 } ", "12"),
        (r"\dfrac{1}{2}.", r"\frac{1}{2}"),
        (r"\tfrac 3 4", r"\frac34"),
    ],
)
def test_normalisation_unwraps_text_and_unifies_fraction_spellings(raw: str, normalised: str) -> None:
    # math-verify would also accept most of these, but slowly (sympy); the fast path must.
    assert normalise_answer(raw) == normalised
