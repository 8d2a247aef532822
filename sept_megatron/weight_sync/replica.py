"""Where a model replica's ranks sit, agreed once per process, and its shared host memory.

A replica is the TP x PP ranks of one data-parallel rank: replicas hold bitwise-equal weights
after every optimizer step (Megatron all-gathers updated parameters synchronously), so each
replica serves its own engines and nothing crosses data-parallel ranks. :func:`replica_of`
tells every mechanism who is where, who receives this sync, and whether one /dev/shm buffer
can serve the whole replica (every rank on the CPU of one host).
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sept_megatron.runtime.distributed import compute_device

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
    key = (
        tuple(dist.get_process_group_ranks(group)),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        shared_bytes,
    )
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
    return Replica(
        ranks=ranks,
        receivers=frozenset(r for r, w in everyone.items() if w & 1),
        group=group,
        shared_memory=shared_memory,
        flags={rank: word >> 1 for rank, word in everyone.items()},
    )


def _layout(group, size: int, shared_bytes: int) -> tuple[dict[tuple[int, int], int], bool]:
    from megatron.core import parallel_state as ps

    shm_fits = (
        compute_device().type == "cpu" and os.path.isdir(SHM_DIR) and _free_bytes(SHM_DIR) >= 2 * shared_bytes
    )
    me = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        dist.get_rank(),
        socket.gethostname(),
        shm_fits,
    )
    everyone = [me]
    if size > 1:
        everyone = [None] * size
        dist.all_gather_object(everyone, me, group=group)
    hosts = {host for *_, host, _ in everyone}
    return (
        {(stage, tp): rank for stage, tp, rank, *_ in everyone},
        len(hosts) == 1 and all(e[-1] for e in everyone),
    )


def _free_bytes(path: str) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def shared_buffer(replica: Replica, numel: int, dtype: torch.dtype, prefix: str) -> torch.Tensor:
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
