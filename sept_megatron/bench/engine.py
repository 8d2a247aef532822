"""``engine``: HFRolloutEngine.generate vs calling ``model.generate`` directly, and the
engine with a static KV cache (``rollout.hf_static_cache``: CUDA graphs on a GPU) beside both."""

from __future__ import annotations

import dataclasses
import time

import torch

from sept_megatron.bench.common import Inputs, best, log_progress, side_by_side
from sept_megatron.bench.options import BenchOptions


def _prompts(inputs: Inputs, tokenizer, count: int) -> list[list[int]]:
    """Chat-rendered task questions, longest first (the engine's own order, so both sides
    see identical batches)."""
    from sept_megatron.data import load_questions, render_prompts

    questions = load_questions(inputs.train_jsonl)[:count]
    return sorted(render_prompts(questions, tokenizer, "auto"), key=len, reverse=True)


def _direct_generate(
    model, tokenizer, prompts: list[list[int]], sampling, eos_ids, pad_id, batch_size: int, device
) -> list[list[int]]:
    """``model.generate`` called as a transformers user would: left padding, same settings."""
    from transformers import GenerationConfig

    sample = (
        dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if sampling.temperature > 0
        else dict(do_sample=False)
    )
    config = GenerationConfig(
        **sample,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
        num_beams=1,
        use_cache=True,
    )
    torch.manual_seed(sampling.seed)
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        rows += out[:, width:].tolist()
    return rows


def _cut_at_eos(row: list[int], eos_ids) -> list[int]:
    stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
    return row if stop is None else row[: stop + 1]


def bench_engine(opts: BenchOptions, inputs: Inputs) -> dict:
    from sept_megatron.rollout import SamplingParams
    from sept_megatron.rollout.hf import HFRolloutEngine
    from sept_megatron.runtime import compat

    device = torch.device(opts.device)
    dtype = torch.bfloat16 if opts.device == "cuda" else torch.float32
    with compat.suspended():
        engine = HFRolloutEngine(
            inputs.hf_dir, device=device, dtype=dtype, batch_size=opts.gen_batch, progress=False
        )
        static_engine = HFRolloutEngine(
            model=engine.model,
            tokenizer=engine.tokenizer,
            device=device,
            dtype=dtype,
            batch_size=opts.gen_batch,
            progress=False,
            static_cache=True,
        )
        prompts = _prompts(inputs, engine.tokenizer, opts.gen_batch)
        sampling = SamplingParams(
            temperature=0.6, top_p=1.0, top_k=-1, n=1, seed=1234, max_new_tokens=opts.gen_new_tokens
        )
        outputs, inside_generate = {}, []
        model_generate = engine.model.generate

        def timed_generate(*args, **kwargs):  # the transformers call inside our engine
            start = time.perf_counter()
            try:
                return model_generate(*args, **kwargs)
            finally:
                inside_generate[-1] += time.perf_counter() - start

        def ours():
            inside_generate.append(0.0)
            engine.model.generate = timed_generate
            try:
                outputs["ours"] = [g[0].token_ids for g in engine.generate(prompts, sampling)]
            finally:
                del engine.model.generate  # back to the class's method

        def direct(params=sampling, key="direct"):
            rows = _direct_generate(
                engine.model,
                engine.tokenizer,
                prompts,
                params,
                engine.eos_token_ids,
                engine.pad_token_id,
                opts.gen_batch,
                device,
            )
            outputs[key] = [_cut_at_eos(r, engine.eos_token_ids) for r in rows]

        def static():  # the warm-up call pays the compile (on CUDA)
            outputs["static"] = [g[0].token_ids for g in static_engine.generate(prompts, sampling)]

        log_progress(
            f"engine: {len(prompts)} prompts x {opts.gen_new_tokens} new tokens, {opts.repeats} repeats"
        )
        times = side_by_side(
            {"direct": direct, "ours": ours, "static": static},
            warmup=1,
            repeats=opts.repeats,
            device=device,
            interleave=True,
        )
        greedy = dataclasses.replace(sampling, temperature=0.0)
        outputs["ours_greedy"] = [g[0].token_ids for g in engine.generate(prompts, greedy)]
        outputs["static_greedy"] = [g[0].token_ids for g in static_engine.generate(prompts, greedy)]
        direct(greedy, "direct_greedy")
    ours_s, direct_s, static_s = best(times["ours"]), best(times["direct"]), best(times["static"])
    # Our own work per call (batching, padding, EOS cut, decoding): the call's time minus
    # the time inside model.generate. Unlike the ratio it does not move with the load.
    overhead_s = best(t - g for t, g in zip(times["ours"], inside_generate[-len(times["ours"]) :]))
    new_tokens = sum(map(len, outputs["ours"]))
    return {
        "bench": "engine",
        "shape": opts.shape,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "prompts": len(prompts),
        "max_new_tokens": opts.gen_new_tokens,
        "temperature": sampling.temperature,
        "repeats": opts.repeats,
        "generate_s": ours_s,
        "direct_generate_s": direct_s,
        "new_tokens": new_tokens,
        "tokens_per_s": new_tokens / ours_s,
        "ratio_to_transformers": ours_s / direct_s,
        "overhead_s": overhead_s,
        "overhead_share": overhead_s / ours_s,
        "same_tokens": outputs["ours_greedy"] == outputs["direct_greedy"],
        "static_cache_generate_s": static_s,
        "static_cache_speedup_over_direct": direct_s / static_s,
        "static_cache_same_tokens": outputs["static_greedy"] == outputs["ours_greedy"],
    }
