"""checkpoint.save_every_n_rounds and checkpoint.every_minutes (single process, a fake clock)."""

from sept_megatron.config import CheckpointConfig
from sept_megatron.loop.cadence import SaveCadence


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def saves(cadence: SaveCadence, clock: Clock, round_minutes: float, rounds: int) -> list[int]:
    saved = []
    for done in range(1, rounds + 1):
        clock.now += round_minutes * 60
        if cadence.due(done, rounds):
            cadence.started()
            saved.append(done)
    return saved


def test_minutes_cadence_saves_when_the_time_has_passed():
    clock = Clock()
    cadence = SaveCadence(CheckpointConfig(save_every_n_rounds=0, every_minutes=10), clock)
    # 4-minute rounds: a save every third round (12 min >= 10), and the last round.
    assert saves(cadence, clock, 4, 10) == [3, 6, 9, 10]


def test_rounds_and_minutes_combine():
    clock = Clock()
    cadence = SaveCadence(CheckpointConfig(save_every_n_rounds=4, every_minutes=10), clock)
    assert saves(cadence, clock, 3, 9) == [4, 8, 9]  # rounds win; 10 min never pass in between
    clock = Clock()
    cadence = SaveCadence(CheckpointConfig(save_every_n_rounds=4, every_minutes=5), clock)
    assert saves(cadence, clock, 3, 9) == [2, 4, 6, 8, 9]


def test_no_cadence_saves_only_at_the_end():
    clock = Clock()
    assert saves(SaveCadence(CheckpointConfig(save_every_n_rounds=0), clock), clock, 60, 5) == [5]
