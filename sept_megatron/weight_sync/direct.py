"""Direct sync (CPU ranks of one host, hf engines in the trainer's dtype, native weights).

There is no bucket at all: the replica maps one /dev/shm buffer that holds the whole model in
HF layout and *is* the engines' weights (their parameters are views into it, bound through the
:class:`~sept_megatron.rollout.base.SharedBufferEngine` capability). Data path of a sync: each
TP rank copies its own pieces into place with one ``_foreach_copy_`` of views worked out once,
then one barrier; every byte is written once, by the rank that holds it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist

from sept_megatron.rollout.base import SharedBufferEngine
from sept_megatron.runtime import compat
from sept_megatron.runtime.distributed import compute_device
from sept_megatron.trainer.model import MegatronModel
from sept_megatron.weight_sync.buckets import own_pieces
from sept_megatron.weight_sync.gather import model_params
from sept_megatron.weight_sync.plan import SyncItem, cached_plan, hf_views
from sept_megatron.weight_sync.replica import Replica, replica_of, shared_buffer


class EngineWeights:
    """One model's HF tensors, in plan order, in one flat buffer that every rank of its replica
    maps, and the engine on this rank whose parameters are views into it (at most one: binding
    another engine, or syncing with none, gives the previous one private memory again, so an
    engine only ever sees weights that were synced into it)."""

    def __init__(self, model: MegatronModel, plan: list[SyncItem], flat: torch.Tensor) -> None:
        self.model_ref = weakref.ref(model)
        self.plan, self.flat = plan, flat
        self.views = hf_views(plan, flat)
        self.named = [
            (name, view)
            for it, item_views in zip(plan, self.views)
            for name, view in zip(it.hf_names, item_views)
        ]
        self.engine = None
        self._copies: tuple[list, list] | None = None
        self._checked: list[tuple[torch.Tensor, int]] = []  # (parameter, data_ptr) behind _copies

    def bind(self, engine) -> None:
        if engine is not self.engine:
            self.unbind()
            engine.bind_weights(self.named)
            self.engine = engine

    def unbind(self) -> None:
        if self.engine is not None:
            self.engine.unbind_weights()
            self.engine = None

    def copies(
        self, params: Callable[[], dict[str, torch.Tensor]], tp: int, tp_rank: int, stage: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(targets, sources) of this rank's pieces: views of the shared buffer and of the live
        parameter shards, worked out once and reused while no parameter has moved."""
        if self._copies is None or any(p.data_ptr() != ptr for p, ptr in self._checked):
            live = params()
            mine = [(it, views) for it, views in zip(self.plan, self.views) if it.stage == stage]
            targets, sources = [], []
            for _, piece, target, source in own_pieces(
                self.model_ref(),
                {k: v.detach() for k, v in live.items()},
                [it for it, _ in mine],
                [views for _, views in mine],
                tp,
                tp_rank,
            ):
                if tp_rank == 0 or not piece.replicated:  # TP rank 0 writes replicated norms
                    targets.append(target)
                    sources.append(source)
            self._copies = (targets, sources)
            self._checked = [(p, p.data_ptr()) for p in live.values()]
        return self._copies


_DIRECT: dict[int, EngineWeights] = {}  # id(model) -> its shared engine weights


def forget_other_engine(model: MegatronModel, engine) -> EngineWeights | None:
    """Give the engine bound to ``model``'s weights on this rank private memory unless it is
    ``engine`` (every sync calls this first, before its first collective, so no rank can be
    writing yet: an engine keeps the weights of the last sync it took part in). Returns the
    model's :class:`EngineWeights`, if it has any."""
    state = engine_weights_of(model)
    if state is not None and state.engine is not engine:
        state.unbind()
    return state


def engine_weights_of(model: MegatronModel) -> EngineWeights | None:
    """The shared engine weights of ``model`` (None until a direct sync made them)."""
    state = _DIRECT.get(id(model))
    if state is not None and state.model_ref() is not model:  # a dead model's id, reused
        del _DIRECT[id(model)]
        return None
    return state


def direct_sync(model: MegatronModel, engine, weights: str) -> int | None:
    """Sync with no bucket and no copy on the engine's side (collective over the replica), or
    return None when it cannot serve this sync (the caller streams buckets instead).

    Where every rank of a replica computes on the CPU of one host and every engine is an hf
    engine in the trainer's dtype (native weights), the replica maps one /dev/shm buffer holding
    the whole model in HF layout, and each engine's parameters are views into it
    (:meth:`~sept_megatron.rollout.base.SharedBufferEngine.bind_weights`, the first time). A sync is then each TP rank copying its own
    pieces straight into the engines' weights (one ``_foreach_copy_`` of views worked out once)
    and one barrier: every byte is written once, by the rank that holds it. Engines of the same
    replica share the buffer, so they also share its memory. The only per-sync agreement is the
    all-gather of one integer per rank that every sync already does (who receives, who can); it
    is also why no rank writes before every rank has entered the sync (none is still generating
    from the weights being replaced)."""
    from megatron.core import parallel_state as ps

    state = forget_other_engine(model, engine)
    if compute_device().type != "cpu" or weights != "native":
        return None  # the same on every rank: the device and rollout.weights are run-wide
    can = engine is None or (
        isinstance(engine, SharedBufferEngine) and engine.can_bind_weights(model.config.params_dtype)
    )
    plan = cached_plan(
        model.arch,
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_virtual_pipeline_model_parallel_world_size(),
    )
    element_size = model.config.params_dtype.itemsize
    total = state.flat.numel() if state is not None else sum(it.numel for it in plan)
    replica = replica_of(engine is not None, total * element_size, flags=int(can))
    if not all(replica.flags.values()) or (len(replica.ranks) > 1 and not replica.shared_memory):
        return None
    if state is None:
        flat = _shared_flat(replica, total, model.config.params_dtype)
        state = _DIRECT[id(model)] = EngineWeights(model, plan, flat)
        weakref.finalize(model, _DIRECT.pop, id(model), None)  # the buffer dies with the model
    if engine is not None:
        state.bind(engine)
    with compat.suspended():  # no tensor is made here: skip the CPU redirect's per-call work
        targets, sources = state.copies(
            lambda: model_params(model),
            ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_rank(),
            ps.get_pipeline_model_parallel_rank(),
        )
        torch._foreach_copy_(targets, sources)  # views of detached tensors: no autograd
    if len(replica.ranks) > 1:
        dist.barrier(group=replica.group)  # every piece is in place before any engine reads
    return 1


def _shared_flat(replica: Replica, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The direct sync's buffer: shared by the replica's ranks, plain memory for one rank."""
    if len(replica.ranks) == 1:
        return torch.empty(numel, dtype=dtype, device=compute_device())
    return shared_buffer(replica, numel, dtype, "sept_weights")
