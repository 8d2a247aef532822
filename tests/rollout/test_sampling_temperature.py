"""The sampling temperature reaches the sampler, checked by outcome.

tau_s is SePT's main lever, and every other sampled test runs at T = 1, top_k = 1 or greedy, so
an engine that ignored the temperature would pass them all. Here the hf engine draws one token
from a fixed prompt a few thousand times (one seed per draw); the frequencies must match
softmax(logits / T) for the T asked for, and must not match the other temperature. The logits
are the model's own for that prompt, computed by a plain forward.
"""

from __future__ import annotations

import math

import pytest
import torch
from hf_tiny import make_tiny_model, make_tokenizer

from sept_megatron.rollout import SamplingParams
from sept_megatron.rollout.hf import HFRolloutEngine

DRAWS = 3000
MIN_EXPECTED = 5.0  # Pearson's chi-square needs about 5 expected draws per bin


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory):
    """A tiny Llama whose output layer is scaled up so the next-token logits span several
    units (random init gives nearly uniform logits, where T = 0.3 and T = 1 look alike)."""
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    model = make_tiny_model("llama", tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Compute 3 * 4 + 5."}], add_generation_prompt=True, return_dict=False
    )
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    return model, tokenizer, prompt, logits


def token_counts(model, tokenizer, prompt, temperature: float) -> torch.Tensor:
    engine = HFRolloutEngine(model=model, tokenizer=tokenizer, progress=False, batch_size=DRAWS)
    sampling = SamplingParams(temperature=temperature, n=DRAWS, max_new_tokens=1, seed=1234)
    (row,) = engine.generate([prompt], sampling)
    tokens = torch.tensor([generation.token_ids[0] for generation in row])
    return torch.bincount(tokens, minlength=model.config.vocab_size).double()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom; tokens expected fewer than
    MIN_EXPECTED times are pooled into one bin."""
    expected = probs * counts.sum()
    keep = expected >= MIN_EXPECTED
    observed = torch.cat([counts[keep], counts[~keep].sum().view(1)])
    expected = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    if expected[-1] < MIN_EXPECTED:  # the pooled bin too small: fold it into the largest
        observed, expected = observed[:-1].clone(), expected[:-1].clone()
        observed[expected.argmax()] += counts[~keep].sum()
        expected[expected.argmax()] += (probs[~keep] * counts.sum()).sum()
    return float(((observed - expected) ** 2 / expected).sum()), len(expected) - 1


def bound(dof: int) -> float:
    """A loose upper bound for a chi-square of ``dof`` degrees of freedom (mean dof, standard
    deviation sqrt(2 dof)): about 1e-6 to exceed for the dof here, and the draws are seeded."""
    return dof + 8 * math.sqrt(2 * dof) + 10


@pytest.mark.parametrize("temperature,other", [(0.3, 1.0), (1.0, 0.3)])
def test_token_frequencies_follow_softmax_of_logits_over_t(peaked_model, temperature, other):
    model, tokenizer, prompt, logits = peaked_model
    counts = token_counts(model, tokenizer, prompt, temperature)
    assert counts.sum() == DRAWS
    fit, dof = chi_square(counts, torch.softmax(logits / temperature, dim=-1))
    assert dof >= 2, "the logits should spread over several tokens"
    assert fit < bound(dof), (
        f"T={temperature}: chi-square {fit:.1f} with {dof} dof against "
        f"softmax(logits / {temperature}); the sampler ignores the temperature?"
    )
    wrong_fit, wrong_dof = chi_square(counts, torch.softmax(logits / other, dim=-1))
    assert wrong_fit > 10 * bound(wrong_dof), (
        f"T={temperature}: the draws fit T={other} too (chi-square {wrong_fit:.1f}); "
        "the test cannot tell temperatures apart"
    )
