"""The hf engine's per-token log-probabilities and entropies against a plain forward pass."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import make_tiny_model, make_tokenizer

from sept_megatron.loop.telemetry import token_stats
from sept_megatron.rollout import SamplingParams
from sept_megatron.rollout.hf import HFRolloutEngine

QUESTIONS = ["Compute 3 * 4 + 5.", "Compute (12 + 7) * 3 - 45.", "Hi"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    model = make_tiny_model("qwen2", tokenizer)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
        )
        for q in QUESTIONS
    ]
    return model, tokenizer, prompts


def reference(model, prompt: list[int], response: list[int]) -> tuple[list[float], list[float]]:
    """log p(token) and the entropy at each response position, from one unpadded forward."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(response)])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + len(response) - 1], dim=-1)
    chosen = logp.gather(1, torch.tensor(response)[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1)
    return chosen.tolist(), entropy.tolist()


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=0.0, max_new_tokens=12),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, n=2, max_new_tokens=12, seed=3),
    ],
    ids=["greedy", "sampled"],
)
def test_logprobs_and_entropies_match_a_plain_forward(setup, sampling):
    model, tokenizer, prompts = setup
    engine = HFRolloutEngine(model=model, tokenizer=tokenizer, progress=False, batch_size=4)
    rows = engine.generate(prompts, sampling)
    for prompt, row in zip(prompts, rows):
        for generation in row:
            assert len(generation.logprobs) == len(generation.entropies) == len(generation.token_ids)
            logprobs, entropies = reference(model, prompt, generation.token_ids)
            # T = 1 log-probabilities even when sampling at 0.7 with top-k / top-p cuts.
            assert list(generation.logprobs) == pytest.approx(logprobs, abs=2e-4)
            assert list(generation.entropies) == pytest.approx(entropies, abs=2e-4)
    stats = token_stats(rows)
    tokens = sum(len(g.token_ids) for row in rows for g in row)
    assert stats["rollout/logprob_mean"] == pytest.approx(
        sum(sum(g.logprobs) for row in rows for g in row) / tokens
    )
    assert 0 < stats["rollout/entropy_mean"] <= torch.log(torch.tensor(len(tokenizer))).item()


def test_token_stats_are_absent_when_an_engine_reports_none(setup):
    from sept_megatron.rollout.base import Generation

    assert token_stats([[Generation(token_ids=[1], text="a", finish_reason="stop")]]) == {}
