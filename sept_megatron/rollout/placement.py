"""Where the rollout engines live, and which prompts each one answers.

Colocated placement: the world is cut into engine groups of ``rollout.engine_tp`` consecutive
global ranks (independent of Megatron's TP/PP: an engine group may span trainer stages). Every
rank of a group holds an engine object; the group's first rank is its *owner*, the one that
generates. The hf backend has one-rank groups (every rank owns an engine).

Sharding (:func:`shard_positions`) is what makes a rollout's data independent of how many
engines produced it. Two things must not change with the engine count:

1. each sequence's random stream: engines draw copy ``j`` of prompt ``i`` from a stream seeded
   by (call seed, ``i``'s position in the whole batch, ``j``) (``SamplingParams.seed_keys``),
   never from an RNG shared with other sequences;
2. each sequence's batch, for engines whose numbers depend on it (the hf engine pads and
   batches ``batch_size`` sequences; float kernels give a row slightly different logits in a
   different batch): prompts are ordered longest first, as the hf engine orders them, cut into
   blocks of one engine batch, and whole blocks are dealt round-robin. An engine sorts its
   shard stably (already sorted) and cuts it at the same block boundaries, so every batch is
   one a single engine would have formed. Exact when the engine's batch is a multiple of the
   copies per prompt (``rollout.batch_size`` a multiple of ``rollout.n``); otherwise a batch
   straddles two blocks and only (1) holds.

Everything here but :func:`build_placement` is a pure function of sizes and lengths.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class EngineGroup:
    """One rollout engine: its index and the global ranks that host it (owner first)."""

    index: int
    ranks: tuple[int, ...]

    @property
    def owner(self) -> int:
        return self.ranks[0]


def engine_groups(world_size: int, engine_tp: int) -> list[EngineGroup]:
    """Consecutive blocks of ``engine_tp`` ranks (on a node of 8 GPUs with engine_tp 4: ranks
    0-3 and 4-7, so an engine never spans nodes when engine_tp divides the GPUs per node)."""
    if engine_tp < 1 or world_size < 1:
        raise ValueError(f"rollout.engine_tp={engine_tp} and world size {world_size} must be >= 1")
    if world_size % engine_tp:
        raise ValueError(
            f"rollout.engine_tp={engine_tp} does not divide the world size "
            f"{world_size}; choose an engine_tp that divides the number of ranks"
        )
    return [
        EngineGroup(index, tuple(range(start, start + engine_tp)))
        for index, start in enumerate(range(0, world_size, engine_tp))
    ]


def group_of(groups: Sequence[EngineGroup], rank: int) -> EngineGroup:
    for group in groups:
        if rank in group.ranks:
            return group
    raise ValueError(f"rank {rank} is in no engine group of {len(groups)}")


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Prompt positions, longest prompt first; ties keep their order (the hf engine's order)."""
    return sorted(range(len(lengths)), key=lambda position: -lengths[position])


def shard_positions(
    lengths: Sequence[int], copies: int, num_engines: int, shard_sequences: int = 1
) -> list[list[int]]:
    """The prompt positions each engine answers, in the order it should be given them.

    ``copies``: sequences per prompt (``n``, or 1 for greedy). ``shard_sequences``: the
    engines' batch, in sequences (1: balance prompt by prompt). Blocks of
    ``shard_sequences // copies`` prompts (at least one), longest prompts first, are dealt
    round-robin, so engines differ by at most one block. Concatenating the shards and sorting by
    position recovers the prompt order.
    """
    if copies < 1 or num_engines < 1 or shard_sequences < 1:
        raise ValueError(
            f"copies={copies}, num_engines={num_engines} and "
            f"shard_sequences={shard_sequences} must all be >= 1"
        )
    order = longest_first(lengths)
    prompts_per_block = max(1, shard_sequences // copies)
    shards: list[list[int]] = [[] for _ in range(num_engines)]
    for block, start in enumerate(range(0, len(order), prompts_per_block)):
        shards[block % num_engines] += order[start : start + prompts_per_block]
    return shards


@dataclass(frozen=True)
class Placement:
    """This rank's view of the engine groups; ``process_group`` is its own group's
    torch.distributed group (None in a world of one). ``cpu_group`` spans the same ranks over
    gloo and ``wait_group`` the whole world over gloo, both with the rollout's timeout: the
    waits of ranks that do not generate and the exchanges of pickled objects (answers, CUDA-IPC
    handles) run there, on the CPU, instead of spinning NCCL kernels on the GPUs the engine
    decodes on (slime waits on the CPU and gathers its IPC handles over gloo too)."""

    groups: tuple[EngineGroup, ...]
    rank: int
    process_group: Any = None
    cpu_group: Any = None
    wait_group: Any = None
    timeout_minutes: float | None = None

    @property
    def mine(self) -> EngineGroup:
        return group_of(self.groups, self.rank)

    @property
    def is_owner(self) -> bool:
        return self.mine.owner == self.rank

    @property
    def num_engines(self) -> int:
        return len(self.groups)

    @property
    def world_size(self) -> int:
        return sum(len(group.ranks) for group in self.groups)


def build_placement(engine_tp: int, timeout_minutes: float | None = None) -> Placement:
    """Engine groups of the running world; collective when the world is larger than one
    (every rank creates every group's process group, in the same order, as torch requires).
    ``timeout_minutes`` (``rollout.timeout_minutes``) bounds every wait on an engine."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return Placement(tuple(engine_groups(1, engine_tp)), 0, timeout_minutes=timeout_minutes)
    rank = dist.get_rank()
    groups = engine_groups(dist.get_world_size(), engine_tp)
    timeout = _timeout(timeout_minutes)
    own = own_cpu = None
    for group in groups:
        handle = dist.new_group(list(group.ranks))
        cpu = dist.new_group(list(group.ranks), backend="gloo", timeout=timeout)
        if rank in group.ranks:
            own, own_cpu = handle, cpu
    wait = dist.new_group(backend="gloo", timeout=timeout)
    return Placement(tuple(groups), rank, own, own_cpu, wait, timeout_minutes)


def _timeout(minutes: float | None) -> datetime.timedelta | None:
    return None if minutes is None else datetime.timedelta(minutes=minutes)


def server_placement(timeout_minutes: float | None = None) -> Placement:
    """Disaggregated rollout: the SGLang servers form one engine to the orchestration, owned by
    global rank 0 (its client spreads the prompts over the servers); every rank is in its
    group, so every rank receives the answers. No process group: the servers are reached over
    HTTP and their own weight-update groups."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    wait = dist.new_group(backend="gloo", timeout=_timeout(timeout_minutes)) if world > 1 else None
    return Placement(
        (EngineGroup(0, tuple(range(world))),), rank, wait_group=wait, timeout_minutes=timeout_minutes
    )
