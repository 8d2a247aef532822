"""Rollout engines. :func:`build_engine` is the one place a backend is chosen, by config.

Backends are imported lazily so that importing this package (for :class:`SamplingParams`,
say) costs neither transformers nor SGLang start-up time.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable

from sept_megatron.rollout.base import Generation, RolloutEngine, SamplingParams, WeightBucket

__all__ = ["Generation", "RolloutEngine", "SamplingParams", "WeightBucket", "backend_kwargs", "build_engine"]


def _build_hf(model_path: str | None, **kwargs: Any) -> RolloutEngine:
    from sept_megatron.rollout.hf import HFRolloutEngine

    return HFRolloutEngine(model_path, **kwargs)


def _build_sglang(model_path: str | None, **kwargs: Any) -> RolloutEngine:
    """SGLang is a GPU-only optional extra; say how to get it, or how to do without it.

    ``placement="colocated"`` (default): ``sglang_engine.SGLangRolloutEngine`` (an in-process
    engine per engine group); ``"disaggregated"``: ``sglang_remote.SGLangRemoteEngine`` over
    ``server_urls``.
    """
    if importlib.util.find_spec("sglang") is None:
        raise ImportError(
            "rollout.backend=sglang needs SGLang, which is not installed: "
            "`pip install sept_megatron[gpu]` on a CUDA machine, or use rollout.backend=hf on CPU"
        )
    if kwargs.pop("placement", "colocated") == "disaggregated":
        module = importlib.import_module("sept_megatron.rollout.sglang_remote")
        return module.SGLangRemoteEngine(kwargs.pop("server_urls"), model_path=model_path, **kwargs)
    module = importlib.import_module("sept_megatron.rollout.sglang_engine")
    return module.SGLangRolloutEngine(model_path, **kwargs)


_BACKENDS: dict[str, Callable[..., RolloutEngine]] = {"hf": _build_hf, "sglang": _build_sglang}


def backend_kwargs(rollout, *, tokenizer, seed: int, device: str, dtype, progress: bool,
                   placement=None) -> dict[str, Any]:
    """Constructor arguments of the backend ``rollout.backend`` names, from the rollout section.

    ``device``/``dtype`` are the hf engine's; SGLang places itself (its engine group's GPUs)
    and runs in bf16 unless ``rollout.weights=fp8``. ``placement``
    (:class:`~sept_megatron.rollout.placement.Placement`, colocated engines): this rank's
    engine group and its process group, as each backend takes them.
    """
    if rollout.backend == "hf":
        kwargs = dict(device=device, dtype=dtype, batch_size=rollout.batch_size, progress=progress)
        if placement is not None:
            kwargs |= dict(group=placement.mine, process_group=placement.process_group)
        return kwargs
    if rollout.placement == "disaggregated":
        # The weight broadcast to the servers runs over the trainer's device: NCCL on GPUs
        # (gloo only where the trainer computes on the CPU, i.e. tests).
        return dict(placement="disaggregated", server_urls=list(rollout.server_urls), tokenizer=tokenizer,
                    weight_backend="nccl" if device.startswith("cuda") else "gloo",
                    timeout_s=rollout.timeout_minutes * 60.0)
    kwargs = dict(tokenizer=tokenizer, engine_tp=rollout.engine_tp, seed=seed,
                  mem_fraction_static=rollout.mem_fraction_static, weights=rollout.weights,
                  progress=progress)
    if placement is not None:
        kwargs |= dict(ranks=placement.mine.ranks, process_group=placement.process_group)
    return kwargs


def build_engine(backend: str, model_path: str | None = None, **kwargs: Any) -> RolloutEngine:
    """Build the rollout engine named by ``rollout.backend``; kwargs go to its constructor.

    Under a placement (:mod:`sept_megatron.rollout.placement`) every rank of an engine group
    builds one, passing ``group=`` its :class:`~sept_megatron.rollout.placement.EngineGroup`
    and ``process_group=`` the group's torch.distributed group (None in a world of one).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"rollout.backend={backend!r} is not one of {sorted(_BACKENDS)}")
    return _BACKENDS[backend](model_path, **kwargs)
