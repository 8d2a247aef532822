"""Engine data parallelism: one rollout spread over every engine, the answers back in order.

    engines = DataParallelEngines(build_placement(engine_tp), engine)  # every rank
    generations = engines.generate(prompts, sampling)                   # every rank, collective

Each owner answers its shard (:func:`~sept_megatron.rollout.placement.shard_positions`) with
one ``engine.generate`` call per request, passing its prompts' positions in the whole request
as ``seed_keys``; the answers are exchanged with one object all-gather (or gathered to one
rank) and put back in prompt order. The same prompts and seed give the same answers on one
engine or many (see :mod:`~sept_megatron.rollout.placement` for why), so a round's training
batch, identical on every rank, does not depend on the number of GPUs.

Data path: owner ``engine.generate`` -> (positions, results) pickled -> ``all_gather_object``
over the world (gloo on CPU, NCCL on GPU) -> every rank rebuilds the request's rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch.distributed as dist

from sept_megatron.rollout.base import Generation, RolloutEngine, SamplingParams
from sept_megatron.rollout.placement import EngineGroup, Placement, shard_positions
from sept_megatron.rollout.watchdog import rollout_deadline


@dataclass(frozen=True)
class Request:
    """Prompts (token ids) to answer with one sampling setting."""

    prompts: Sequence[Sequence[int]]
    sampling: SamplingParams


class DataParallelEngines:
    """This rank's engine (``local``; None on a rank without one) and the placement of all."""

    def __init__(
        self, placement: Placement, local: RolloutEngine | None, timeout_minutes: float | None = None
    ) -> None:
        if placement.is_owner and local is None:
            raise ValueError(
                f"rank {placement.rank} owns engine {placement.mine.index} but was given no engine"
            )
        self.placement = placement
        self.local = local
        self.timeout_minutes = timeout_minutes  # rollout.timeout_minutes (None: no deadline)

    @classmethod
    def single(cls, engine: RolloutEngine) -> DataParallelEngines:
        """One engine in this process, exchanging nothing (whatever process groups exist)."""
        return cls(Placement((EngineGroup(0, (0,)),), rank=0), engine)

    @property
    def num_engines(self) -> int:
        return self.placement.num_engines

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Generation]]:
        """``sampling.n`` generations per prompt, in prompt order, on every rank (collective)."""
        return self.generate_many([Request(prompts, sampling)])[0]

    def generate_many(
        self,
        requests: Sequence[Request],
        *,
        dst: int | None = None,
        pack: Callable[[Generation], Any] | None = None,
    ) -> list[list[list[Any]]] | None:
        """Answer several requests at once (their shards in one exchange). ``pack`` shrinks
        each generation on its owner before the exchange (e.g. to what grading needs); with
        ``dst`` only that rank receives the answers (others get None). Collective."""
        # One deadline for the whole rollout: the watchdog, armed before this rank's own
        # generation, so it fires first. The gloo wait group carries the same timeout to bound
        # the waits outside a rollout (the weight sync's exchanges); in here it can only fire
        # later than the watchdog, as a backstop, and engine_wait names the engines if it does.
        with rollout_deadline(self.timeout_minutes, self._waiting_on()):
            mine = self._answer_own_shards(requests, pack) if self.placement.is_owner else []
            with engine_wait(self.placement, _doing(requests)):
                everyone = self._exchange(mine, dst)
        if everyone is None:
            return None
        rows: list[list[Any]] = [[None] * len(r.prompts) for r in requests]
        for shard in everyone:
            for request_index, positions, answers in shard:
                for position, answer in zip(positions, answers):
                    rows[request_index][position] = answer
        return rows

    # --- internals ------------------------------------------------------------------------
    def _waiting_on(self) -> str:
        """The engine groups this rank waits on during a rollout, for the timeout's message."""

        def name(group: EngineGroup) -> str:
            return f"engine group {group.index} (ranks {', '.join(map(str, group.ranks))})"

        mine = self.placement.mine
        others = [name(g) for g in self.placement.groups if g.index != mine.index]
        text = f"{name(mine)}, this rank's own"
        return text + (f", or the answers of {', '.join(others)}" if others else "")

    def _answer_own_shards(self, requests: Sequence[Request], pack) -> list[tuple]:
        unit = self.local.shard_sequences
        engine_index = self.placement.mine.index
        answered = []
        for request_index, request in enumerate(requests):
            sampling = request.sampling
            copies = 1 if sampling.temperature == 0 else sampling.n
            lengths = [len(p) for p in request.prompts]
            positions = shard_positions(lengths, copies, self.num_engines, unit)[engine_index]
            if not positions:
                continue
            keys = sampling.seed_keys if sampling.seed_keys is not None else range(len(lengths))
            own = replace(sampling, seed_keys=tuple(keys[p] for p in positions))
            answers = self.local.generate([request.prompts[p] for p in positions], own)
            _check_answers(self.local, answers, len(positions), sampling.n)
            if pack is not None:
                answers = [[pack(g) for g in row] for row in answers]
            answered.append((request_index, positions, answers))
        return answered

    def _exchange(self, mine: list[tuple], dst: int | None) -> list[list[tuple]] | None:
        if self.placement.world_size == 1:
            return [mine]
        group = self.placement.wait_group  # gloo: ranks wait on the CPU (see Placement)
        if dst is None:
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine, group=group)
            return everyone
        received = [None] * dist.get_world_size() if dist.get_rank() == dst else None
        dist.gather_object(mine, received, dst=dst, group=group)
        return received


def _doing(requests: Sequence[Request]) -> str:
    count = sum(len(r.prompts) * (1 if r.sampling.temperature == 0 else r.sampling.n) for r in requests)
    return f"generating {count} sequences ({len(requests)} request(s))"


@contextmanager
def engine_wait(placement: Placement, doing: str):
    """Turn a wait on engines that ran past ``rollout.timeout_minutes`` (or a peer that died
    meanwhile) into an error naming the engine groups waited for and what they were doing."""
    start = time.monotonic()
    try:
        yield
    except RuntimeError as error:  # gloo's timeout is a DistBackendError (a RuntimeError)
        minutes = (time.monotonic() - start) / 60
        limit = placement.timeout_minutes
        late = limit is not None and minutes >= 0.9 * limit
        others = [g.ranks for g in placement.groups if placement.rank not in g.ranks]
        raise RuntimeError(
            f"rank {placement.rank}: engine group(s) {others or [placement.mine.ranks]} "
            f"(owners {[g.owner for g in placement.groups]}) "
            + (
                f"did not finish {doing} within rollout.timeout_minutes={limit:g}"
                if late
                else f"failed while {doing} after {minutes:.1f} min"
            )
            + f"; raise rollout.timeout_minutes if that much time is expected, else see the "
            f"owners' logs ({error})"
        ) from error


def _check_answers(engine, answers, num_prompts: int, n: int) -> None:
    if len(answers) != num_prompts or any(len(row) != n for row in answers):
        raise RuntimeError(
            f"{type(engine).__name__}.generate returned {len(answers)} prompts' "
            f"worth of generations for {num_prompts} prompts (expected {n} each)"
        )
