"""When the loop saves: every ``checkpoint.save_every_n_rounds`` rounds, every
``checkpoint.every_minutes`` minutes, and after the last round.

A cadence in minutes keeps the work lost to a crash bounded in wall-clock time whatever a
round costs (rounds get longer as answers do). Ranks' clocks differ, so rank 0's decides and
is broadcast: every rank must enter the (collective) save together.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from sept_megatron.config import CheckpointConfig


class SaveCadence:
    """Is a save due after this round? Call :meth:`started` when one starts."""

    def __init__(self, checkpoint: CheckpointConfig, clock: Callable[[], float] = time.monotonic):
        self.every_rounds, self.every_minutes = checkpoint.save_every_n_rounds, checkpoint.every_minutes
        self.clock = clock
        self.last_start = clock()  # the run's start counts as a save: nothing to lose before it

    def due(self, rounds_done: int, rounds: int) -> bool:
        if rounds_done == rounds:
            return True
        if self.every_rounds and rounds_done % self.every_rounds == 0:
            return True
        return bool(self.every_minutes) and self._minutes_passed()

    def started(self) -> None:
        self.last_start = self.clock()

    def _minutes_passed(self) -> bool:
        passed = (self.clock() - self.last_start) / 60.0 >= self.every_minutes
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return passed
        from sept_megatron.runtime.distributed import compute_device

        flag = torch.tensor([int(passed)], dtype=torch.int32, device=compute_device())
        dist.broadcast(flag, src=0)  # rank 0's clock decides for all
        return bool(flag.item())
