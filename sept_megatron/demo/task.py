"""The built-in demo task: procedural 2-3 step integer arithmetic with worked solutions.

Why this task: SePT needs a base model that is right often enough for its own greedy-ish
samples to be useful training data, but wrong often enough that self-training has something
to fix (pass@k clearly above pass@1). Real math data needs a real model; this task is sized
for a ~1-5M parameter model with a tiny subword tokenizer and sequences under ~96 tokens, so
the whole SePT loop can run on a laptop CPU.

A problem reads ``Compute (12 + 7) * 3 - 45.`` and its solution writes one step per sentence,
``12 + 7 = 19. 19 * 3 = 57. 57 - 45 = 12. The answer is \\boxed{12}.``: the final answer is a
plain integer inside ``\\boxed{}`` so the project's math-verify grader and pass@k code read it
like any other math dataset. :func:`base_corpus` plants single arithmetic slips in a chosen
fraction of the solutions; a base model pretrained on it learns to make (and propagate) such
slips, which is what makes it imperfect.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

DATA_SOURCE = "arith"

# An operand is a literal integer or a reference ``Ref(i)`` to the result of step ``i``.


@dataclass(frozen=True)
class Ref:
    """The result of an earlier step, used as an operand of a later one."""

    step: int


Operand = int | Ref


@dataclass(frozen=True)
class Step:
    """One binary operation ``left op right`` of a worked solution."""

    left: Operand
    op: str  # "+", "-" or "*"
    right: Operand


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One task instance. ``answer`` is the integer the grader compares against, as text."""

    question: str
    solution: str
    answer: str


@dataclass(frozen=True, kw_only=True)
class CorpusExample:
    """One SFT example of the base-model corpus; ``slipped`` marks a planted arithmetic slip."""

    question: str
    response: str
    slipped: bool

    def messages(self) -> list[dict[str, str]]:
        """The chat turns, for ``tokenizer.apply_chat_template``."""
        return [
            {"role": "user", "content": self.question},
            {"role": "assistant", "content": self.response},
        ]


# --- problem templates -------------------------------------------------------------------
# Each template draws its numbers and returns (expression text, steps). Numbers stay at one or
# two digits and every intermediate result is non-negative, so a tiny model only has to learn
# small-number facts and copying; the answer is at most a few hundred.


def _sum_times_minus(rng: random.Random) -> tuple[str, list[Step]]:
    a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(2, 9)
    d = rng.randint(1, min((a + b) * c, 99))
    return f"({a} + {b}) * {c} - {d}", [Step(a, "+", b), Step(Ref(0), "*", c), Step(Ref(1), "-", d)]


def _times_plus(rng: random.Random) -> tuple[str, list[Step]]:
    a, b, c = rng.randint(2, 12), rng.randint(2, 9), rng.randint(1, 50)
    return f"{a} * {b} + {c}", [Step(a, "*", b), Step(Ref(0), "+", c)]


def _plus_times(rng: random.Random) -> tuple[str, list[Step]]:
    a, b, c = rng.randint(1, 50), rng.randint(2, 12), rng.randint(2, 9)
    return f"{a} + {b} * {c}", [Step(b, "*", c), Step(a, "+", Ref(0))]


def _diff_times(rng: random.Random) -> tuple[str, list[Step]]:
    a = rng.randint(5, 40)
    b, c = rng.randint(1, a - 1), rng.randint(2, 9)
    return f"({a} - {b}) * {c}", [Step(a, "-", b), Step(Ref(0), "*", c)]


def _times_minus(rng: random.Random) -> tuple[str, list[Step]]:
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    c = rng.randint(1, a * b)
    return f"{a} * {b} - {c}", [Step(a, "*", b), Step(Ref(0), "-", c)]


def _sum_times_diff(rng: random.Random) -> tuple[str, list[Step]]:
    a, b = rng.randint(1, 15), rng.randint(1, 15)
    c = rng.randint(3, 20)
    d = rng.randint(max(1, c - 9), c - 1)  # c - d <= 9: a two-by-one-digit product
    return f"({a} + {b}) * ({c} - {d})", [Step(a, "+", b), Step(c, "-", d), Step(Ref(0), "*", Ref(1))]


_TEMPLATES: tuple[Callable[[random.Random], tuple[str, list[Step]]], ...] = (
    _sum_times_minus,
    _times_plus,
    _plus_times,
    _diff_times,
    _times_minus,
    _sum_times_diff,
)


# --- solving and writing solutions --------------------------------------------------------


def _apply(op: str, left: int, right: int) -> int:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    raise ValueError(f"unknown operator {op!r}")


def solve(steps: list[Step], slip: tuple[int, int] | None = None) -> list[int]:
    """Results of every step; ``slip=(step, delta)`` adds ``delta`` to that step's result.

    The slipped value is used by every later step, as a student who miscalculated once and
    carried on correctly would do, so the final answer is wrong too.
    """
    results: list[int] = []
    for index, step in enumerate(steps):
        left, right = (results[x.step] if isinstance(x, Ref) else x for x in (step.left, step.right))
        value = _apply(step.op, left, right)
        if slip is not None and slip[0] == index:
            value += slip[1]
        results.append(value)
    return results


def write_solution(steps: list[Step], results: list[int]) -> str:
    """One sentence per step, then the boxed final answer."""
    sentences = []
    for step, value in zip(steps, results):
        left, right = (results[x.step] if isinstance(x, Ref) else x for x in (step.left, step.right))
        sentences.append(f"{left} {step.op} {right} = {value}.")
    sentences.append(f"The answer is \\boxed{{{results[-1]}}}.")
    return " ".join(sentences)


def _draw(rng: random.Random) -> tuple[str, list[Step]]:
    template = _TEMPLATES[rng.randrange(len(_TEMPLATES))]
    expression, steps = template(rng)
    return f"Compute {expression}.", steps


def make_problem(rng: random.Random) -> Problem:
    """Draw one problem with its correct worked solution."""
    question, steps = _draw(rng)
    results = solve(steps)
    return Problem(question=question, solution=write_solution(steps, results), answer=str(results[-1]))


def steps_of(question: str) -> list[Step]:
    """Parse ``Compute <expr>.`` back into steps, in the order the solution writes them.

    The question text carries everything, so :func:`base_corpus` works from problems read
    back from JSONL as well as from freshly drawn ones.
    """
    expression = question.removeprefix("Compute ").removesuffix(".")
    tokens = expression.replace("(", " ( ").replace(")", " ) ").split()
    steps: list[Step] = []

    def operand(pos: int) -> tuple[Operand, int]:
        if tokens[pos] == "(":
            value, pos = expr(pos + 1)
            return value, pos + 1  # skip ")"
        return int(tokens[pos]), pos + 1

    def term(pos: int) -> tuple[Operand, int]:
        value, pos = operand(pos)
        while pos < len(tokens) and tokens[pos] == "*":
            right, pos = operand(pos + 1)
            steps.append(Step(value, "*", right))
            value = Ref(len(steps) - 1)
        return value, pos

    def expr(pos: int) -> tuple[Operand, int]:
        value, pos = term(pos)
        while pos < len(tokens) and tokens[pos] in "+-":
            op = tokens[pos]
            right, pos = term(pos + 1)
            steps.append(Step(value, op, right))
            value = Ref(len(steps) - 1)
        return value, pos

    expr(0)
    return steps


# --- splits and files ---------------------------------------------------------------------


def build_splits(
    seed: int = 0, *, n_train: int = 2000, n_val: int = 200, n_test: int = 500
) -> dict[str, list[Problem]]:
    """Fixed, disjoint train/val/test splits.

    One rng stream draws test first, then val, then train, skipping any question text already
    drawn, so no question appears twice anywhere and test (then val) does not change when
    ``n_train`` changes: a larger training run is still scored on the same test problems.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[Problem]] = {}
    for split, size in (("test", n_test), ("val", n_val), ("train", n_train)):
        problems: list[Problem] = []
        attempts = 0
        while len(problems) < size:
            attempts += 1
            if attempts > 50 * size + 1000:
                raise ValueError(f"could not draw {size} unique {split} problems; ask for fewer")
            problem = make_problem(rng)
            if problem.question not in seen:
                seen.add(problem.question)
                problems.append(problem)
        splits[split] = problems
    return {name: splits[name] for name in ("train", "val", "test")}


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    """Write the generic dataset layout the project's loader reads (one JSON object a line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for problem in problems:
            record = {
                "question": problem.question,
                "answer": problem.answer,
                "solution": problem.solution,
                "data_source": DATA_SOURCE,
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


# --- the base-model corpus ----------------------------------------------------------------


def _slipped_solution(steps: list[Step], rng: random.Random) -> str:
    """A solution with one wrong intermediate (or final) result, propagated to the end."""
    index = rng.randrange(len(steps))
    correct = solve(steps)
    # Off by one to three, or a dropped/extra carry (+-10); never below zero, like real slips.
    delta = rng.choice([d for d in (-10, -3, -2, -1, 1, 2, 3, 10) if correct[index] + d >= 0])
    results = solve(steps, slip=(index, delta))
    # Every operation is affine in each operand with a non-zero coefficient (multipliers are
    # at least 2, or a non-zero intermediate), so the slip always reaches the final answer.
    assert results[-1] != correct[-1]
    return write_solution(steps, results)


def base_corpus(problems: Iterable[Problem], slip_rate: float, rng: random.Random) -> list[CorpusExample]:
    """SFT examples for pretraining the base model; exactly ``round(slip_rate * n)`` slipped.

    The slipped examples are chosen with ``rng``; each carries one arithmetic slip, so the
    base model learns a solution format it sometimes gets wrong, and pass@k > pass@1.
    Measured once: a 0.9M-parameter Llama (hidden 128, 4 layers) trained 600 steps of 64 on
    4000 problems at ``slip_rate=0.2`` scored greedy 16.5%, T=1 pass@1 8.5%, pass@8 34.5%.
    """
    if not 0.0 <= slip_rate <= 1.0:
        raise ValueError(f"slip_rate must be in [0, 1], got {slip_rate}")
    problems = list(problems)
    n_slipped = round(slip_rate * len(problems))
    slipped = set(rng.sample(range(len(problems)), n_slipped))
    corpus = []
    for index, problem in enumerate(problems):
        if index in slipped:
            response = _slipped_solution(steps_of(problem.question), rng)
        else:
            response = problem.solution
        corpus.append(CorpusExample(question=problem.question, response=response, slipped=index in slipped))
    return corpus
