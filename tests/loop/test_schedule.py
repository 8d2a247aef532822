"""The pure pieces of the loop: temperature schedule, round count, mini-batching."""

import pytest

from sept_megatron.config import Config, RolloutConfig, TrainConfig
from sept_megatron.loop.round import mini_batches
from sept_megatron.loop.schedule import sampling_temperature, total_rounds
from sept_megatron.trainer.sft import Sample


def test_linear_anneal_matches_the_paper_reference():
    # 0.6 -> 1.0 over the first 2 of 3 epochs, then 1.0.
    r = RolloutConfig()
    assert sampling_temperature(r, 0.0) == pytest.approx(0.6)
    assert sampling_temperature(r, 1 / 3) == pytest.approx(0.8)
    assert sampling_temperature(r, 2 / 3) == pytest.approx(1.0)
    assert sampling_temperature(r, 0.9) == pytest.approx(1.0)


def test_cosine_and_constant_schedules():
    cosine = RolloutConfig(anneal="cosine", anneal_fraction=1.0)
    assert sampling_temperature(cosine, 0.5) == pytest.approx(0.8)
    assert sampling_temperature(cosine, 0.25) < 0.7  # slow start, unlike linear's 0.7
    constant = RolloutConfig(anneal="constant", tau_start=0.7)
    assert sampling_temperature(constant, 0.99) == 0.7


def test_total_rounds_from_epochs_or_explicit():
    cfg = Config(train=TrainConfig(epochs=3, prompts_per_round=128))
    assert total_rounds(cfg.train, 7500) == 176  # ceil(3 * 7500 / 128)
    cfg.train.rounds = 5
    assert total_rounds(cfg.train, 7500) == 5


def test_mini_batches_are_full_and_ordered():
    samples = [Sample([i], [i]) for i in range(130)]
    batches = mini_batches(samples, TrainConfig(mini_batch_size=64))
    assert [len(b) for b in batches] == [64, 64]
    assert batches[1][0].prompt_ids == [64]
