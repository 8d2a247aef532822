"""Shared-memory buckets (CPU ranks of one host).

gloo moves data over loopback TCP at about 0.5-1 GB/s, several times slower than a memory
copy, so here the replica's ranks map one file in /dev/shm with two bucket slots. Data path
of one bucket: each TP rank of the stage writes its pieces into the slot, a barrier, and every
engine reads the bucket from the shared pages. A slot is rewritten two buckets later, after a
barrier that every reader reaches only once it has consumed the bucket (the stream hands out
one bucket at a time). The slots alternate across syncs too (one counter per mapping, advanced
in step on every rank), so the same argument covers the first buckets of the next sync and no
collective is needed between syncs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sept_megatron.weight_sync.buckets import BucketTransport
from sept_megatron.weight_sync.plan import SyncItem, hf_views
from sept_megatron.weight_sync.replica import Replica, shared_buffer


class SharedMemoryTransport(BucketTransport):
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
        _SHARED[key] = _Slots(shared_buffer(replica, 2 * largest, dtype, "sept_sync"), largest)
    return _SHARED[key]
