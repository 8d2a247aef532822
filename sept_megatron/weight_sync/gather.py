"""Megatron layout -> full HF-named buckets: the one gather path every mechanism uses.

:func:`stream_hf_buckets` walks the plan (:mod:`~sept_megatron.weight_sync.plan`) bucket by
bucket; on every rank that receives, each bucket arrives whole in one flat buffer, assembled
from the TP ranks' pieces by a bucket transport: :mod:`~sept_megatron.weight_sync.peer`
(batched point-to-point: GPU, or CPU across hosts) or
:mod:`~sept_megatron.weight_sync.shared_memory` (CPU ranks of one host). The colocated engines
(:mod:`~sept_megatron.weight_sync.sglang_ipc`, or an engine's own ``update_weights``) and the
remote servers (:mod:`~sept_megatron.weight_sync.server_broadcast`, one stage at a time) all
consume this stream, so they cannot disagree on names, shapes or order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sept_megatron.convert.adapters import canonical_name
from sept_megatron.convert.hf_import import layer_offset
from sept_megatron.trainer.model import MegatronModel, unwrap_module
from sept_megatron.weight_sync.peer import PeerTransport
from sept_megatron.weight_sync.plan import plan_buckets, sync_plan
from sept_megatron.weight_sync.replica import SHM_DIR, replica_of
from sept_megatron.weight_sync.shared_memory import SharedMemoryTransport

TRANSPORTS = ("auto", "peer", "shared")


def model_params(model: MegatronModel) -> dict[str, torch.nn.Parameter]:
    """Canonical Megatron name -> this rank's parameter (its TP shard)."""
    params = {}
    for chunk in model.chunks:
        module = unwrap_module(chunk)
        offset = layer_offset(module)
        for name, param in module.named_parameters():
            canonical = canonical_name(name, offset)
            if canonical is not None:
                params[canonical] = param
    return params


def live_params(model: MegatronModel) -> dict[str, torch.Tensor]:
    """:func:`model_params` as detached views (what a sync reads)."""
    return {name: param.detach() for name, param in model_params(model).items()}


def transports_on(device: torch.device) -> tuple[str, ...]:
    """The bucket transports that exist for trainer ranks computing on ``device``: shared
    memory only between CPU ranks (a CUDA tensor cannot live in a /dev/shm mapping)."""
    return ("auto", "peer", "shared") if device.type == "cpu" else ("auto", "peer")


def choose_transport(
    model: MegatronModel,
    params: dict[str, torch.Tensor],
    largest: int,
    receive: bool,
    transport: str = "auto",
):
    """The transport of this sync (collective: every rank of the replica picks the same).
    ``auto``: shared memory where the replica's ranks share a host and compute on the CPU,
    else peer-to-peer; ``peer`` / ``shared`` force one (tests, measurements)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"weight-sync transport {transport!r}: choose one of {', '.join(TRANSPORTS)}")
    element_size = model.config.params_dtype.itemsize
    replica = replica_of(receive, largest * element_size)
    if transport == "shared" and not replica.shared_memory:
        raise ValueError(
            "the shared-memory weight-sync transport needs every rank of the "
            f"replica on one host, on the CPU, with room in {SHM_DIR}; use "
            "transport='auto' or 'peer'"
        )
    if transport == "shared" or (
        transport == "auto" and replica.shared_memory and len(replica.ranks) > 1
    ):  # one rank: nothing to move
        return SharedMemoryTransport(model, replica, params, largest, receive)
    return PeerTransport(model, replica, params, largest, receive)


def stream_hf_buckets(
    model: MegatronModel,
    bucket_bytes: int,
    *,
    receive: bool = True,
    transport: str = "auto",
    stage: int | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Collective over the ranks of this rank's model replica: a rank with ``receive`` yields
    every HF-named bucket of the model (of pipeline stage ``stage`` only, when given), in plan
    order; a rank without yields nothing but must exhaust the iterator (it sends its pieces).
    A bucket's tensors are views into a buffer that a later bucket reuses: consume (copy) each
    one before asking for the next. ``transport``: auto, peer or shared (the same on every
    rank; see :func:`choose_transport`)."""
    from megatron.core import parallel_state as ps

    plan = sync_plan(
        model.arch,
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_virtual_pipeline_model_parallel_world_size(),
    )
    element_size = model.config.params_dtype.itemsize
    buckets = [
        bucket
        for bucket in plan_buckets(plan, bucket_bytes, element_size)
        if stage is None or bucket[0].stage == stage
    ]
    largest = max(sum(it.numel for it in bucket) for bucket in buckets)
    mover = choose_transport(model, live_params(model), largest, receive, transport)
    for index, bucket in enumerate(buckets):
        with torch.no_grad():
            views = mover.assemble(index, bucket)
        if receive:
            yield [
                (name, view)
                for it, item_views in zip(bucket, views)
                for name, view in zip(it.hf_names, item_views)
            ]
    mover.finish()
