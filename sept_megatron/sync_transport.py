"""How the trainer's weight shards reach every engine of a model replica.

On the CPU ranks of one host, with hf engines in the trainer's dtype, there is no bucket at all
(:func:`direct_sync`, the default there): the replica maps one /dev/shm buffer that holds the
whole model in HF layout and *is* the engines' weights (their parameters are views into it), so
a sync is each TP rank copying its own pieces into place and one barrier. Everywhere else
(GPU, SGLang, FP8 weights, ranks on several hosts) the buckets below are streamed.

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
sync adds one all-gather of one integer per rank (who receives, and for a direct sync who can)
to its bucket exchanges.
"""

from __future__ import annotations

import os
import socket
import uuid
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from sept_megatron import compat
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
    flags: dict[int, int]  # global rank -> the ``flags`` it passed to :func:`replica_of`

    def stage_of(self, rank: int) -> int:
        return next(stage for (stage, _), r in self.ranks.items() if r == rank)


_LAYOUTS: dict[tuple, tuple[dict[tuple[int, int], int], bool]] = {}


def replica_of(receive: bool, shared_bytes: int, flags: int = 0) -> Replica:
    """This rank's replica (collective over the model-parallel group). Where the ranks sit
    (stage, TP rank, host, room in /dev/shm) does not change during a run: it is agreed by one
    object all-gather the first time and cached. Who receives (and the caller's ``flags``) is
    agreed at every sync by one all-gather of one integer per rank (a rank may sync with or
    without an engine)."""
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    size = dist.get_world_size(group)
    key = (tuple(dist.get_process_group_ranks(group)), ps.get_tensor_model_parallel_world_size(),
           ps.get_pipeline_model_parallel_world_size(), shared_bytes)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _layout(group, size, shared_bytes)
    ranks, shared_memory = _LAYOUTS[key]
    device = compute_device()
    mine = torch.tensor([int(receive) | flags << 1], device=device)
    words = [mine]
    if size > 1:
        words = [torch.empty(1, dtype=torch.int64, device=device) for _ in range(size)]
        dist.all_gather(words, mine, group=group)
    group_ranks = dist.get_process_group_ranks(group) if size > 1 else [dist.get_rank()]
    everyone = {rank: int(word.item()) for rank, word in zip(group_ranks, words)}
    return Replica(ranks=ranks, receivers=frozenset(r for r, w in everyone.items() if w & 1),
                   group=group, shared_memory=shared_memory,
                   flags={rank: word >> 1 for rank, word in everyone.items()})


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
    element_size = model.config.params_dtype.itemsize
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


def own_pieces(model: MegatronModel, params: dict[str, torch.Tensor], bucket: list[SyncItem],
               views: list[list[torch.Tensor]], tp: int, tp_rank: int):
    """This TP rank's pieces of ``bucket``: (position, piece, target view, source view)."""
    for position, (it, item_views) in enumerate(zip(bucket, views)):
        shard = params[it.megatron_name]
        for piece in tp_pieces(it, tp, tp_rank, model.padded_vocab):
            source = piece_source(it, piece, shard, model.arch)
            yield position, piece, piece_target(item_views[piece.hf_index], piece, source.shape), source


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
        for position, piece, target, source in own_pieces(
                self.model, self.params, bucket, views, self.tp, self.tp_rank):
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
    """Two bucket slots in one /dev/shm file mapped by every rank of the replica
    (:func:`_shared_buffer`: nothing is left behind, even on a crash)."""

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
        _SHARED[key] = _Slots(_shared_buffer(replica, 2 * largest, dtype, "sept_sync"), largest)
    return _SHARED[key]


def _shared_buffer(replica: Replica, numel: int, dtype: torch.dtype, prefix: str) -> torch.Tensor:
    """``numel`` elements in one /dev/shm file mapped by every rank of the replica (collective).
    The file is unlinked as soon as every rank has mapped it, so nothing is left behind."""
    creator = min(replica.ranks.values())
    path = None
    if dist.get_rank() == creator:
        path = os.path.join(SHM_DIR, f"{prefix}_{uuid.uuid4().hex}")
        element_size = dtype.itemsize
        with open(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600), "wb") as f:
            f.truncate(numel * element_size)
    box = [path]
    dist.broadcast_object_list(box, src=creator, group=replica.group)
    flat = torch.from_file(box[0], shared=True, size=numel, dtype=dtype, device=compute_device())
    dist.barrier(group=replica.group)
    if dist.get_rank() == creator:
        os.unlink(box[0])
    return flat


# --- direct: the engines' weights are the shared buffer (CPU) ---------------------------------
class EngineWeights:
    """One model's HF tensors, in plan order, in one flat buffer that every rank of its replica
    maps, and the engine on this rank whose parameters are views into it (at most one: binding
    another engine, or syncing with none, gives the previous one private memory again, so an
    engine only ever sees weights that were synced into it)."""

    def __init__(self, model: MegatronModel, plan: list[SyncItem], flat: torch.Tensor) -> None:
        self.model_ref = weakref.ref(model)
        self.plan, self.flat = plan, flat
        self.views = hf_views(plan, flat)
        self.named = [(name, view) for it, item_views in zip(plan, self.views)
                      for name, view in zip(it.hf_names, item_views)]
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

    def copies(self, params: Callable[[], dict[str, torch.Tensor]], tp: int, tp_rank: int,
               stage: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(targets, sources) of this rank's pieces: views of the shared buffer and of the live
        parameter shards, worked out once and reused while no parameter has moved."""
        if self._copies is None or any(p.data_ptr() != ptr for p, ptr in self._checked):
            live = params()
            mine = [(it, views) for it, views in zip(self.plan, self.views) if it.stage == stage]
            targets, sources = [], []
            for _, piece, target, source in own_pieces(
                    self.model_ref(), {k: v.detach() for k, v in live.items()},
                    [it for it, _ in mine], [views for _, views in mine], tp, tp_rank):
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


def direct_sync(model: MegatronModel, engine, plan: list[SyncItem],
                params: Callable[[], dict[str, torch.Tensor]], weights: str) -> int | None:
    """Sync with no bucket and no copy on the engine's side (collective over the replica), or
    return None when it cannot serve this sync (the caller streams buckets instead).

    Where every rank of a replica computes on the CPU of one host and every engine is an hf
    engine in the trainer's dtype (native weights), the replica maps one /dev/shm buffer holding
    the whole model in HF layout, and each engine's parameters are views into it
    (``engine.bind_weights``, the first time). A sync is then each TP rank copying its own
    pieces straight into the engines' weights (one ``_foreach_copy_`` of views worked out once)
    and one barrier: every byte is written once, by the rank that holds it. Engines of the same
    replica share the buffer, so they also share its memory. The only per-sync agreement is the
    all-gather of one integer per rank that every sync already does (who receives, who can); it
    is also why no rank writes before every rank has entered the sync (none is still generating
    from the weights being replaced)."""
    state = forget_other_engine(model, engine)
    if compute_device().type != "cpu" or weights != "native":
        return None  # the same on every rank: the device and rollout.weights are run-wide
    can = engine is None or bool(getattr(engine, "can_bind_weights", lambda _: False)(
        model.config.params_dtype))
    element_size = model.config.params_dtype.itemsize
    total = state.flat.numel() if state is not None else sum(it.numel for it in plan)
    replica = replica_of(engine is not None, total * element_size, flags=int(can))
    if not all(replica.flags.values()) or (len(replica.ranks) > 1 and not replica.shared_memory):
        return None
    from megatron.core import parallel_state as ps

    if state is None:
        flat = _shared_flat(replica, total, model.config.params_dtype)
        state = _DIRECT[id(model)] = EngineWeights(model, plan, flat)
        weakref.finalize(model, _DIRECT.pop, id(model), None)  # the buffer dies with the model
    if engine is not None:
        state.bind(engine)
    with compat.suspended():  # no tensor is made here: skip the CPU redirect's per-call work
        targets, sources = state.copies(params, ps.get_tensor_model_parallel_world_size(),
                                        ps.get_tensor_model_parallel_rank(),
                                        ps.get_pipeline_model_parallel_rank())
        torch._foreach_copy_(targets, sources)  # views of detached tensors: no autograd
    if len(replica.ranks) > 1:
        dist.barrier(group=replica.group)  # every piece is in place before any engine reads
    if engine is not None:
        engine.loaded_tensor_count = len(state.named)
    return 1


def _shared_flat(replica: Replica, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The direct sync's buffer: shared by the replica's ranks, plain memory for one rank."""
    if len(replica.ranks) == 1:
        return torch.empty(numel, dtype=dtype, device=compute_device())
    return _shared_buffer(replica, numel, dtype, "sept_weights")
