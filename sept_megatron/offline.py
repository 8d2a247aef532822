"""The offline ablation's settings (``train.mode=offline``), as the reference runs it.

The reference's offline row (the paper's "SePT (offline)") is two scripts: the base model
answers the training set once at tau 0.6 (``generate_solutions.sh``), then verl's SFT trainer
fits those answers with its own optimizer settings (lr 1e-5, AdamW betas (0.9, 0.95), cosine
decay after a 1% warmup, one step per 128 sequences, 3 epochs). The loop already generates
once and then only trains; this module turns the ``offline:`` section into the ``train:``
values that loop runs with, so the offline path is the same code with other numbers.
"""

from __future__ import annotations

import dataclasses

from sept_megatron.config import Config


def offline_settings(cfg: Config) -> Config:
    """``cfg`` as the run trains it: unchanged, except for ``train.mode=offline`` with
    ``offline.hyperparameters=sft``, where the offline section's SFT settings replace the
    train section's (one optimizer step per round of ``offline.sequences_per_step`` answers)."""
    if cfg.train.mode != "offline" or cfg.offline.hyperparameters != "sft":
        return cfg
    o = cfg.offline
    train = dataclasses.replace(
        cfg.train, lr=o.lr, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
        weight_decay=o.weight_decay, lr_decay_style=o.lr_decay_style, warmup_ratio=o.warmup_ratio,
        epochs=o.epochs, prompts_per_round=max(1, o.sequences_per_step // cfg.rollout.n),
        mini_batch_size=o.sequences_per_step, lr_schedule_interval="optimizer_step",
        # verl's SFT trainer: each micro-batch's token mean, averaged over micro-batches and ranks.
        loss_aggregation="microbatch_mean")
    return dataclasses.replace(cfg, train=train)


def offline_temperature(cfg: Config) -> float:
    """The temperature of the one-off answers: ``offline.temperature``, else ``rollout.tau_start``."""
    return cfg.offline.temperature if cfg.offline.temperature is not None else cfg.rollout.tau_start
