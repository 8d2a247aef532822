"""In-training validation: every ``eval.every_n_rounds`` rounds, every engine answers its share
of the validation questions; rank 0 grades, and every rank gets the figures."""

from __future__ import annotations

import torch.distributed as dist

from sept_megatron.config import Config
from sept_megatron.data import Question, load_questions
from sept_megatron.loop.fleet import EngineFleet


def due(cfg: Config, round_index: int) -> bool:
    every = cfg.eval.every_n_rounds
    return bool(every and cfg.eval.benchmarks and (round_index + 1) % every == 0)


def validate_round(
    cfg: Config, fleet: EngineFleet, tokenizer, round_index: int, force: bool = False
) -> dict[str, float]:
    """The validation figures after round ``round_index`` (empty when not due; ``force``:
    whenever there are benchmarks, e.g. before training)."""
    if not (due(cfg, round_index) or (force and cfg.eval.benchmarks)):
        return {}
    from sept_megatron.eval.sweep import evaluate_once

    benchmarks: dict[str, list[Question]] = {}
    for path in cfg.eval.benchmarks:
        for q in load_questions(path):
            benchmarks.setdefault(q.source, []).append(q)
    with fleet.suspended():
        metrics = evaluate_once(
            fleet.engines,
            tokenizer,
            benchmarks,
            temperature=cfg.eval.temperature,
            n=cfg.eval.n,
            max_questions=cfg.eval.max_questions,
            template=cfg.data.chat_template,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.data.max_response_length,
            seed=cfg.train.seed,
        )
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics
