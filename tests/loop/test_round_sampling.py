"""Each round's rollout is sampled at that round's tau_s, down to the SGLang request.

The loop's round (``generate_round``) hands an engine its sampling parameters; here the engine
is SGLang's request mapping (``request_sampling_params``, what ``SGLangRolloutEngine`` sends),
so the check covers schedule -> round -> request. tau_s is computed by hand from the paper's
schedule (0.6 -> 1.0, linear over the first 2/3 of the rounds, then 1.0), not by the loop's own
function.
"""

from __future__ import annotations

import pytest

from sept_megatron.config import load_config
from sept_megatron.data import Question
from sept_megatron.loop.round import generate_round
from sept_megatron.loop.schedule import Schedule, round_seed
from sept_megatron.rollout.base import Generation
from sept_megatron.rollout.sglang_requests import request_sampling_params

ROUNDS = 6
PROMPTS = 4


class SGLangRequests:
    """Stands where the loop's ``DataParallelEngines`` is: maps each call to the SGLang requests
    our SGLang backend would send, records them, answers with a one-token EOS."""

    def __init__(self) -> None:
        self.requests: list[list[dict]] = []

    def generate(self, prompts, sampling):
        _, params = request_sampling_params(sampling, stop_ids=[2], num_prompts=len(prompts))
        self.requests.append(params)
        return [[Generation(token_ids=[2], text="", finish_reason="stop")] * sampling.n for _ in prompts]


def paper_tau(round_index: int, rounds: int) -> float:
    progress = min(1.0, (round_index / rounds) / (2 / 3))
    return 0.6 + (1.0 - 0.6) * progress


@pytest.mark.parametrize("mode", ["online", "coupled"])
def test_every_round_requests_its_own_tau_s(mode):
    cfg = load_config(
        None,
        [
            f"train.mode={mode}",
            f"train.prompts_per_round={PROMPTS}",
            "train.mini_batch_size=2",
            "train.micro_batch_size=1",
            "rollout.n=2",
            "train.tau_train=1.0",
            f"train.rounds={ROUNDS}",
        ],
    )
    questions = [
        Question([{"role": "user", "content": f"q{i}"}], f"q{i}", "1", "t", i) for i in range(PROMPTS)
    ]
    prompt_ids = {q.index: [5, 6, 7 + q.index] for q in questions}
    engines = SGLangRequests()
    logged = []
    for round_index in range(ROUNDS):
        tau_s = Schedule(cfg.train, cfg.rollout, ROUNDS).tau_sample(round_index)
        batch = generate_round(
            cfg, engines, questions, prompt_ids, tau_s, round_seed(cfg.train.seed, round_index)
        )
        logged.append({row["tau_s"] for row in batch.rows})
    expected = [paper_tau(r, ROUNDS) if mode == "online" else 1.0 for r in range(ROUNDS)]
    assert len(set(expected)) > 1 or mode == "coupled"
    for round_index, (requests, tau) in enumerate(zip(engines.requests, expected)):
        assert len(requests) == PROMPTS * cfg.rollout.n
        temperatures = sorted({request["temperature"] for request in requests})
        assert temperatures == [pytest.approx(tau)], (round_index, temperatures, tau)
        assert sorted(logged[round_index]) == [pytest.approx(tau)]  # the samples file agrees
    # Each round draws fresh samples: its requests carry seeds no other round used.
    seeds = [{request["sampling_seed"] for request in requests} for requests in engines.requests]
    assert all(not (a & b) for i, a in enumerate(seeds) for b in seeds[i + 1 :])
