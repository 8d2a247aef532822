"""The README, the example recipes and scripts, and the ``--help`` texts tell the truth.

Every command they show is checked against the real parsers and the real config validation
(see ``doc_commands``); every example YAML validates at the world size it states; every
repository path named exists; the Layout table names every module; every config field has a
docstring (the README says so). Nothing is launched and no weights are needed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from docs.doc_commands import REPO, check_command, config_problems, documented_commands

README = REPO / "README.md"


def _all_problems(commands) -> list[str]:
    return [
        f"{c.source}: {c.text}\n    -> {problem}"
        for c in commands
        for problem in check_command(c.text, c.anywhere)
    ]


@pytest.fixture(scope="module")
def commands():
    return documented_commands()


def test_every_documented_command_runs_as_written(commands):
    problems = _all_problems(commands)
    assert not problems, "documented commands that would fail:\n" + "\n".join(problems)


def test_commands_are_found_in_every_source(commands):
    """A broken extractor would make the test above pass vacuously."""
    sources = {c.source.split(":")[0].split(" ")[0] for c in commands}
    for expected in (
        "README.md",
        "examples/sept.sbatch",
        "examples/sglang_servers.sbatch",
        "examples/qwen2.5-math-7b.yaml",
        "tools/dev.sh",
        "sept_megatron/cli.py",
        "tools/convert_hf_to_megatron.py",
    ):
        assert expected in sources, expected
    readme = [c.text.split()[0] for c in commands if c.source.startswith("README.md")]
    for word in ("torchrun", "sept-megatron", "python", "sbatch", "bash"):
        assert word in readme or any(w.endswith("=1") for w in readme), word


@pytest.mark.parametrize(
    "line, expected",
    [
        # a conversion needs exactly tp x pp processes (issue: --nproc-per-node=8 with --tp 2)
        (
            "torchrun --nproc-per-node=8 tools/convert_hf_to_megatron.py --hf-dir h --out o --tp 2 --pp 1",
            "--nproc-per-node=2",
        ),
        # every override goes through the real validation, at the launched world size
        (
            "sept-megatron config --config examples/qwen2.5-math-7b.yaml rollout.anneal=bogus",
            "rollout.anneal='bogus'",
        ),
        (
            "torchrun --nproc-per-node=6 -m sept_megatron.cli train --config examples/qwen2.5-math-7b.yaml",
            "train.mini_batch_size=64 is not divisible by data-parallel size 3",
        ),
        (
            "sept-megatron train --config examples/qwen2.5-math-7b.yaml train.no_such_key=1",
            "is not a config field",
        ),
        # flags and listed choices come from the real parsers
        ("sept-megatron bench [--shape tiny|1.5b]", "the choices are 1.5b|small|tiny"),
        ("sept-megatron eval --model m --benchmarks b --out o --no-such-flag", "no option --no-such-flag"),
        ("python tools/convert_megatron_to_hf.py --ckpt c --out o --fp8 tensorwise", "invalid choice"),
        (
            "sept-megatron plan --config examples/llama3-70b.yaml --nodes 1 --gpus-per-node 8 --gpu-mem-gb 80",
            "world size 8 is not divisible",
        ),
        ("sept-megatron nosuch --flag", "no subcommand 'nosuch'"),
        # batch jobs ask for GPUs, and the config they pass validates at nodes x tasks per node
        ("sbatch --nodes=4 examples/sept.sbatch examples/qwen2.5-math-7b.yaml", "no GPUs requested"),
        (
            "sbatch --nodes=1 --gres=gpu:8 examples/sept.sbatch examples/llama3-70b.yaml",
            "world size 8 is not divisible",
        ),
        ("bash tools/dev.sh demo --no-such-flag", "no option --no-such-flag"),
        ("bash tools/dev.sh {demo|test}", "its case has demo|lint|setup|test"),
        ("pytest tests/no_such_test.py", "tests/no_such_test.py: no such file"),
        ("sept-megatron train --config examples/no-such.yaml", "no such"),
    ],
)
def test_a_wrong_command_is_caught(line, expected):
    problems = "\n".join(check_command(line))
    assert expected in problems, problems


def _stated_world_sizes(path: Path) -> list[int]:
    stated = re.search(r"^# world size: ([^(\n]+)", path.read_text(), re.M)
    assert stated, f"{path.name}: state the world size in a '# world size: N' comment"
    return [int(n) for n in re.findall(r"\d+", stated.group(1))]


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "examples").glob("*.yaml")))
def test_example_recipe_validates_at_its_stated_world_size(recipe):
    for world in _stated_world_sizes(REPO / "examples" / recipe):
        assert not config_problems(f"examples/{recipe}", [], world), (recipe, world)


def test_a_recipe_at_a_wrong_world_size_fails():
    assert config_problems("examples/llama3-70b.yaml", [], 16)


def _layout_names(readme: str) -> set[str]:
    section = readme.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {
        name.strip("/").removesuffix(".py")
        for row in rows
        for name in re.findall(r"`([^`]+)`", row.split("|")[1])
    }


def _package_modules() -> set[str]:
    package = REPO / "sept_megatron"
    return {p.stem for p in package.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in package.iterdir() if (p / "__init__.py").is_file()
    }


def test_layout_table_names_every_module_and_only_modules():
    listed, modules = _layout_names(README.read_text()), _package_modules()
    tops = {name.split("/")[0] for name in listed}  # a row may name a package's module (a/b)
    assert not modules - tops, f"modules missing from README's Layout: {sorted(modules - tops)}"
    missing = {
        name
        for name in listed
        if not (REPO / "sept_megatron" / f"{name}.py").is_file()
        and not (REPO / "sept_megatron" / name).is_dir()
    }
    assert not missing, f"Layout rows naming no module: {sorted(missing)}"


def test_paths_named_in_the_readme_exist():
    text = README.read_text()
    named = {
        span
        for span in re.findall(r"`([^`\s]+)`", text)
        if span.startswith(("examples/", "tools/", "sept_megatron/", "tests/"))
    }
    assert len(named) > 10  # the pattern still finds the README's paths
    missing = sorted(p for p in named if not (REPO / p.split("::")[0]).exists())
    assert not missing, f"README names paths that do not exist: {missing}"


def test_every_config_field_has_a_docstring():
    """README: "every field has a docstring" (sept_megatron/config.py)."""
    tree = ast.parse((REPO / "sept_megatron" / "config.py").read_text())
    bare = []
    for section in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name != "Config"):
        for i, statement in enumerate(section.body):
            if not isinstance(statement, ast.AnnAssign):
                continue
            following = section.body[i + 1] if i + 1 < len(section.body) else None
            if not (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                bare.append(f"{section.name}.{statement.target.id}")
    assert not bare, f"config fields without a docstring: {bare}"


def test_every_subcommand_and_tool_exposes_its_parser():
    from docs.doc_commands import subcommand_parser, tool_parser

    from sept_megatron.cli import COMMANDS

    for name in COMMANDS:
        assert subcommand_parser(name).prog == f"sept-megatron {name}"
    for script in sorted((REPO / "tools").glob("*.py")):
        assert tool_parser(f"tools/{script.name}").format_usage()
