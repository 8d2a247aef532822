"""Backends own their configuration and their memory (issue 17): the modules that serve every
backend (the config tree, the planner, the evaluator's CLI) compare nothing with a built-in
backend's name; what differs per backend is asked of the backend's class."""

import ast
from pathlib import Path

import pytest

from sept_megatron.rollout.registry import _BUILTIN

PACKAGE = Path(__file__).resolve().parents[2] / "sept_megatron"
GENERIC = ["config.py", "plan/planner.py", "eval/cli.py", "loop/startup.py", "loop/fleet.py"]


def backend_comparisons(path: Path) -> list[str]:
    """``x == "sglang"``, ``x in ("hf", ...)``, ``match``-free: every comparison of a value
    with a built-in backend's name, as ``line: source``."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        names = {
            c.value
            for operand in operands
            for c in ast.walk(operand)
            if isinstance(c, ast.Constant) and isinstance(c.value, str)
        }
        if names & set(_BUILTIN):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("module", GENERIC)
def test_generic_modules_do_not_branch_on_a_backend_name(module):
    assert backend_comparisons(PACKAGE / module) == []


def test_the_check_finds_a_branch_on_a_backend(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('def f(layout):\n    return layout.backend == "hf" or layout.backend in ("sglang",)\n')
    assert len(backend_comparisons(source)) == 2
