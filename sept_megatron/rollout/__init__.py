"""Rollout engines. :func:`build_engine` is the one place an engine is built; which backends
exist is :mod:`sept_megatron.rollout.registry`'s business.

Backends are imported lazily so that importing this package (for :class:`SamplingParams`,
say) costs neither transformers nor SGLang start-up time.
"""

from __future__ import annotations

from typing import Any

from sept_megatron.rollout.base import Generation, RolloutEngine, SamplingParams, WeightBucket
from sept_megatron.rollout.registry import backend_class, backend_names, register_backend

__all__ = [
    "Generation",
    "RolloutEngine",
    "SamplingParams",
    "WeightBucket",
    "backend_kwargs",
    "backend_names",
    "build_engine",
    "register_backend",
]


def backend_kwargs(
    rollout,
    *,
    tokenizer,
    seed: int,
    device: str,
    dtype,
    progress: bool,
    placement=None,
    run_dir: str | None = None,
) -> dict[str, Any]:
    """Constructor arguments of the backend ``rollout.backend`` names, from the rollout section
    (each backend's :meth:`~sept_megatron.rollout.base.RolloutBackend.config_kwargs`)."""
    return backend_class(rollout.backend).config_kwargs(
        rollout,
        tokenizer=tokenizer,
        seed=seed,
        device=device,
        dtype=dtype,
        progress=progress,
        placement=placement,
        run_dir=run_dir,
    )


def build_engine(backend: str, model_path: str | None = None, **kwargs: Any) -> RolloutEngine:
    """Build the rollout engine named by ``rollout.backend``; kwargs go to its constructor.

    Under a placement (:mod:`sept_megatron.rollout.placement`) every rank of an engine group
    builds one, with the group's ranks and its torch.distributed group (None in a world of one).
    """
    return backend_class(backend).build(model_path, **kwargs)
