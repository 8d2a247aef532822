"""The demo arithmetic task: fixed disjoint splits, consistent solutions, planted slips."""

from __future__ import annotations

import json
import random
import re

import pytest

from sept_megatron.demo.task import (
    Problem,
    base_corpus,
    build_splits,
    make_problem,
    solve,
    steps_of,
    write_jsonl,
    write_solution,
)

BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def boxed(text: str) -> str:
    (answer,) = BOXED.findall(text)
    return answer


@pytest.fixture(scope="module")
def splits() -> dict[str, list[Problem]]:
    return build_splits(seed=0, n_train=3000, n_val=300, n_test=500)


def test_splits_are_deterministic_sized_and_disjoint(splits):
    sizes = {name: len(problems) for name, problems in splits.items()}
    assert sizes == {"train": 3000, "val": 300, "test": 500}
    assert build_splits(seed=0, n_train=3000, n_val=300, n_test=500) == splits
    questions = {name: {p.question for p in problems} for name, problems in splits.items()}
    assert sum(len(q) for q in questions.values()) == 3800  # no duplicate within a split either
    assert not questions["train"] & questions["test"]
    assert not questions["train"] & questions["val"]
    assert not questions["val"] & questions["test"]
    # Test (then val) do not move when the training set grows.
    bigger = build_splits(seed=0, n_train=5000, n_val=300, n_test=500)
    assert bigger["test"] == splits["test"] and bigger["val"] == splits["val"]
    assert build_splits(seed=1, n_train=10, n_val=10, n_test=10)["test"] != splits["test"][:10]


def test_solutions_are_correct_and_end_in_a_plain_boxed_integer(splits):
    for problem in sum(splits.values(), []):
        assert boxed(problem.solution) == problem.answer
        assert problem.solution.endswith(f"The answer is \\boxed{{{problem.answer}}}.")
        assert int(problem.answer) >= 0
        expression = problem.question.removeprefix("Compute ").removesuffix(".")
        assert int(problem.answer) == eval(expression)  # the question means what it says
        assert len(problem.question) + len(problem.solution) < 110  # tiny-model sized


def test_every_step_of_a_solution_is_true(splits):
    for problem in splits["test"]:
        for left, op, right, value in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", problem.solution):
            assert eval(f"{left} {op} {right}") == int(value)


def test_steps_of_recovers_the_solution(splits):
    for problem in splits["val"]:
        steps = steps_of(problem.question)
        assert write_solution(steps, solve(steps)) == problem.solution


def test_make_problem_is_seeded():
    assert make_problem(random.Random(3)) == make_problem(random.Random(3))


@pytest.mark.parametrize("slip_rate", [0.0, 0.3, 1.0])
def test_base_corpus_slips(splits, slip_rate):
    problems = splits["train"][:1000]
    corpus = base_corpus(problems, slip_rate, random.Random(0))
    assert [example.question for example in corpus] == [p.question for p in problems]
    assert sum(example.slipped for example in corpus) == round(slip_rate * len(problems))
    for example, problem in zip(corpus, problems):
        if example.slipped:
            assert boxed(example.response) != problem.answer
            wrong_steps = [
                step
                for step in re.findall(r"(\d+) ([-+*]) (\d+) = (-?\d+)\.", example.response)
                if eval(f"{step[0]} {step[1]} {step[2]}") != int(step[3])
            ]
            assert len(wrong_steps) == 1  # one slip, then correct arithmetic on the wrong value
        else:
            assert example.response == problem.solution
    assert base_corpus(problems, slip_rate, random.Random(0)) == corpus
    assert corpus[0].messages() == [
        {"role": "user", "content": problems[0].question},
        {"role": "assistant", "content": corpus[0].response},
    ]


def test_base_corpus_rejects_bad_rate(splits):
    with pytest.raises(ValueError, match="slip_rate"):
        base_corpus(splits["val"], 1.5, random.Random(0))


def test_write_jsonl_layout(splits, tmp_path):
    path = write_jsonl(splits["val"][:3], tmp_path / "val.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0] == {
        "question": splits["val"][0].question,
        "answer": splits["val"][0].answer,
        "solution": splits["val"][0].solution,
        "data_source": "arith",
    }
    assert len(records) == 3
