"""What every benchmark shares: the inputs (tokenizer, random-init HF model, prompts), FLOP
counts, and timing side by side."""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sept_megatron.bench.options import SHAPES, BenchOptions, Shape


# --- inputs: tokenizer, random-init HF model, task prompts ---------------------------------
@dataclass(frozen=True)
class Inputs:
    hf_dir: str
    train_jsonl: str
    work_dir: str
    params: int  # parameter count of the HF model (tied embeddings once)


def prepare_inputs(opts: BenchOptions, work_dir: str) -> Inputs:
    """The demo tokenizer, a random-init Qwen2 of the shape (saved as an HF checkpoint) and
    the demo task's questions as JSONL. Reused when ``work_dir`` already holds them."""
    from sept_megatron.demo.task import build_splits, write_jsonl

    shape = SHAPES[opts.shape]
    hf_dir = os.path.join(work_dir, f"hf-{opts.shape}")
    train_jsonl = os.path.join(work_dir, "questions.jsonl")
    splits = build_splits(0, n_train=max(256, opts.round_prompts * opts.rounds), n_val=0, n_test=0)
    if not os.path.isfile(train_jsonl):
        write_jsonl(splits["train"], train_jsonl)
    marker = os.path.join(hf_dir, "BENCH_COMPLETE")
    if not os.path.isfile(marker):
        log_progress(f"building the random-init {opts.shape} model in {hf_dir}")
        _build_hf_model(shape, hf_dir, splits["train"], opts.device)
        Path(marker).write_text("ok\n")
    return Inputs(hf_dir, train_jsonl, work_dir, parameter_count(arch_of(hf_dir)))


def _build_hf_model(shape: Shape, hf_dir: str, problems, device: str) -> None:
    import transformers

    from sept_megatron.demo.tokenizer import train_tokenizer

    corpus = [text for p in problems[:300] for text in (p.question, p.solution)]
    tokenizer = train_tokenizer(corpus, hf_dir, vocab_size=shape.vocab or 512)
    config = transformers.Qwen2Config(
        vocab_size=shape.vocab or len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # 1.31B parameters initialise in seconds on a GPU
        model = transformers.Qwen2ForCausalLM(config).to(dtype)
    model.save_pretrained(hf_dir)
    del model
    free_memory()


def arch_of(hf_dir: str):
    from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config

    return arch_from_hf_config(load_hf_config(hf_dir))


def parameter_count(arch) -> int:
    """Parameters of the HF model (unpadded vocabulary; tied embeddings counted once): the
    planner's count (:func:`sept_megatron.plan.memory.param_counts`)."""
    from sept_megatron.plan.memory import param_counts

    return param_counts(arch, arch.vocab_size).total


def flops_per_token(arch, params: int, seq_len: int) -> float:
    """Training FLOPs per token (:func:`sept_megatron.plan.memory.flops_per_token`)."""
    from sept_megatron.plan.memory import flops_per_token as planner_flops

    return planner_flops(arch, params, seq_len)


# --- timing helpers ------------------------------------------------------------------------
_STARTED = time.perf_counter()


def log_progress(message: str) -> None:
    print(f"[bench {time.perf_counter() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def side_by_side(
    fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int, device: torch.device, interleave: bool
) -> dict[str, list[float]]:
    """Seconds of each call of each function. ``interleave`` alternates them call by call
    (in A B B A order, so neither side always goes first), so a noisy machine slows both sides
    alike; otherwise each runs its calls in a block."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    if interleave:
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for index in range(repeats):
            order = list(fns.items())
            for name, fn in order if index % 2 == 0 else reversed(order):
                times[name].append(timed_call(fn, device))
        return times
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        times[name] = [timed_call(fn, device) for _ in range(repeats)]
    return times


def best(times) -> float:
    """The fastest of the timed calls (timeit's rule): on a shared machine interference only
    ever adds time, so the minimum is the steadiest estimate of what the code costs."""
    return min(times)


def ratio_of(ours_s: float, theirs_s: float) -> float:
    return theirs_s / ours_s if ours_s > 0 else float("nan")


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
