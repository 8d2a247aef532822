"""The schedule of a run: how many rounds, tau_s each round, and what the mode changes.

Modes (``train.mode``), all decided here so the loop has no mode branches of its own:

- ``online`` (SePT): every round the current model answers at tau_s, and the engine is
  refreshed with the updated weights (paper: tau_s 0.6 -> 1.0 over the first 2 of 3 epochs);
- ``offline``: the base model answers the whole bank once (at ``offline.temperature``, else
  tau_start); rounds only train, and the engine keeps the base weights (no refresh, so it is
  never released: an engine that frees its weights without a CPU copy, SGLang's, would have
  nothing left to evaluate with). As the reference runs it, the answers are then fitted with
  the ``offline:`` section's own SFT settings (:func:`offline_settings`): the reference's
  offline row is two scripts, the base model answering the training set once at tau 0.6
  (``generate_solutions.sh``), then verl's SFT trainer (lr 1e-5, AdamW betas (0.9, 0.95),
  cosine decay after a 1% warmup, one step per 128 sequences, 3 epochs);
- ``coupled``: tau_s = tau_t every round, the paper's zero-expected-gradient control;
- ``em`` and ``grpo``: the paper's baselines (EM-FT, GRPO), sampled at tau_t and trained with
  their own losses and rewards (:mod:`~sept_megatron.loop.modes`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from sept_megatron.config import Config, RolloutConfig, TrainConfig
from sept_megatron.loop.modes import SAMPLE_AT_TRAIN_TEMPERATURE

MODES = ("online", "offline", "coupled", "em", "grpo")


def sampling_temperature(rollout: RolloutConfig, progress: float) -> float:
    """tau_s at a fraction ``progress`` of training: from tau_start to tau_end over the first
    ``anneal_fraction`` of rounds, tau_end afterwards (paper: 0.6 -> 1.0 over 2 of 3 epochs)."""
    if rollout.anneal == "constant":
        return rollout.tau_start
    x = min(1.0, max(0.0, progress / rollout.anneal_fraction))
    if rollout.anneal == "cosine":
        x = (1 - math.cos(math.pi * x)) / 2
    return rollout.tau_start + (rollout.tau_end - rollout.tau_start) * x


def total_rounds(train: TrainConfig, bank_size: int) -> int:
    """``train.rounds``, or enough rounds for ``train.epochs`` passes over the bank."""
    if train.rounds is not None:
        return train.rounds
    return max(1, math.ceil(train.epochs * bank_size / train.prompts_per_round))


def round_seed(seed: int, round_index: int) -> int:
    """The sampling seed of one round: rounds never share sampling streams."""
    return seed * 100_003 + round_index


@dataclass(frozen=True)
class Schedule:
    """The mode and the per-round quantities of one run."""

    train: TrainConfig
    rollout: RolloutConfig
    rounds: int

    @property
    def answers_once(self) -> bool:
        """Offline: the bank is answered once by the base model, before the first round."""
        return self.train.mode == "offline"

    @property
    def refreshes_engine(self) -> bool:
        """Whether the engine takes the trainer's weights after every round (online refresh)."""
        return self.train.mode != "offline"

    @property
    def steps_per_round(self) -> int:
        return self.train.prompts_per_round * self.rollout.n // self.train.mini_batch_size

    def tau_sample(self, round_index: int) -> float:
        """tau_s of round ``round_index`` (coupled, em, grpo: tau_t)."""
        if self.train.mode in SAMPLE_AT_TRAIN_TEMPERATURE:
            return self.train.tau_train
        return sampling_temperature(self.rollout, round_index / self.rounds)


def offline_settings(cfg: Config) -> Config:
    """``cfg`` as the run trains it: unchanged, except for ``train.mode=offline`` with
    ``offline.hyperparameters=sft``, where the offline section's SFT settings replace the
    train section's (one optimizer step per round of ``offline.sequences_per_step`` answers)."""
    if cfg.train.mode != "offline" or cfg.offline.hyperparameters != "sft":
        return cfg
    o = cfg.offline
    train = dataclasses.replace(
        cfg.train,
        lr=o.lr,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        weight_decay=o.weight_decay,
        lr_decay_style=o.lr_decay_style,
        warmup_ratio=o.warmup_ratio,
        epochs=o.epochs,
        prompts_per_round=max(1, o.sequences_per_step // cfg.rollout.n),
        mini_batch_size=o.sequences_per_step,
        lr_schedule_interval="optimizer_step",
        # verl's SFT trainer: each micro-batch's token mean, averaged over micro-batches and ranks.
        loss_aggregation="microbatch_mean",
    )
    return dataclasses.replace(cfg, train=train)


def offline_temperature(cfg: Config) -> float:
    """The temperature of the one-off answers: ``offline.temperature``, else ``rollout.tau_start``."""
    return cfg.offline.temperature if cfg.offline.temperature is not None else cfg.rollout.tau_start
