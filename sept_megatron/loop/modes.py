"""What ``train.mode`` changes in a round, beside SePT: the paper's two baselines on the same
engines, sync, checkpoints and evaluation.

- ``em`` (EM-FT): the model answers at T = tau_t (1, coupled, as the reference's
  ``em_1e7_dsr.sh``) and minimises the entropy of its next-token distribution over its own
  answer tokens (:class:`sept_megatron.trainer.losses.EntropyLoss`).
- ``grpo``: ``rollout.n`` answers per question at T = tau_t, each graded by the project's
  grader against the question's ground truth (1 right, 0 wrong), group-normalised advantages,
  and the clipped policy gradient (:class:`sept_megatron.trainer.losses.GRPOLoss`) with the old policy's
  log-probs from one forward pass before the round's first update; with a single update per
  rollout that pass is skipped (the ratio is 1). No KL term (the reference's
  ``use_kl_loss=False``).

The loop calls :func:`check_train_questions` when it loads the bank, :func:`prepare_round`
after generation and :func:`train_round` for the optimizer steps; the SFT modes pass through.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from statistics import fmean

SAMPLE_AT_TRAIN_TEMPERATURE = ("coupled", "em", "grpo")
"""Modes whose answers are drawn at tau_s = tau_t: the coupled ablation, and the baselines,
whose losses (entropy, log-prob ratio) are of the distribution the answers came from."""


def check_train_questions(mode: str, questions: Sequence, where: str) -> None:
    """GRPO's reward needs a ground truth: refuse a bank with questions that have none."""
    from sept_megatron.config import ConfigError

    if mode != "grpo":
        return
    missing = [i for i, q in enumerate(questions) if not q.ground_truth]
    if missing:
        raise ConfigError(
            f"data.train_files: {where}: train.mode=grpo rewards answers against the ground "
            f"truth, but {len(missing)} of {len(questions)} questions have none (first: row "
            f"{missing[0] + 1}); add reward_model.ground_truth (or answer) to every row, or use "
            "train.mode=online (SePT needs no ground truth)"
        )


# --- GRPO: rewards and advantages ---------------------------------------------------------
def grade_round(questions: Sequence, responses: Sequence[str], n: int) -> list[float]:
    """1.0 / 0.0 per answer (``n`` consecutive answers per question) from the project's grader.
    Rank 0 grades and broadcasts, so every rank trains on the same rewards even if a grader
    deadline (CPU time) were to expire on one rank and not on another."""
    import torch.distributed as dist

    from sept_megatron.eval.grading import is_correct

    rewards = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        rewards = [
            float(is_correct(response, questions[i // n].ground_truth))
            for i, response in enumerate(responses)
        ]
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [rewards]
        dist.broadcast_object_list(box, src=0)
        rewards = box[0]
    return rewards


def reward_stats(rewards: Sequence[float], n: int) -> dict[str, float]:
    """Mean reward, and the fraction of groups whose answers all scored the same (their
    advantages are all zero: no gradient from that question)."""
    groups = [rewards[i : i + n] for i in range(0, len(rewards), n)]
    flat = sum(len(set(g)) == 1 for g in groups) / len(groups)
    return {"rollout/reward_mean": fmean(rewards), "rollout/groups_all_equal": flat}


def prepare_round(mode: str, batch, n: int):
    """The round's batch with what its mode trains on: GRPO grades every answer and attaches
    its advantage to the sample (and its reward to the samples file); others pass through."""
    if mode != "grpo":
        return batch
    import torch

    from sept_megatron.trainer.losses import grpo_advantages

    if len(batch.samples) != len(batch.rows):
        raise RuntimeError("GRPO needs every answer of a group (train.drop_truncated=false)")
    rewards = grade_round(batch.questions, [row["response"] for row in batch.rows], n)
    advantages = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), n).tolist()
    samples = [dataclasses.replace(s, advantage=a) for s, a in zip(batch.samples, advantages)]
    rows = [{**row, "reward": r, "advantage": a} for row, r, a in zip(batch.rows, rewards, advantages)]
    return dataclasses.replace(
        batch, samples=samples, rows=rows, stats={**batch.stats, **reward_stats(rewards, n)}
    )


# --- the optimizer steps of one round --------------------------------------------------------
def train_round(
    trainer, mini_batches: list, mode: str, reference=None
) -> tuple[list[dict], dict[str, float]]:
    """One optimizer step per mini-batch; GRPO first takes every mini-batch's log-probs under
    the weights that generated the round (one forward pass), unless there is a single step,
    and, with a ``reference`` model (``train.kl_coef`` > 0), under the initial weights.
    Returns the step logs and the round means of the loss's extra reports."""
    old = [None] * len(mini_batches)
    if mode == "grpo" and len(mini_batches) > 1:
        old = [trainer.log_probs(mb) for mb in mini_batches]
    ref = [None] * len(mini_batches)
    if reference is not None:
        ref = [trainer.log_probs(mb, chunks=reference.chunks) for mb in mini_batches]
    logs = [trainer.step(mb, o, r) for mb, o, r in zip(mini_batches, old, ref)]
    extra_keys = sorted(set(logs[0]) - _STEP_KEYS)
    return logs, {key: fmean(log[key] for log in logs) for key in extra_keys}


_STEP_KEYS = {"train/loss", "train/grad_norm", "train/lr", "train/response_tokens", "train/update_skipped"}
