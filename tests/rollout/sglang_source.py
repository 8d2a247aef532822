"""Run SGLang's own code on CPU where its module cannot be imported there.

With a CPU build of torch, ``import sglang.srt.managers.tp_worker``, ``...weight_updater`` and
``sglang.srt.entrypoints.engine`` all fail at ``sglang/srt/configs/__init__.py``, which imports
torchvision; PyPI's Linux torchvision wheels are built against CUDA torch and cannot load with the
CPU one (``operator torchvision::nms does not exist``). The classes and functions our weight
sync meets on SGLang's side are small and depend only on importable modules, so the tests take
their definitions from the *installed* sglang source (the same text the GPU run executes) and
run them in a namespace of real SGLang objects: nothing is re-implemented. A rename or a
signature change upstream fails these tests.

    from sglang_source import sglang_definitions, sglang_signature
    ns = sglang_definitions("srt/managers/tp_worker.py", ["BaseTpWorker.deserialize_own_rank"], ns)
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def require_sglang():
    """Skip (with the reason) unless the real sglang package imports its CPU-safe parts."""
    if importlib.util.find_spec("sglang") is None:
        pytest.skip(
            "sglang is not installed (bash tools/dev.sh test installs its CPU-importable "
            "parts; see README, SGLang rollout)"
        )
    try:
        import sglang.srt.utils  # noqa: F401  (MultiprocessingSerializer, needs triton etc.)
    except ImportError as error:
        pytest.skip(f"sglang is installed but does not import on this machine: {error}")
    from sept_megatron.rollout.sglang_requests import check_sglang_version

    check_sglang_version()  # a different version is a failure, not a skip


def source_root() -> Path:
    spec = importlib.util.find_spec("sglang")
    return Path(spec.origin).parent


def _find(tree: ast.Module, qualname: str) -> ast.AST:
    node: Any = tree
    for part in qualname.split("."):
        matches = [
            child
            for child in node.body
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and child.name == part
        ]
        if not matches:
            raise LookupError(f"{qualname}: {part!r} not found in the installed sglang source")
        node = matches[-1]
    return node


def _parse(relpath: str) -> ast.Module:
    return ast.parse((source_root() / relpath).read_text(), filename=str(source_root() / relpath))


def sglang_definitions(relpath: str, qualnames: list[str], namespace: dict) -> dict:
    """Execute the named top-level classes / methods of ``sglang/<relpath>`` in ``namespace``.

    A method ``Class.name`` becomes a plain function ``name`` taking ``self`` first. Decorators
    are dropped (``@dataclass`` on a method-less container is re-applied by the caller if it
    matters). Annotations are kept as strings (``from __future__ import annotations``).
    """
    tree = _parse(relpath)
    nodes = []
    for qualname in qualnames:
        node = _find(tree, qualname)
        node.decorator_list = []
        nodes.append(node)
    module = ast.Module(
        body=[ast.ImportFrom(module="__future__", names=[ast.alias("annotations")], level=0), *nodes],
        type_ignores=[],
    )
    ast.fix_missing_locations(module)
    exec(compile(module, str(source_root() / relpath), "exec"), namespace)
    return namespace


def sglang_signature(relpath: str, qualname: str) -> inspect.Signature:
    """The parameter list of an installed sglang function (no body, no annotations run)."""
    node = _find(_parse(relpath), qualname)
    assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    stub = ast.FunctionDef(
        name=node.name, args=node.args, body=[ast.Pass()], decorator_list=[], returns=None, type_params=[]
    )
    for arg in [
        *stub.args.posonlyargs,
        *stub.args.args,
        *stub.args.kwonlyargs,
        stub.args.vararg,
        stub.args.kwarg,
    ]:
        if arg is not None:
            arg.annotation = None
    module = ast.Module(body=[stub], type_ignores=[])
    ast.fix_missing_locations(module)
    namespace: dict[str, Callable] = {}
    exec(compile(module, qualname, "exec"), namespace)
    return inspect.signature(namespace[node.name])
