"""Find the commands the documentation shows and check each against the real code.

Sources: README.md (fenced code and inline code), the comments and script lines of
examples/*.sbatch and examples/*.yaml, tools/dev.sh's comments, the ``--help`` text of
``sept-megatron`` (sept_megatron/cli.py's docstring) and the tools' docstrings.

A command is checked by the parser that would run it: torch's own torchrun parser for the
launcher, the ``build_parser()`` of each ``sept-megatron`` subcommand and each tool, the
``case`` of tools/dev.sh, and the ``#SBATCH`` lines of a batch script. A concrete command must
parse, and its config (the YAML plus every ``key=value``) must pass
:func:`sept_megatron.config.validate` at the world size the command launches. A template (with
placeholders such as ``X.yaml``, ``N``, ``[...]`` or ``$VAR``) is checked as far as it is
concrete: every flag exists, every listed set of choices (``a|b|c``) is the parser's, every
``key=`` names a config field. Repository paths it names must exist.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMAND_WORDS = ("sept-megatron", "torchrun", "python", "bash", "sbatch", "pytest")
SHELL_OPERATORS = {"&", "&&", "|", "||", ";", ";;"}
# Placeholders a reader replaces: X.yaml, CONFIG.yaml, HF_OUT, N, key=value, $CONFIG, "$@", ...
# (a value computed by the shell, as in "rollout.server_urls=$(cat FILE)", is not one).
PLACEHOLDER = re.compile(r"^([A-Z][A-Z0-9_]*(\.[a-z]+)?|.*\.\.\.|key=value|\$[\w@{}]+)$")
REPO_TOP = ("examples/", "tools/", "sept_megatron/", "tests/")


@dataclass(frozen=True)
class Command:
    source: str  # file:line
    text: str
    anywhere: bool = False  # a script line (``srun ... python -m ...``), not a line of prose


# --- finding commands ----------------------------------------------------------------------
def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    joined, pending, start = [], "", 0
    for number, line in lines:
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append((start, pending + line))
        pending = ""
    return joined


def _command_start(tokens: list[str], anywhere: bool) -> int | None:
    for i, token in enumerate(tokens):
        if not anywhere and i > 0 and not re.match(r"^[A-Z_]+=", tokens[i - 1]):
            return None  # prose: a command starts its line (after VAR=value assignments)
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token in ("sept-megatron", "torchrun", "sbatch", "pytest"):
            return i
        if token == "python" and (following == "-m" or following.startswith("tools/")):
            return i
        if token == "bash" and following.startswith("tools/"):
            return i
    return None


def split_command(text: str, anywhere: bool = False) -> list[str] | None:
    """Shell words of the first documented command in ``text`` (None if there is none)."""
    try:  # no punctuation_chars: "tiny|small" is one word (a list of choices), not a pipe
        tokens = shlex.split(text, comments=True)
    except ValueError:  # an unterminated quote: not a command line
        return None
    start = _command_start(tokens, anywhere)
    if start is None:
        return None
    words = []
    for token in tokens[start:]:
        if token in SHELL_OPERATORS or token.startswith("("):  # the command ends there
            break
        words.append(token)
    return words


def _readme_commands(path: Path) -> list[Command]:
    text = path.read_text()
    commands, in_code, code = [], False, []
    prose = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if in_code:
                commands += [Command(f"{path.name}:{n}", joined) for n, joined in _join_continuations(code)]
                code = []
            in_code = not in_code
        elif in_code:
            code.append((number, line))
        else:
            prose.append((number, line))
    # Inline code may wrap across lines: search the prose as one text, keep line numbers.
    offsets, flat = [], ""
    for number, line in prose:
        offsets.append((len(flat), number))
        flat += line + "\n"
    for match in re.finditer(r"`([^`]+)`", flat):
        number = max(n for offset, n in offsets if offset <= match.start())
        span = " ".join(match.group(1).split())
        if span.split(" ")[0] in COMMAND_WORDS or span.startswith(("OMP_NUM_THREADS=", "SEPT_")):
            commands.append(Command(f"{path.name}:{number}", span))
    return commands


def _script_commands(path: Path) -> list[Command]:
    """Comment lines (usage) and script lines of a shell script or a YAML recipe."""
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#!") or stripped.startswith("#SBATCH"):
            continue
        usage = re.search(r"usage: ([^\"]+)", stripped)
        if usage:  # the usage text a script prints (echo "usage: ..." or ${1:?usage: ...})
            text = usage.group(1).strip()
            lines.append((number, text[:-1] if "${" in stripped and text.endswith("}") else text))
        elif stripped.startswith("#"):
            lines.append((number, stripped.lstrip("#").strip()))
        elif path.suffix != ".yaml":
            lines.append((number, "\0" + stripped))  # marks a script line
    return [
        Command(f"{path.relative_to(REPO)}:{n}", text.lstrip("\0"), text.startswith("\0"))
        for n, text in _join_continuations(lines)
    ]


def _docstring_commands(path: Path) -> list[Command]:
    """The usage lines of a module docstring: the indented ones (the rest is prose)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return [
        Command(f"{path.relative_to(REPO)} (docstring)", line.split("  #")[0].strip())
        for line in doc.splitlines()
        if line.startswith(" ")
    ]


def documented_commands() -> list[Command]:
    sources = [*_readme_commands(REPO / "README.md")]
    for path in sorted((REPO / "examples").iterdir()):
        if path.suffix in (".sbatch", ".yaml"):
            sources += _script_commands(path)
    sources += [
        c
        for c in _script_commands(REPO / "tools" / "dev.sh")
        if not c.text.startswith(("cd ", "VENV", "PY="))
    ]
    for path in [REPO / "sept_megatron" / "cli.py", *sorted((REPO / "tools").glob("*.py"))]:
        sources += _docstring_commands(path)
    return [c for c in sources if split_command(c.text, c.anywhere)]


# --- the real parsers ----------------------------------------------------------------------
def subcommand_parser(name: str) -> argparse.ArgumentParser:
    from sept_megatron.cli import build_subcommand_parser

    return build_subcommand_parser(name)


def tool_parser(script: str) -> argparse.ArgumentParser:
    """A tool's ``build_parser()`` (every tool under tools/ has one), imported, not run."""
    spec = importlib.util.spec_from_file_location(f"_doc_tool_{Path(script).stem}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module.build_parser()


def dev_sh_commands() -> set[str]:
    text = (REPO / "tools" / "dev.sh").read_text()
    case = text[text.index('case "$cmd" in') : text.index("esac")]
    return set(re.findall(r"^\s+([a-z]+)\)", case, re.M))


def sbatch_directives(script: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", script.read_text(), re.M))


# --- checking one command ------------------------------------------------------------------
def _is_placeholder(word: str) -> bool:
    return bool(PLACEHOLDER.match(word))


def _expand_template(words: list[str]) -> tuple[list[str], bool]:
    """Drop ``[`` ``]`` grouping and ``{a|b}`` braces; say whether anything was a placeholder."""
    expanded, template = [], False
    for word in words:
        bare = word.strip("[]{}")
        if bare != word or not bare:
            template = True
        if bare:
            template |= _is_placeholder(bare)
            expanded.append(bare)
    return expanded, template


def _option(parser: argparse.ArgumentParser, flag: str):
    return parser._option_string_actions.get(flag.split("=")[0])  # argparse has no public lookup


def _check_template(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    problems = []
    for i, word in enumerate(words):
        if not word.startswith("-") or word in ("-", "--"):
            continue
        action = _option(parser, word)
        if action is None:
            problems.append(f"{parser.prog}: no option {word.split('=')[0]}")
            continue
        value = word.split("=", 1)[1] if "=" in word else (words[i + 1] if i + 1 < len(words) else "")
        if "|" in value and action.choices is not None:
            listed, real = set(value.split("|")), set(map(str, action.choices))
            if listed != real:
                problems.append(
                    f"{parser.prog} {word.split('=')[0]} lists {'|'.join(sorted(listed))}; "
                    f"the choices are {'|'.join(sorted(real))}"
                )
    return problems


def _parse(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.Namespace | None, str]:
    """The real parse; argparse reports errors by exiting, so catch that and keep its message."""
    errors = []
    parser.error = lambda message: (errors.append(message), sys.exit(2))
    try:
        return parser.parse_args(words), ""
    except SystemExit:
        return None, f"{parser.prog or 'parser'}: {errors[0] if errors else 'exited'}"


def config_problems(config: str | None, overrides: list[str], world_size: int) -> list[str]:
    """The real loading and validation (no model shapes: the weights are not here)."""
    from sept_megatron.config import ConfigError, load_config, validate

    if config and not (REPO / config).is_file():
        return [f"--config {config}: no such file in the repository"]
    try:
        validate(load_config(str(REPO / config) if config else None, overrides), world_size)
    except ConfigError as exc:
        return [f"at world size {world_size}: {exc}"]
    return []


def _is_config_key(dotted: str) -> bool:
    import dataclasses

    from sept_megatron.config import Config

    node = Config
    for part in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return False
        node = (
            fields[part].default_factory if fields[part].default_factory is not dataclasses.MISSING else None
        )
    return node is None or not dataclasses.is_dataclass(node)


def _override_key_problems(words: list[str]) -> list[str]:
    return [
        f"{word}: {word.split('=')[0]} is not a config field"
        for word in words
        if "=" in word
        and not word.startswith("-")
        and not _is_placeholder(word)
        and not _is_config_key(word.split("=")[0])
    ]


def _check_sept_megatron(words: list[str], world_size: int, template: bool) -> list[str]:
    if not words:
        return []  # the program named in prose
    if words[0] not in _subcommands():
        return [
            f"sept-megatron: no subcommand {words[0] if words else '(none)'!r}; "
            f"choose one of {', '.join(sorted(_subcommands()))}"
        ]
    name, args = words[0], words[1:]
    if not args:  # a mention of the subcommand, not a command to run
        return []
    parser = subcommand_parser(name)
    takes_overrides = name in ("train", "config", "plan")  # paper-table takes NAME=DIR
    problems = _check_template(parser, args) + (_override_key_problems(args) if takes_overrides else [])
    if template or problems:
        return problems
    parsed, error = _parse(parser, args)
    if parsed is None:
        return [error]
    if name == "plan":
        world_size = parsed.nodes * parsed.gpus_per_node
    elif name == "config":
        world_size = parsed.world_size or _layout_world(parsed)
    elif name != "train":
        return []
    return config_problems(parsed.config, parsed.overrides, world_size)


def _layout_world(parsed) -> int:
    """``sept-megatron config`` without --world-size validates at tp x pp (DP = 1)."""
    from sept_megatron.config import load_config

    cfg = load_config(str(REPO / parsed.config) if parsed.config else None, parsed.overrides)
    return cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel


def _subcommands() -> set[str]:
    from sept_megatron import cli

    return set(cli.COMMANDS)


def _check_tool(script: str, args: list[str], world_size: int, template: bool) -> list[str]:
    if not (REPO / script).is_file():
        return [f"{script}: no such file"]
    parser = tool_parser(script)
    problems = _check_template(parser, args)
    if template or problems:
        return problems
    parsed, error = _parse(parser, args)
    if parsed is None:
        return [error]
    if script == "tools/convert_hf_to_megatron.py":
        from sept_megatron.convert.workflows import launch_problems

        return launch_problems(parsed.tp, parsed.pp, world_size)
    return []


def _check_python(words: list[str], world_size: int, template: bool) -> list[str]:
    """``python -m MODULE ...`` or ``python tools/X.py ...`` (also what torchrun starts)."""
    if words[0] == "-m":
        module, args = words[1], words[2:]
        if module == "sept_megatron.cli":
            return _check_sept_megatron(args, world_size, template)
        if module == "pytest":
            return _check_pytest(args)
        return [] if importlib.util.find_spec(module) else [f"python -m {module}: no such module"]
    if _is_placeholder(words[0]):
        return []  # "python tools/..." in prose
    return _check_tool(words[0], words[1:], world_size, template)


def _check_torchrun(words: list[str], template: bool) -> list[str]:
    from torch.distributed.run import get_args_parser

    if all(word.startswith("-") for word in words):
        return []  # a mention of the launcher and its flags, not a command to run
    if template:
        words = [w for w in words if not _is_placeholder(w.split("=")[-1])]
    parsed, error = _parse(get_args_parser(), words)
    if parsed is None:
        return [f"torchrun: {error}"]
    nodes, per_node = str(parsed.nnodes).split(":")[-1], str(parsed.nproc_per_node)
    world = int(nodes) * int(per_node) if nodes.isdigit() and per_node.isdigit() else 1
    script = ["-m", parsed.training_script] if parsed.module else [parsed.training_script]
    return _check_python(script + parsed.training_script_args, world, template)


def _check_pytest(args: list[str]) -> list[str]:
    return [
        f"pytest {arg}: no such file"
        for arg in args
        if arg.startswith("tests/") and not (REPO / arg.split("::")[0]).exists()
    ]


def _check_dev_sh(args: list[str], template: bool) -> list[str]:
    arms = dev_sh_commands()
    if args and "|" in args[0]:
        listed = set(args[0].split("|"))
        return (
            []
            if listed == arms
            else [f"tools/dev.sh lists {'|'.join(sorted(listed))}; its case has {'|'.join(sorted(arms))}"]
        )
    name = args[0] if args else "test"
    if name not in arms:
        return [f"tools/dev.sh: no command {name!r}; it has {', '.join(sorted(arms))}"]
    if name == "demo":
        return _check_sept_megatron(["demo", *args[1:]], 1, template)
    if name == "test":
        return _check_pytest(args[1:])
    return [f"tools/dev.sh setup takes no arguments: {args[1:]}"] if args[1:] else []


def _sbatch_options(words: list[str]) -> tuple[dict[str, str], list[str]]:
    options, i = {}, 0
    while i < len(words) and words[i].startswith("-"):
        key, _, value = words[i].lstrip("-").partition("=")
        options[key] = value
        i += 1
    return options, words[i:]


def _check_sbatch(words: list[str], template: bool) -> list[str]:
    options, rest = _sbatch_options(words)
    if not rest:
        return [] if not words else ["sbatch: no script"]  # no words: sbatch named in prose
    script, args = REPO / rest[0], rest[1:]
    if _is_placeholder(rest[0]):
        return []
    if not script.is_file():
        return [f"sbatch {rest[0]}: no such file"]
    directives = {**sbatch_directives(script), **options}
    problems = []
    if not directives.get("gres", "").startswith("gpu:"):
        problems.append(
            f"sbatch {rest[0]}: no GPUs requested (neither --gres=gpu:N on the line "
            "nor #SBATCH --gres in the script)"
        )
    launched = re.search(r"sept_megatron\.cli (\w+) --config \"\$CONFIG\" \"\$@\"", script.read_text())
    nodes, per_node = directives.get("nodes", "1"), directives.get("ntasks-per-node", "1")
    if launched and args and not template and nodes.isdigit() and per_node.isdigit():
        world = int(nodes) * int(per_node)
        problems += _check_sept_megatron([launched.group(1), "--config", *args], world, False)
    elif launched:
        problems += _override_key_problems(args)
    return problems


def check_command(text: str, anywhere: bool = False) -> list[str]:
    """Every problem of one documented command line (empty: it is right)."""
    words = split_command(text, anywhere)
    if not words:
        return []
    words, template = _expand_template(words)
    head, args = words[0], words[1:]
    problems = [
        f"{path}: no such path"
        for path in args
        if path.startswith(REPO_TOP)
        and not _is_placeholder(path)
        and not (REPO / path.split("::")[0]).exists()
    ]
    if head == "sept-megatron":
        problems += _check_sept_megatron(args, 1, template)
    elif head == "torchrun":
        problems += _check_torchrun(args, template)
    elif head == "python":
        problems += _check_python(args, 1, template)
    elif head == "bash":
        problems += _check_dev_sh(args[1:], template) if args[0] == "tools/dev.sh" else []
    elif head == "sbatch":
        problems += _check_sbatch(args, template)
    elif head == "pytest":
        problems += _check_pytest(args)
    return problems
