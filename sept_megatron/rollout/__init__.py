"""Rollout engines. :func:`build_engine` is the one place a backend is chosen, by config.

Backends are imported lazily so that importing this package (for :class:`SamplingParams`,
say) costs neither transformers nor SGLang start-up time.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable

from sept_megatron.rollout.base import Generation, RolloutEngine, SamplingParams, WeightBucket

__all__ = ["Generation", "RolloutEngine", "SamplingParams", "WeightBucket", "build_engine"]


def _build_hf(model_path: str | None, **kwargs: Any) -> RolloutEngine:
    from sept_megatron.rollout.hf import HFRolloutEngine

    return HFRolloutEngine(model_path, **kwargs)


def _build_sglang(model_path: str | None, **kwargs: Any) -> RolloutEngine:
    """SGLang is a GPU-only optional extra; say how to get it, or how to do without it.

    Contract: ``sept_megatron.rollout.sglang_engine`` defines ``SGLangRolloutEngine``.
    """
    if importlib.util.find_spec("sglang") is None:
        raise ImportError(
            "rollout.backend=sglang needs SGLang, which is not installed: "
            "`pip install sept_megatron[gpu]` on a CUDA machine, or use rollout.backend=hf on CPU"
        )
    module = importlib.import_module("sept_megatron.rollout.sglang_engine")
    return module.SGLangRolloutEngine(model_path, **kwargs)


_BACKENDS: dict[str, Callable[..., RolloutEngine]] = {"hf": _build_hf, "sglang": _build_sglang}


def build_engine(backend: str, model_path: str | None = None, **kwargs: Any) -> RolloutEngine:
    """Build the rollout engine named by ``rollout.backend``; kwargs go to its constructor.

    Under a placement (:mod:`sept_megatron.rollout.placement`) every rank of an engine group
    builds one, passing ``group=`` its :class:`~sept_megatron.rollout.placement.EngineGroup`
    and ``process_group=`` the group's torch.distributed group (None in a world of one).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"rollout.backend={backend!r} is not one of {sorted(_BACKENDS)}")
    return _BACKENDS[backend](model_path, **kwargs)
