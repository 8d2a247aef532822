"""The rollout backends a run can name in ``rollout.backend``: the one registry.

A backend is a class that implements :class:`~sept_megatron.rollout.base.RolloutBackend`: it
checks its part of the ``rollout`` config section, turns that section into its constructor's
arguments, and builds itself. Nothing else in the package names a backend. Three ways in:

- the built-ins below (imported only when named, so ``import sept_megatron.rollout`` costs
  neither transformers' nor SGLang's start-up);
- :func:`register_backend` from Python (``register_backend("mine", MyEngine)``);
- an installed package's entry point in the ``sept_megatron.rollout_backends`` group
  (``mine = my_pkg.engine:MyEngine``), found when the name is first looked up, so a plugin
  works in every process of a torchrun job without any code of ours changing.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from sept_megatron.rollout.base import RolloutBackend

ENTRY_POINT_GROUP = "sept_megatron.rollout_backends"

_BUILTIN = {
    "hf": "sept_megatron.rollout.hf:HFRolloutEngine",
    "sglang": "sept_megatron.rollout.sglang_engine:SGLangRolloutEngine",
}
_REGISTERED: dict[str, type | str] = {}


def register_backend(name: str, backend: type | str) -> None:
    """Make ``rollout.backend=name`` build ``backend`` (a class, or ``"module:Class"``)."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"backend name {name!r}: use letters, digits, '-' and '_'")
    _REGISTERED[name] = backend


def backend_names() -> list[str]:
    """Every name ``rollout.backend`` accepts: built-ins, registered, installed plugins."""
    plugins = [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)]
    return list(dict.fromkeys([*_BUILTIN, *_REGISTERED, *plugins]))


def backend_class(name: str) -> type[RolloutBackend]:
    """The class ``rollout.backend=name`` builds; a clear error listing the valid names."""
    target = _REGISTERED.get(name) or _BUILTIN.get(name)
    if target is None:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise ValueError(
                f"rollout.backend={name!r}: choose one of {backend_names()} "
                "(or register a backend: "
                "sept_megatron.rollout.registry.register_backend, or an entry point "
                f"in the {ENTRY_POINT_GROUP!r} group)"
            )
        return found[0].load()
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        return getattr(importlib.import_module(module), attribute)
    return target
