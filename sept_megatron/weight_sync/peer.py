"""Peer-to-peer buckets (GPU; CPU ranks on several hosts).

Data path of one bucket: each TP rank of the bucket's stage copies its pieces into its own
flat buffer, then one ``batch_isend_irecv`` on the model-parallel group sends them to every
other rank that wants the bucket (TP peers and other stages at once) and receives the missing
ones straight into place: row blocks as they are, column blocks (row-parallel weights)
through a scratch buffer. No ``torch.cat``, no per-tensor collective, no leader that forwards
the whole bucket.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sept_megatron.weight_sync.buckets import BucketTransport, flat_buffer
from sept_megatron.weight_sync.plan import Kind, SyncItem, hf_views, piece_target


class PeerTransport(BucketTransport):
    """Own pieces into a local buffer, the rest by one batched point-to-point exchange. Tags
    (item position x 4 + HF index) pair the messages on gloo; NCCL pairs them by posting
    order, which both sides share."""

    def assemble(self, index: int, bucket: list[SyncItem]) -> list[list[torch.Tensor]] | None:
        others_want = bool(self.replica.receivers - {self.rank})
        on_stage = bucket[0].stage == self.stage
        if not self.receive and not (on_stage and others_want):
            return None
        numel = sum(it.numel for it in bucket)
        views = hf_views(bucket, flat_buffer(self.largest, self.dtype, self.device, "bucket")[:numel])
        ops: list[dist.P2POp] = []
        columns: list[tuple[torch.Tensor, torch.Tensor]] = []  # (strided target, received block)
        if on_stage:
            self._sends(bucket, views, ops)
        if self.receive:
            self._receives(bucket, views, ops, columns)
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        for target, block in columns:
            target.copy_(block)
        return views

    def _sends(self, bucket, views, ops) -> None:
        peers = [
            rank
            for rank in self.replica.ranks.values()
            if rank != self.rank and rank in self.replica.receivers
        ]
        for position, piece, target, source in self.write_own(bucket, views):
            # Row blocks go out from the buffer (QKV's q/k/v blocks are strided in the shard),
            # column blocks from the shard itself.
            outgoing = target if piece.dim == 0 else source
            for peer in peers:
                if piece.replicated and (self.tp_rank != 0 or self.replica.stage_of(peer) == self.stage):
                    continue  # TP peers hold their own copy; TP rank 0 serves the other stages
                ops.append(
                    dist.P2POp(
                        dist.isend, outgoing, peer, self.replica.group, tag=position * 4 + piece.hf_index
                    )
                )

    def _receives(self, bucket, views, ops, columns) -> None:
        stage = bucket[0].stage
        senders = [
            (tp, rank) for (s, tp), rank in self.replica.ranks.items() if s == stage and rank != self.rank
        ]
        incoming_columns = [
            (it, piece)
            for it in bucket
            if it.rule.kind is Kind.ROW_PARALLEL
            for tp_rank, _ in senders
            for piece in self.pieces(it, tp_rank)
        ]
        scratch = flat_buffer(
            sum(it.hf_shapes[0][0] * piece.length for it, piece in incoming_columns),
            self.dtype,
            self.device,
            "columns",
        )
        used = 0
        for position, (it, item_views) in enumerate(zip(bucket, views)):
            for tp_rank, sender in senders:
                for piece in self.pieces(it, tp_rank):
                    if piece.replicated and (tp_rank != 0 or stage == self.stage):
                        continue
                    hf_tensor = item_views[piece.hf_index]
                    if piece.dim == 0:
                        incoming = hf_tensor[piece.start : piece.start + piece.length]
                    else:
                        rows = hf_tensor.shape[0]
                        incoming = scratch[used : used + rows * piece.length].view(rows, piece.length)
                        used += rows * piece.length
                        columns.append((piece_target(hf_tensor, piece, incoming.shape), incoming))
                    ops.append(
                        dist.P2POp(
                            dist.irecv,
                            incoming,
                            sender,
                            self.replica.group,
                            tag=position * 4 + piece.hf_index,
                        )
                    )
