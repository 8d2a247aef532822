"""One round's data: the current model's answers to a batch of questions, cut into
mini-batches, and the round's metrics."""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass

from sept_megatron.config import Config
from sept_megatron.data import Question
from sept_megatron.loop import modes
from sept_megatron.loop.fleet import EngineFleet
from sept_megatron.loop.telemetry import token_stats
from sept_megatron.rollout.base import Generation, SamplingParams
from sept_megatron.trainer.sft import NonFiniteTraining, Sample


@dataclass
class RoundBatch:
    """What one round trains on, identical on every rank after the exchange."""

    questions: list[Question]
    samples: list[Sample]
    rows: list[dict]  # for the samples JSONL
    stats: dict[str, float]


def rollout_sampling(cfg: Config, tau_s: float, seed: int) -> SamplingParams:
    return SamplingParams(
        temperature=tau_s,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        n=cfg.rollout.n,
        max_new_tokens=cfg.data.max_response_length,
        seed=seed,
    )


def generate_round(
    cfg: Config,
    fleet: EngineFleet,
    questions: list[Question],
    prompt_ids: dict[int, list[int]],
    tau_s: float,
    seed: int,
    answered: dict[int, list[Generation]] | None = None,
) -> RoundBatch:
    """Every engine answers its share (or, offline, the answers given once are looked up);
    every rank ends with the same batch, in question order."""
    start = time.perf_counter()
    if answered is not None:
        generations = [answered[q.index] for q in questions]
    else:
        generations = fleet.generate(
            [prompt_ids[q.index] for q in questions], rollout_sampling(cfg, tau_s, seed)
        )
    batch = round_payload(cfg, questions, prompt_ids, generations, tau_s, time.perf_counter() - start)
    return modes.prepare_round(cfg.train.mode, batch, cfg.rollout.n)  # GRPO: graded rewards


def answer_once(
    cfg: Config, fleet: EngineFleet, bank: list[Question], prompt_ids: dict[int, list[int]], tau_s: float
) -> dict[int, list[Generation]]:
    """Offline mode: the base model answers the whole bank once, spread over every engine.
    Every rank keeps all answers, token ids packed as int32 (a Python list costs ~9x more)."""
    generations = fleet.generate(
        [prompt_ids[q.index] for q in bank], rollout_sampling(cfg, tau_s, cfg.train.seed)
    )
    for row in generations:
        for generation in row:
            generation.token_ids = array("i", generation.token_ids)
    return {q.index: g for q, g in zip(bank, generations)}


def round_payload(cfg: Config, questions, prompt_ids, generations, tau_s, seconds) -> RoundBatch:
    samples, rows, lengths, truncated = [], [], [], 0
    for q, gens in zip(questions, generations):
        for g in gens:
            is_truncated = g.finish_reason != "stop"
            truncated += is_truncated
            lengths.append(len(g.token_ids))
            rows.append(
                {
                    "index": q.index,
                    "prompt": q.question_text,
                    "response": g.text,
                    "tau_s": tau_s,
                    "prompt_tokens": len(prompt_ids[q.index]),
                    "response_tokens": len(g.token_ids),
                    "finish_reason": g.finish_reason,
                }
            )
            if is_truncated and cfg.train.drop_truncated:
                continue
            samples.append(Sample(prompt_ids[q.index], list(g.token_ids)))
    if len(samples) < cfg.train.mini_batch_size:
        raise RuntimeError(
            f"only {len(samples)} answers left after dropping truncated ones; "
            "set train.drop_truncated=false or raise data.max_response_length"
        )
    stats = {
        "rollout/response_length_mean": sum(lengths) / len(lengths),
        "rollout/response_length_max": float(max(lengths)),
        "rollout/truncation_rate": truncated / len(lengths),
        "perf/gen_tokens_per_s": sum(lengths) / max(seconds, 1e-9),
        **token_stats(generations),
    }  # log-prob and entropy of the answers, when reported
    return RoundBatch(questions, samples, rows, stats)


def mini_batches(samples: list[Sample], train_cfg) -> list[list[Sample]]:
    """Consecutive mini-batches of ``mini_batch_size``; a short tail (dropped answers) is cut."""
    size = train_cfg.mini_batch_size
    return [samples[i : i + size] for i in range(0, len(samples) - size + 1, size)]


def fit(trainer, batch: RoundBatch, train_cfg, round_number: int, reference=None) -> list[dict]:
    """One optimizer step per mini-batch on the round's answers (plain SFT; EM-FT's and GRPO's
    own losses in those modes, :mod:`~sept_megatron.loop.modes`); with
    ``train.measure_round_fit``, the loss on the round's own samples before and after."""
    before = trainer.evaluate_loss(batch.samples) if train_cfg.measure_round_fit else None
    try:
        step_logs, mode_stats = modes.train_round(
            trainer, mini_batches(batch.samples, train_cfg), train_cfg.mode, reference
        )
    except NonFiniteTraining as exc:
        raise NonFiniteTraining(f"round {round_number}, {exc}") from None
    batch.stats |= mode_stats
    trainer.end_round()  # an LR schedule counted in rounds (the reference's) steps here
    if before is not None:
        batch.stats |= {
            "train/round_fit_before": before,
            "train/round_fit_after": trainer.evaluate_loss(batch.samples),
        }
    return step_logs


def round_metrics(step_logs, batch: RoundBatch, timings, tau_s, round_index, rounds) -> dict:
    tokens = sum(s["train/response_tokens"] for s in step_logs)
    metrics = {
        "train/loss": sum(s["train/loss"] for s in step_logs) / len(step_logs),
        "train/loss_first_step": step_logs[0]["train/loss"],
        "train/loss_last_step": step_logs[-1]["train/loss"],
        "train/grad_norm": sum(s["train/grad_norm"] for s in step_logs) / len(step_logs),
        "train/lr": step_logs[-1]["train/lr"],
        "train/optimizer_steps": len(step_logs),
        "train/update_skipped": sum(s["train/update_skipped"] for s in step_logs),
        "rollout/tau_s": tau_s,
        "perf/train_tokens_per_s": tokens / max(timings["train"], 1e-9),
        "progress/round": round_index + 1,
        "progress/rounds": rounds,
    }
    metrics |= batch.stats
    metrics |= {f"timing/{k}": v for k, v in timings.items()}
    return metrics


class Timer:
    """``with timer("train"): ...`` records the block's wall time under its name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> _Span:
        return _Span(self.seconds, name)


class _Span:
    def __init__(self, sink: dict, name: str):
        self.sink, self.name = sink, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.sink[self.name] = time.perf_counter() - self.start
