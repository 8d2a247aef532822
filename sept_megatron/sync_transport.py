"""How the pieces of a weight-sync bucket reach every rank of a model replica.

:func:`sept_megatron.reshard.stream_hf_buckets` assembles each full HF bucket in a flat buffer
on every rank that hosts an engine; the TP ranks of the bucket's stage hold its pieces
(:func:`~sept_megatron.reshard.tp_pieces`). Two transports move them, one chosen per sync by
:func:`choose_transport`, identically on every rank of the replica:

- :class:`PeerTransport` (GPU; CPU across hosts). Each TP rank of the stage copies its pieces
  into its own buffer, then one ``batch_isend_irecv`` on the model-parallel group sends them to
  every other rank that wants the bucket (TP peers and other stages at once) and receives the
  missing ones straight into place: row blocks as they are, column blocks (row-parallel
  weights) through a scratch buffer.
- :class:`SharedMemoryTransport` (CPU ranks of one host). gloo moves data over loopback TCP at
  about 0.5-1 GB/s, several times slower than a memory copy, so here the replica's ranks map
  one file in /dev/shm with two bucket slots: each TP rank of the stage writes its pieces into
  the slot, a barrier, and every engine reads the bucket from the shared pages. A slot is
  rewritten two buckets later, after a barrier that every reader reaches only once it has
  consumed the bucket (the stream hands out one bucket at a time). The slots alternate across
  syncs too (one counter per mapping, advanced in step on every rank), so the same argument
  covers the first buckets of the next sync and no collective is needed between syncs.

Where a replica's ranks sit (:func:`replica_of`) is agreed once per process and cached; a
sync adds one all-gather of one integer per rank (who receives) to its bucket exchanges.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sept_megatron.distributed import compute_device
from sept_megatron.model import MegatronModel
from sept_megatron.reshard import Kind, SyncItem, piece_source, piece_target, tp_pieces

SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class Replica:
    """This rank's model replica: (stage, TP rank) -> global rank, who wants the buckets, the
    group it talks on, and whether a shared-memory buffer can serve all of it."""

    ranks: dict[tuple[int, int], int]
    receivers: frozenset[int]
    group: object
    shared_memory: bool

    def stage_of(self, rank: int) -> int:
        return next(stage for (stage, _), r in self.ranks.items() if r == rank)


_LAYOUTS: dict[tuple, tuple[dict[tuple[int, int], int], bool]] = {}


def replica_of(receive: bool, shared_bytes: int) -> Replica:
    """This rank's replica (collective over the model-parallel group). Where the ranks sit
    (stage, TP rank, host, room in /dev/shm) does not change during a run: it is agreed by one
    object all-gather the first time and cached. Who receives is agreed at every sync by one
    all-gather of one integer per rank (a rank may sync with or without an engine)."""
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    size = dist.get_world_size(group)
    key = (tuple(dist.get_process_group_ranks(group)), ps.get_tensor_model_parallel_world_size(),
           ps.get_pipeline_model_parallel_world_size(), shared_bytes)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _layout(group, size, shared_bytes)
    ranks, shared_memory = _LAYOUTS[key]
    device = compute_device()
    flags = [torch.tensor([int(receive)], device=device)]
    if size > 1:
        flags = [torch.empty(1, dtype=torch.int64, device=device) for _ in range(size)]
        dist.all_gather(flags, torch.tensor([int(receive)], device=device), group=group)
    group_ranks = dist.get_process_group_ranks(group) if size > 1 else [dist.get_rank()]
    receivers = frozenset(rank for rank, flag in zip(group_ranks, flags) if int(flag.item()))
    return Replica(ranks=ranks, receivers=receivers, group=group, shared_memory=shared_memory)


def _layout(group, size: int, shared_bytes: int) -> tuple[dict[tuple[int, int], int], bool]:
    from megatron.core import parallel_state as ps

    shm_fits = (compute_device().type == "cpu" and os.path.isdir(SHM_DIR)
                and _free_bytes(SHM_DIR) >= 2 * shared_bytes)
    me = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
          dist.get_rank(), socket.gethostname(), shm_fits)
    everyone = [me]
    if size > 1:
        everyone = [None] * size
        dist.all_gather_object(everyone, me, group=group)
    hosts = {host for *_, host, _ in everyone}
    return ({(stage, tp): rank for stage, tp, rank, *_ in everyone},
            len(hosts) == 1 and all(e[-1] for e in everyone))


def _free_bytes(path: str) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


TRANSPORTS = ("auto", "peer", "shared")


def choose_transport(model: MegatronModel, params: dict[str, torch.Tensor], largest: int,
                     receive: bool, transport: str = "auto"):
    """The transport of this sync (collective: every rank of the replica picks the same).
    ``auto``: shared memory where the replica's ranks share a host and compute on the CPU,
    else peer-to-peer; ``peer`` / ``shared`` force one (tests, measurements)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"weight-sync transport {transport!r}: choose one of {', '.join(TRANSPORTS)}")
    element_size = torch.empty((), dtype=model.config.params_dtype).element_size()
    replica = replica_of(receive, largest * element_size)
    if transport == "shared" and not replica.shared_memory:
        raise ValueError("the shared-memory weight-sync transport needs every rank of the "
                         f"replica on one host, on the CPU, with room in {SHM_DIR}")
    if transport == "shared" or (transport == "auto" and replica.shared_memory
                                 and len(replica.ranks) > 1):  # one rank: nothing to move
        return SharedMemoryTransport(model, replica, params, largest, receive)
    return PeerTransport(model, replica, params, largest, receive)


def hf_views(bucket: list[SyncItem], flat: torch.Tensor) -> list[list[torch.Tensor]]:
    """Each item's HF tensors as views into the bucket's flat buffer, in plan order."""
    views, start = [], 0
    for it in bucket:
        item_views = []
        for shape in it.hf_shapes:
            n = int(torch.Size(shape).numel())
            item_views.append(flat[start: start + n].view(shape))
            start += n
        views.append(item_views)
    return views


# Host buffers are kept between syncs: a fresh one would be zero-filled page by page by the OS
# on first touch, about the cost of one more copy of the model. On CUDA the caching allocator
# reuses freed blocks at no cost, and holding the buffer would take memory from the trainer.
_HOST_BUFFERS: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _flat_buffer(numel: int, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    buffer = _HOST_BUFFERS.get((name, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = _HOST_BUFFERS[(name, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


class _Transport:
    """What both transports share: this rank's place in the replica and its own pieces."""

    def __init__(self, model: MegatronModel, replica: Replica, params: dict[str, torch.Tensor],
                 largest: int, receive: bool) -> None:
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
        for position, (it, item_views) in enumerate(zip(bucket, views)):
            shard = self.params[it.megatron_name]
            for piece in self.pieces(it, self.tp_rank):
                source = piece_source(it, piece, shard, self.model.arch)
                target = piece_target(item_views[piece.hf_index], piece, source.shape)
                if replicated or not piece.replicated:
                    target.copy_(source)
                yield position, piece, target, source

    def finish(self) -> None:
        pass


class PeerTransport(_Transport):
    """Own pieces into a local buffer, the rest by one batched point-to-point exchange. Tags
    (item position x 4 + HF index) pair the messages on gloo; NCCL pairs them by posting
    order, which both sides share."""

    def assemble(self, index: int, bucket: list[SyncItem]) -> list[list[torch.Tensor]] | None:
        others_want = bool(self.replica.receivers - {self.rank})
        on_stage = bucket[0].stage == self.stage
        if not self.receive and not (on_stage and others_want):
            return None
        numel = sum(it.numel for it in bucket)
        views = hf_views(bucket, _flat_buffer(self.largest, self.dtype, self.device, "bucket")[:numel])
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
        peers = [rank for rank in self.replica.ranks.values()
                 if rank != self.rank and rank in self.replica.receivers]
        for position, piece, target, source in self.write_own(bucket, views):
            # Row blocks go out from the buffer (QKV's q/k/v blocks are strided in the shard),
            # column blocks from the shard itself.
            outgoing = target if piece.dim == 0 else source
            for peer in peers:
                if piece.replicated and (self.tp_rank != 0 or self.replica.stage_of(peer) == self.stage):
                    continue  # TP peers hold their own copy; TP rank 0 serves the other stages
                ops.append(dist.P2POp(dist.isend, outgoing, peer, self.replica.group,
                                      tag=position * 4 + piece.hf_index))

    def _receives(self, bucket, views, ops, columns) -> None:
        stage = bucket[0].stage
        senders = [(tp, rank) for (s, tp), rank in self.replica.ranks.items()
                   if s == stage and rank != self.rank]
        incoming_columns = [(it, piece) for it in bucket if it.rule.kind is Kind.ROW_PARALLEL
                            for tp_rank, _ in senders for piece in self.pieces(it, tp_rank)]
        scratch = _flat_buffer(sum(it.hf_shapes[0][0] * piece.length for it, piece in incoming_columns),
                               self.dtype, self.device, "columns")
        used = 0
        for position, (it, item_views) in enumerate(zip(bucket, views)):
            for tp_rank, sender in senders:
                for piece in self.pieces(it, tp_rank):
                    if piece.replicated and (tp_rank != 0 or stage == self.stage):
                        continue
                    hf_tensor = item_views[piece.hf_index]
                    if piece.dim == 0:
                        incoming = hf_tensor[piece.start: piece.start + piece.length]
                    else:
                        rows = hf_tensor.shape[0]
                        incoming = scratch[used: used + rows * piece.length].view(rows, piece.length)
                        used += rows * piece.length
                        columns.append((piece_target(hf_tensor, piece, incoming.shape), incoming))
                    ops.append(dist.P2POp(dist.irecv, incoming, sender, self.replica.group,
                                          tag=position * 4 + piece.hf_index))


class SharedMemoryTransport(_Transport):
    """Two bucket slots in one /dev/shm file mapped by every rank of the replica. The file is
    unlinked as soon as every rank has mapped it, so nothing is left behind, even on a crash."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slots = _shared_slots(self.replica, self.largest, self.dtype)

    def assemble(self, index: int, bucket: list[SyncItem]) -> list[list[torch.Tensor]] | None:
        numel = sum(it.numel for it in bucket)
        slot = self.slots.next()[:numel]
        views = hf_views(bucket, slot)
        if bucket[0].stage == self.stage:  # replicated norms: TP rank 0 writes them
            for _ in self.write_own(bucket, views, replicated=self.tp_rank == 0):
                pass
        dist.barrier(group=self.replica.group)  # the bucket is whole (and bucket - 2 read)
        return views if self.receive else None


class _Slots:
    """The two bucket slots of one mapping, handed out alternately for the whole process."""

    def __init__(self, flat: torch.Tensor, largest: int) -> None:
        self.slots = (flat[:largest], flat[largest:])
        self.used = 0

    def next(self) -> torch.Tensor:
        slot = self.slots[self.used % 2]
        self.used += 1
        return slot


# One mapping per (replica, size, dtype), kept for the process: mapping pages is not free.
_SHARED: dict[tuple, _Slots] = {}


def _shared_slots(replica: Replica, largest: int, dtype: torch.dtype) -> _Slots:
    key = (tuple(sorted(replica.ranks.items())), largest, dtype)
    if key not in _SHARED:
        creator = min(replica.ranks.values())
        path = None
        if dist.get_rank() == creator:
            path = os.path.join(SHM_DIR, f"sept_sync_{uuid.uuid4().hex}")
            element_size = torch.empty((), dtype=dtype).element_size()
            with open(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600), "wb") as f:
                f.truncate(2 * largest * element_size)
        box = [path]
        dist.broadcast_object_list(box, src=creator, group=replica.group)
        flat = torch.from_file(box[0], shared=True, size=2 * largest, dtype=dtype,
                               device=compute_device())
        dist.barrier(group=replica.group)
        if dist.get_rank() == creator:
            os.unlink(box[0])
        _SHARED[key] = _Slots(flat, largest)
    return _SHARED[key]
