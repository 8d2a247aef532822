"""The published ``config.json`` a recipe ships for its model, for planning before the weights
are on disk.

Each recipe's model has its architecture in ``examples/models/<name>/config.json`` (the
numbers copied from the model card on the Hugging Face hub; sources in
``examples/models/README.md``), where ``<name>`` is the last component of ``model.hf_path``
(``/models/Qwen2.5-Math-7B`` -> ``models/Qwen2.5-Math-7B``). ``sept-megatron plan --config
RECIPE`` uses it when ``model.hf_path`` has no config.json yet, and says so.
"""

from __future__ import annotations

from pathlib import Path

SEARCH_LEVELS = 3
"""How far up from the recipe's folder ``models/`` is looked for (examples/paper/ -> examples/)."""


def shipped_config(recipe: str | Path, hf_path: str | None) -> Path | None:
    """``models/<basename of hf_path>/config.json`` in the recipe's folder or one above it."""
    if not hf_path:
        return None
    name = Path(hf_path.rstrip("/")).name
    folder = Path(recipe).resolve().parent
    for candidate in [folder, *folder.parents][:SEARCH_LEVELS]:
        path = candidate / "models" / name / "config.json"
        if path.is_file():
            return path
    return None


def planning_config(recipe: str | Path, hf_path: str | None) -> tuple[str | None, str | None]:
    """(config.json to plan with, a note to print) when ``hf_path`` is not on disk; else
    (None, None): the planner then reads ``hf_path`` itself."""
    if not hf_path or (Path(hf_path) / "config.json").is_file():
        return None, None
    path = shipped_config(recipe, hf_path)
    if path is None:
        return None, None
    return str(path), (
        f"model.hf_path={hf_path} is not on disk: planning with the published "
        f"config.json shipped with the recipe, {path}"
    )
