"""The transformers rollout engine against tiny random-init Llama/Qwen2 models."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from hf_tiny import make_tiny_model, make_tokenizer

from sept_megatron.rollout import SamplingParams, build_engine, hf
from sept_megatron.rollout.hf import HFRolloutEngine

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)
QUESTIONS = ["Compute 3 * 4 + 5.", "Compute (12 + 7) * 3 - 45.", "Hi", "Compute (2 + 11) * (6 - 4)."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """Chat-formatted prompts of different lengths, so batches need padding."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False
        )
        for question in QUESTIONS
    ]


def engine_for(model, tokenizer, **kwargs) -> HFRolloutEngine:
    return HFRolloutEngine(model=model, tokenizer=tokenizer, progress=False, **kwargs)


def argmax_loop(model, prompt: list[int], steps: int) -> list[int]:
    """Reference greedy decoding: full forward each step, no cache, no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_matches_argmax_loop_and_is_padding_invariant(family, tokenizer, prompts):
    model = make_tiny_model(family, tokenizer)
    engine = engine_for(model, tokenizer, batch_size=3)  # 4 prompts: a full and a partial chunk
    batched = engine.generate(prompts, GREEDY)
    assert batched == engine.generate(prompts, GREEDY)
    for prompt, (generation,) in zip(prompts, batched):
        expected = argmax_loop(model, prompt, GREEDY.max_new_tokens)
        assert generation.token_ids == expected[: len(generation.token_ids)]
        assert generation.token_ids == engine.generate([prompt], GREEDY)[0][0].token_ids


def test_sampling_with_seed_is_reproducible_and_n_per_prompt(tokenizer, prompts):
    engine = engine_for(make_tiny_model("llama", tokenizer), tokenizer, batch_size=5)
    sampling = SamplingParams(temperature=1.0, top_p=0.95, top_k=-1, max_new_tokens=8, n=3, seed=7)
    torch.manual_seed(123)
    first = engine.generate(prompts, sampling)
    caller_draw = torch.rand(1)
    torch.manual_seed(123)
    second = engine.generate(prompts, sampling)
    assert first == second
    assert torch.equal(caller_draw, torch.rand(1)), "a seeded call must not disturb the caller's RNG"
    assert [len(row) for row in first] == [3] * len(prompts)
    assert len({tuple(g.token_ids) for row in first for g in row}) > 1  # really sampled
    other_seed = engine.generate(prompts, SamplingParams(**{**sampling.__dict__, "seed": 8}))
    assert other_seed != first


def test_greedy_n_copies_and_length_limit(tokenizer, prompts):
    engine = engine_for(make_tiny_model("qwen2", tokenizer), tokenizer)
    result = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6, n=2))
    for row in result:
        assert len(row) == 2 and row[0] == row[1] and row[0] is not row[1]
        for generation in row:
            if generation.finish_reason == "length":
                assert len(generation.token_ids) == 6
            assert len(generation.token_ids) <= 6
            assert generation.text == tokenizer.decode(generation.token_ids, skip_special_tokens=True)


def test_cut_after_first_eos(tokenizer, prompts):
    """Declare a token the greedy output produces mid-way as an extra EOS (as a checkpoint's
    generation_config may); the response must end right after its first occurrence."""
    model = make_tiny_model("llama", tokenizer)
    free_run = engine_for(model, tokenizer).generate(prompts, GREEDY)
    assert all(row[0].finish_reason == "length" for row in free_run)
    stop_token = free_run[1][0].token_ids[3]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop_token]
    engine = engine_for(model, tokenizer)
    assert stop_token in engine.eos_token_ids
    for before, (after,) in zip(free_run, engine.generate(prompts, GREEDY)):
        tokens = before[0].token_ids
        if stop_token in tokens:
            assert after.token_ids == tokens[: tokens.index(stop_token) + 1]
            assert after.finish_reason == "stop"
        else:
            assert after.token_ids == tokens and after.finish_reason == "length"
    assert engine.generate(prompts, GREEDY)[1][0].token_ids[-1] == stop_token


def test_update_weights_copies_another_model(tokenizer, prompts):
    source = make_tiny_model("qwen2", tokenizer, seed=1)
    engine = engine_for(make_tiny_model("qwen2", tokenizer, seed=0), tokenizer)
    assert engine.generate(prompts, GREEDY) != engine_for(source, tokenizer).generate(prompts, GREEDY)
    state = list(source.state_dict().items())
    loaded = engine.update_weights([state[:5], state[5:]], strict=True)
    assert loaded == len(state) == engine.loaded_tensor_count
    batch = torch.tensor([prompts[1]])
    with torch.no_grad():
        assert torch.equal(engine.model(batch).logits, source(batch).logits)
    assert engine.generate(prompts, GREEDY) == engine_for(source, tokenizer).generate(prompts, GREEDY)


@pytest.mark.parametrize("tied_name", ["lm_head.weight", "model.embed_tokens.weight"])
def test_update_weights_tied_embeddings_accept_either_name(tied_name, tokenizer):
    source = make_tiny_model("qwen2", tokenizer, seed=1, tie_word_embeddings=True)
    engine = engine_for(make_tiny_model("qwen2", tokenizer, tie_word_embeddings=True), tokenizer)
    other = ({"lm_head.weight", "model.embed_tokens.weight"} - {tied_name}).pop()
    state = [(name, tensor) for name, tensor in source.state_dict().items() if name != other]
    engine.update_weights([state], strict=True)
    assert torch.equal(engine.model.lm_head.weight, source.lm_head.weight)
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight


def test_update_weights_casts_to_engine_dtype(tokenizer):
    source = make_tiny_model("llama", tokenizer, seed=1)
    engine = engine_for(make_tiny_model("llama", tokenizer), tokenizer, dtype=torch.bfloat16)
    engine.update_weights([list(source.state_dict().items())])
    weight = engine.model.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, source.model.layers[0].mlp.up_proj.weight.to(torch.bfloat16))


def test_update_weights_errors_name_the_tensor(tokenizer):
    engine = engine_for(make_tiny_model("llama", tokenizer), tokenizer)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.nonsense\.weight"):
        engine.update_weights([[("model.layers.0.mlp.nonsense.weight", torch.zeros(2))]])
    with pytest.raises(ValueError, match=r"shape mismatch for 'model\.norm\.weight'"):
        engine.update_weights([[("model.norm.weight", torch.zeros(3))]])
    with pytest.raises(ValueError, match=r"parameters not sent"):
        engine.update_weights([[("model.norm.weight", torch.ones(64))]], strict=True)


def flat_views(named: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, list]:
    """One flat buffer holding ``named`` tensors' values, and a view of it per name."""
    flat = torch.cat([tensor.reshape(-1) for _, tensor in named])
    views, start = [], 0
    for name, tensor in named:
        views.append((name, flat[start : start + tensor.numel()].view(tensor.shape)))
        start += tensor.numel()
    return flat, views


def test_bound_weights_follow_their_buffer_until_unbound(tokenizer, prompts):
    """The direct sync's engine side: after bind_weights the parameters are the caller's views
    (a write into the buffer is the engine's new weights, no copy); unbind_weights keeps the
    values in private memory."""
    source = make_tiny_model("qwen2", tokenizer, seed=1, tie_word_embeddings=True)
    engine = engine_for(make_tiny_model("qwen2", tokenizer, seed=0, tie_word_embeddings=True), tokenizer)
    named = [(n, t) for n, t in source.state_dict().items() if n != "lm_head.weight"]
    flat, views = flat_views([(n, torch.zeros_like(t)) for n, t in named])
    assert engine.can_bind_weights(torch.float32) and not engine.can_bind_weights(torch.bfloat16)
    assert engine.bind_weights(views) == len(named)
    embed = engine.model.model.embed_tokens.weight
    assert embed.data_ptr() == views[0][1].data_ptr() and engine.model.lm_head.weight is embed
    flat.copy_(torch.cat([t.reshape(-1) for _, t in named]))  # the "sync": writes into the buffer
    assert engine.generate(prompts, GREEDY) == engine_for(source, tokenizer).generate(prompts, GREEDY)
    engine.unbind_weights()
    flat.zero_()
    assert torch.equal(engine.model.model.norm.weight, source.model.norm.weight)
    assert engine.generate(prompts, GREEDY) == engine_for(source, tokenizer).generate(prompts, GREEDY)


def test_bind_weights_checks_everything_before_binding(tokenizer):
    engine = engine_for(make_tiny_model("llama", tokenizer), tokenizer)
    norm = engine.model.model.norm.weight
    before = norm.data_ptr()
    with pytest.raises(ValueError, match=r"bind_weights: unknown tensor 'nonsense\.weight'"):
        engine.bind_weights([("model.norm.weight", torch.ones(64)), ("nonsense.weight", torch.ones(2))])
    with pytest.raises(
        ValueError,
        match=r"'model\.norm\.weight' must be a parameter of dtype "
        r"torch\.float32",
    ):
        engine.bind_weights([("model.norm.weight", torch.ones(64, dtype=torch.bfloat16))])
    assert norm.data_ptr() == before  # nothing was bound


def test_build_engine_hf_from_local_dir(tokenizer, prompts, tmp_path):
    model = make_tiny_model("llama", tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = build_engine("hf", str(tmp_path), progress=False)
    assert isinstance(engine, HFRolloutEngine)
    assert engine.generate(prompts, GREEDY) == engine_for(model, tokenizer).generate(prompts, GREEDY)
    engine.release_memory()  # CPU: no-ops
    engine.resume_memory()
    with pytest.raises(ValueError, match="local HF model directory"):
        build_engine("hf", str(tmp_path / "missing"))


def test_build_engine_sglang_without_sglang_says_what_to_do(monkeypatch):
    real_find_spec = importlib.util.find_spec  # CI installs sglang's CPU parts: hide them here
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "sglang" else real_find_spec(name, *args),
    )
    with pytest.raises(ImportError, match=r"sept_megatron\[gpu\].*rollout\.backend=hf"):
        build_engine("sglang", "/nonexistent")


def test_build_engine_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match=r"'vllm'.*\['hf', 'sglang'\]"):
        build_engine("vllm")


# --- per-sequence seeds: what engine data parallelism relies on ------------------------------
def test_a_sample_depends_on_its_seed_key_not_on_the_call(tokenizer, prompts):
    """Split one call in two at a batch boundary (batch = the n copies of one prompt), each
    half passing its prompts' positions as seed keys: the same samples, bitwise."""
    engine = engine_for(make_tiny_model("qwen2", tokenizer), tokenizer, batch_size=2)
    ordered = sorted(prompts, key=len, reverse=True)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=11)
    whole = engine.generate(ordered, sampling)
    first = engine.generate(ordered[:2], SamplingParams(**{**sampling.__dict__, "seed_keys": (0, 1)}))
    second = engine.generate(ordered[2:], SamplingParams(**{**sampling.__dict__, "seed_keys": (2, 3)}))
    assert first + second == whole
    assert whole[0][0] != whole[0][1]  # the copies of a prompt draw from different streams
    unkeyed = engine.generate(ordered[2:], sampling)  # keys 0, 1: other streams
    assert unkeyed != second


def test_top_k_one_samples_the_greedy_answer(tokenizer, prompts):
    engine = engine_for(make_tiny_model("llama", tokenizer), tokenizer)
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8))
    top1 = engine.generate(prompts, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=8, seed=3))
    assert [row[0].token_ids for row in top1] == [row[0].token_ids for row in greedy]


def test_sequence_seeds_are_unrelated_for_nearby_inputs():
    from sept_megatron.rollout.base import sequence_seed, sequence_seeds

    seeds = {sequence_seed(seed, key, copy) for seed in range(3) for key in range(3) for copy in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2**63 for s in seeds)
    sampling = SamplingParams(n=2, seed=5, seed_keys=(7, 3))
    assert sequence_seeds(sampling, 2) == [
        [sequence_seed(5, 7, 0), sequence_seed(5, 7, 1)],
        [sequence_seed(5, 3, 0), sequence_seed(5, 3, 1)],
    ]
    assert sequence_seeds(SamplingParams(), 2) is None
    with pytest.raises(ValueError, match="2 keys for 3 prompts"):
        sequence_seeds(sampling, 3)


def test_hf_engine_refuses_a_multi_rank_group(tokenizer):
    from sept_megatron.rollout.placement import EngineGroup

    with pytest.raises(ValueError, match="rollout.engine_tp=1"):
        engine_for(make_tiny_model("llama", tokenizer), tokenizer, group=EngineGroup(0, (0, 1)))


class PerStepDrawSampler(hf._SeededSampler):
    """The sampler as it was before the draws were taken up front: one ``torch.rand`` per row
    and step, copied to the scores' device every step (the reference for the same tokens)."""

    def __init__(self, seeds, sampling, prompt_width, device):
        super().__init__(seeds, sampling, prompt_width, device)
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids, scores):
        probs = self.warpers(input_ids, scores).softmax(dim=-1, dtype=torch.float64)
        cdf = probs.cumsum(dim=-1)
        draws = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        totals = cdf[:, -1:].contiguous()
        tokens = torch.searchsorted(cdf, draws.to(cdf.device)[:, None] * totals, right=True)
        tokens = torch.minimum(tokens, torch.searchsorted(cdf, totals, right=False))
        return torch.full_like(scores, -math.inf).scatter_(1, tokens, 0.0)


@pytest.mark.parametrize("top_k, top_p", [(-1, 1.0), (5, 0.9)])
def test_up_front_draws_sample_the_tokens_of_per_step_draws(top_k, top_p, tokenizer, prompts, monkeypatch):
    engine = engine_for(make_tiny_model("qwen2", tokenizer), tokenizer, batch_size=3)
    sampling = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, max_new_tokens=12, n=2, seed=11)
    up_front = engine.generate(prompts, sampling)
    monkeypatch.setattr(hf, "_SeededSampler", PerStepDrawSampler)
    assert engine.generate(prompts, sampling) == up_front
    assert len({tuple(g.token_ids) for row in up_front for g in row}) > 1  # really sampled


def tokens_of(generations):
    """What "the same tokens" means: ids, text and finish reason (the per-token log-probs
    and entropies come from other kernels and may differ in the last bits)."""
    return [[(g.token_ids, g.text, g.finish_reason) for g in row] for row in generations]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_static_cache_gives_the_tokens_of_the_dynamic_cache(family, tokenizer, prompts):
    model = make_tiny_model(family, tokenizer)
    dynamic = engine_for(model, tokenizer, batch_size=3)
    static = engine_for(model, tokenizer, batch_size=3, static_cache=True)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=20)
    assert tokens_of(static.generate(prompts, greedy)) == tokens_of(dynamic.generate(prompts, greedy))
    sampled = SamplingParams(temperature=0.9, max_new_tokens=12, n=2, seed=5)
    assert tokens_of(static.generate(prompts, sampled)) == tokens_of(dynamic.generate(prompts, sampled))
    config = static._call_config(greedy, prompt_width=300)
    assert config.cache_implementation == "static" and config.max_cache_len == 512


def test_backend_kwargs_pass_the_static_cache_option():
    from sept_megatron.config import load_config
    from sept_megatron.rollout import backend_kwargs

    rollout = load_config(None, ["rollout.hf_static_cache=true"]).rollout
    kwargs = backend_kwargs(
        rollout, tokenizer=None, seed=0, device="cpu", dtype=torch.float32, progress=False
    )
    assert kwargs["static_cache"] is True
