"""tools/mutants.py: its table matches the code, and its verdicts are right on a toy repository.

The table check is what fails first when a module moves (the restructuring of issue 17): it
names the mutant whose file or text is gone, so the table is updated with the move.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from mp import REPO_ROOT

spec = importlib.util.spec_from_file_location("mutants", REPO_ROOT / "tools" / "mutants.py")
mutants = importlib.util.module_from_spec(spec)
sys.modules["mutants"] = mutants  # dataclasses look their module up while the file executes
spec.loader.exec_module(mutants)

ISSUE_25_KINDS = {
    "pass@k off by one",
    "grading normalisation",
    "grading tolerance",
    "loss mask and EOS",
    "loss normalisation",
    "tau_s schedule",
    "gate/up and QKV split order",
    "vocab padding on export",
    "resume round and sampler position",
    "FP8 scale rounding",
    "generation prompt",
    "planner terms",
    "skipped sync",
    "temperature ignored",
    "AVG definition",
}


def test_every_mutant_applies_to_the_code_and_names_existing_tests():
    mutants.check_table(mutants.MUTANTS, REPO_ROOT)
    for mutant in mutants.MUTANTS:
        source = (REPO_ROOT / mutants.FILES[mutant.file]).read_text()
        assert mutants.mutated_source(source, mutant) != source, mutant.id
        assert mutant.quick, f"{mutant.id}: no quick tests"


def test_ids_are_unique_and_every_kind_of_the_issue_is_covered():
    ids = [m.id for m in mutants.MUTANTS]
    assert len(ids) == len(set(ids))
    assert ISSUE_25_KINDS <= {m.kind for m in mutants.MUTANTS}


def test_a_moved_text_is_named_with_the_fix():
    moved = mutants.Mutant("moved", "k", "d", "metrics", (("no such line", "x"),), ("tests/eval",))
    with pytest.raises(
        mutants.TableError,
        match=r"moved: the text 'no such line' occurs 0 times "
        r"in sept_megatron/eval/metrics.py",
    ):
        mutants.check_table([moved], REPO_ROOT)


@pytest.fixture
def toy_repo(tmp_path: Path) -> Path:
    """A git checkout with one function, a test that pins it, and an untracked test file."""
    root = tmp_path / "toy"
    (root / "tests").mkdir(parents=True)
    (root / "toy.py").write_text("def double(x):\n    return 2 * x\n")
    (root / "tests" / "test_toy.py").write_text(
        "from toy import double\n\n\ndef test_double():\n    assert double(3) == 6\n"
    )
    (root / "tests" / "test_weak.py").write_text(
        "from toy import double\n\n\ndef test_runs():\n    double(3)\n"
    )
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "toy.py", "tests/test_toy.py"], cwd=root, check=True)
    return root


def test_killed_and_survived_verdicts_on_a_scratch_copy(toy_repo, tmp_path, monkeypatch):
    monkeypatch.setitem(mutants.FILES, "toy", "toy.py")
    mutant = mutants.Mutant("triple", "k", "d", "toy", (("return 2 * x", "return 3 * x"),), ())
    repo = mutants.scratch_copy(toy_repo, tmp_path / "scratch")
    assert (repo / "tests" / "test_weak.py").is_file()  # untracked, not ignored: copied
    killed = mutants.judge(mutant, repo, ("tests/test_toy.py",), timeout_s=120)
    assert killed.killed and killed.caught_by == "FAILED tests/test_toy.py::test_double"
    survived = mutants.judge(mutant, repo, ("tests/test_weak.py",), timeout_s=120)
    assert not survived.killed
    assert (repo / "toy.py").read_text() == (toy_repo / "toy.py").read_text()  # restored
    assert (toy_repo / "toy.py").read_text().count("2 * x") == 1  # the checkout is untouched
