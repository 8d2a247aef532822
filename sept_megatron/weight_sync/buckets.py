"""What the bucket transports share: a flat buffer per bucket and this rank's own pieces.

:func:`~sept_megatron.weight_sync.gather.stream_hf_buckets` assembles each full HF bucket in
a flat buffer on every rank that hosts an engine; the TP ranks of the bucket's stage hold its
pieces (:func:`~sept_megatron.weight_sync.plan.tp_pieces`). Each rank copies its own pieces
into place (:meth:`BucketTransport.write_own`); the mechanisms
(:mod:`~sept_megatron.weight_sync.peer`, :mod:`~sept_megatron.weight_sync.shared_memory`)
differ only in how the other ranks' pieces arrive.
"""

from __future__ import annotations

import torch

from sept_megatron.runtime.distributed import compute_device
from sept_megatron.trainer.model import MegatronModel
from sept_megatron.weight_sync.plan import SyncItem, piece_source, piece_target, tp_pieces
from sept_megatron.weight_sync.replica import Replica

# Host buffers are kept between syncs: a fresh one would be zero-filled page by page by the OS
# on first touch, about the cost of one more copy of the model. On CUDA the caching allocator
# reuses freed blocks at no cost, and holding the buffer would take memory from the trainer.
_HOST_BUFFERS: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def flat_buffer(numel: int, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    buffer = _HOST_BUFFERS.get((name, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = _HOST_BUFFERS[(name, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def own_pieces(
    model: MegatronModel,
    params: dict[str, torch.Tensor],
    bucket: list[SyncItem],
    views: list[list[torch.Tensor]],
    tp: int,
    tp_rank: int,
):
    """This TP rank's pieces of ``bucket``: (position, piece, target view, source view)."""
    for position, (it, item_views) in enumerate(zip(bucket, views)):
        shard = params[it.megatron_name]
        for piece in tp_pieces(it, tp, tp_rank, model.padded_vocab):
            source = piece_source(it, piece, shard, model.arch)
            yield position, piece, piece_target(item_views[piece.hf_index], piece, source.shape), source


class BucketTransport:
    """What both transports share: this rank's place in the replica and its own pieces."""

    def __init__(
        self,
        model: MegatronModel,
        replica: Replica,
        params: dict[str, torch.Tensor],
        largest: int,
        receive: bool,
    ) -> None:
        from megatron.core import parallel_state as ps

        self.model, self.replica, self.params = model, replica, params
        self.largest, self.receive = largest, receive
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.stage = ps.get_pipeline_model_parallel_rank()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.rank = replica.ranks[(self.stage, self.tp_rank)]
        self.device = compute_device()
        self.dtype = model.config.params_dtype

    def pieces(self, item: SyncItem, tp_rank: int):
        return tp_pieces(item, self.tp, tp_rank, self.model.padded_vocab)

    def write_own(self, bucket, views, *, replicated: bool = True):
        """Copy this rank's pieces into place; yields (position, piece, written target, source)."""
        for position, piece, target, source in own_pieces(
            self.model, self.params, bucket, views, self.tp, self.tp_rank
        ):
            if replicated or not piece.replicated:
                target.copy_(source)
            yield position, piece, target, source

    def finish(self) -> None:
        pass
