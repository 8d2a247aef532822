"""``sept-megatron bench``: our code paths against the plain way of doing the same work,
measured side by side in one run. One JSON line per benchmark on stdout; progress on stderr.

    sept-megatron bench --shape tiny                        # CPU: all five benchmarks
    sept-megatron bench --shape 1.5b --only train,engine    # one GPU: the 1.31B Qwen2 shape
    python tools/bench.py --shape tiny --only sync --repeats 5

Benchmarks (``--only`` selects; they always run in this order):

- ``train``: :class:`~sept_megatron.train.SFTTrainer` steps (the real Megatron path: schedule,
  DDP, optimizer, clipping) vs a plain transformers step (SDPA attention, AdamW, fused on CUDA,
  clipping) on the same weights, micro-batch, sequence length and dtype, one micro-batch per
  optimizer step on both sides. FLOPs per token: ``6 N + 12 L H Dh S`` (PaLM, appendix B: N
  parameters with tied embeddings counted once, L layers, H query heads of Dh channels, S the
  sequence length; the attention term counts the full S x S score matrix, causal masking not
  discounted). On GPU also the largest micro-batch that fits (doubling, then bisection,
  catching OOM) and, with Transformer Engine, FP8 (delayed / tensorwise / blockwise) vs BF16.
- ``engine``: :class:`~sept_megatron.rollout.hf.HFRolloutEngine` ``generate`` vs calling
  ``model.generate`` directly on the same model, batch, sampling settings and seed. The engine
  samples each sequence from its own seeded generator (so rollouts do not depend on how they
  are spread over engines) where plain ``generate`` draws from torch's global RNG, so sampled
  tokens differ by design; ``same_tokens`` checks one untimed greedy call of each instead.
- ``sync``: :func:`~sept_megatron.reshard.sync_weights` into a real engine at TP=``--sync-tp``
  vs one same-device copy of the same number of bytes (``ratio_to_copy`` = copy time / sync
  time). With TP > 1 the bench launches itself under ``torchrun --nproc-per-node=TP`` (gloo on
  CPU, NCCL on GPUs); run the bench itself as a plain process. ``ratio_to_tensor_copy``
  compares with the engine loading the same tensors from same-device copies (the receiving
  side alone); ``profile`` shows where rank 0's time goes (cProfile of one extra sync).
  ``path``: ``direct`` where the engine's weights live in the ranks' shared buffer (CPU, see
  :func:`~sept_megatron.sync_transport.direct_sync`), else ``buckets``; ``bucket_sync_s`` times
  the bucket stream on the same ranks side by side; ``barrier_s`` is one barrier of the ranks
  (the floor of any sync that must wait for all of them). Every timed call starts after an
  untimed barrier.
- ``checkpoint``: seconds one training checkpoint blocks training, foreground save vs
  ``checkpoint.async_save`` (:class:`~sept_megatron.checkpoint.CheckpointSaver`).
- ``round``: real SePT rounds through :func:`sept_megatron.loop.run` (a checkpoint every
  round, in the background with ``--async-checkpoint true``); the seconds of generate / train / sync / checkpoint per round and ``other_share``,
  the share of the round's wall time that is none of those (see :func:`round_shares`).

Every time reported is the best of its timed calls (:func:`best`); ratios divide such times
taken in the same run, interleaved call by call where both sides fit in memory together.

Shapes: ``tiny`` (CPU; a random-init Qwen2, hidden 128, 4 layers, the demo tokenizer),
``small`` (CPU; hidden 512, 8 layers, 8 / 2 heads, FFN 2048: 31M parameters, 124 MB in fp32, where
a sync is bound by bytes rather than by latency) and ``1.5b`` (one GPU; hidden 1536, 28 layers, 12 heads / 2 KV heads, FFN 8960, tied embeddings,
vocab 1024: 1.31B parameters). Weights are random: speed does not depend on them. Every flag is
checked before any model is built; a bad one exits with code 2 and names the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

BENCHMARKS = ("train", "engine", "sync", "checkpoint", "round")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")


class BenchError(ValueError):
    """A bad flag: the message names it and the fix."""


@dataclass(frozen=True)
class Shape:
    """A Qwen2 architecture plus the bench defaults that suit it."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int | None  # None: the demo tokenizer's own size
    max_positions: int
    seq_len: int
    micro_batch: int
    gen_batch: int
    gen_new_tokens: int
    round_prompts: int
    needs_gpu: bool


SHAPES = {
    "tiny": Shape(hidden=128, layers=4, heads=4, kv_heads=2, ffn=512, vocab=None,
                  max_positions=1024, seq_len=128, micro_batch=4, gen_batch=16,
                  gen_new_tokens=32, round_prompts=16, needs_gpu=False),
    # CPU, 124 MB of fp32 weights: big enough that a sync moves bytes rather than waits on
    # per-tensor and per-collective latency (tools/measure_sync.py's default shape).
    "small": Shape(hidden=512, layers=8, heads=8, kv_heads=2, ffn=2048, vocab=None,
                   max_positions=1024, seq_len=128, micro_batch=4, gen_batch=16,
                   gen_new_tokens=32, round_prompts=16, needs_gpu=False),
    # The shape of issue 8 (a Qwen2.5-1.5B-like model with a 1024-piece vocabulary).
    "1.5b": Shape(hidden=1536, layers=28, heads=12, kv_heads=2, ffn=8960, vocab=1024,
                  max_positions=4096, seq_len=1024, micro_batch=16, gen_batch=64,
                  gen_new_tokens=256, round_prompts=64, needs_gpu=True),
}


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """The validated command line (defaults filled in from the shape)."""

    shape: str
    only: tuple[str, ...]
    device: str  # "cpu" or "cuda", resolved
    seq_len: int
    micro_batch: int
    steps: int
    warmup: int
    repeats: int
    sync_tp: int
    rounds: int
    gen_batch: int
    gen_new_tokens: int
    round_prompts: int
    async_checkpoint: bool
    find_max_micro_batch: bool
    work_dir: str | None


# --- flags ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sept-megatron bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", help=f"one of {', '.join(SHAPES)} (default tiny)")
    p.add_argument("--only", default=",".join(BENCHMARKS),
                   help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--device", default="auto", help="auto (SEPT_DEVICE, then the GPU), cpu, cuda")
    p.add_argument("--seq-len", type=int, help="training sequence length (tiny and small 128, 1.5b 1024)")
    p.add_argument("--micro-batch", type=int, help="training micro-batch (tiny and small 4, 1.5b 16)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of generate/sync/save")
    p.add_argument("--sync-tp", type=int, help="tensor parallel size of the sync benchmark "
                   "(CPU default 2, GPU default min(2, visible GPUs))")
    p.add_argument("--rounds", type=int, default=3, help="SePT rounds of the round benchmark")
    p.add_argument("--gen-batch", type=int, help="prompts per generate call (engine, round)")
    p.add_argument("--gen-new-tokens", type=int, help="new tokens per answer (engine, round)")
    p.add_argument("--round-prompts", type=int, help="prompts per SePT round")
    p.add_argument("--async-checkpoint", default="false",
                   help="checkpoint.async_save in the round benchmark: true or false "
                   "(default false, the config's default)")
    p.add_argument("--no-max-micro-batch", action="store_true",
                   help="skip the GPU search for the largest micro-batch that fits")
    p.add_argument("--work-dir", help="keep the generated model, data and runs here "
                   "(default: a temporary directory, removed at the end)")
    # Internal: one rank of the torchrun launch of the sync benchmark.
    p.add_argument("--sync-worker", nargs=2, metavar=("HF_DIR", "RESULT_JSON"),
                   help=argparse.SUPPRESS)
    return p


def parse_options(argv: list[str]) -> tuple[BenchOptions, argparse.Namespace]:
    """Parse and check every flag; raises :class:`BenchError` before anything is built."""
    args = build_parser().parse_args(argv)
    if args.shape not in SHAPES:
        raise BenchError(f"--shape {args.shape!r}: choose one of {', '.join(SHAPES)}")
    shape = SHAPES[args.shape]
    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = [name for name in only if name not in BENCHMARKS]
    if unknown or not only:
        raise BenchError(f"--only {args.only!r}: {', '.join(unknown) or 'empty'} is not a "
                         f"benchmark; choose from {','.join(BENCHMARKS)}")
    device = _resolve_device(args.device)
    if shape.needs_gpu and device != "cuda":
        raise BenchError(f"--shape {args.shape} needs a GPU (device resolved to {device}); use "
                         "--shape tiny or small on a CPU")
    opts = BenchOptions(
        shape=args.shape, only=tuple(b for b in BENCHMARKS if b in only), device=device,
        seq_len=_or(args.seq_len, shape.seq_len), micro_batch=_or(args.micro_batch, shape.micro_batch),
        steps=args.steps, warmup=args.warmup, repeats=args.repeats,
        sync_tp=_or(args.sync_tp, _default_sync_tp(device)), rounds=args.rounds,
        gen_batch=_or(args.gen_batch, shape.gen_batch),
        gen_new_tokens=_or(args.gen_new_tokens, shape.gen_new_tokens),
        round_prompts=_or(args.round_prompts, shape.round_prompts),
        async_checkpoint=_parse_bool("--async-checkpoint", args.async_checkpoint),
        find_max_micro_batch=not args.no_max_micro_batch, work_dir=args.work_dir)
    _check_numbers(opts, shape)
    return opts, args


def _or(value, default):
    return default if value is None else value


def _resolve_device(setting: str) -> str:
    from sept_megatron.distributed import resolve_device

    try:
        return resolve_device(setting)
    except ValueError as exc:
        raise BenchError(f"--device {setting!r}: {exc}") from None


def _default_sync_tp(device: str) -> int:
    return 2 if device == "cpu" else max(1, min(2, torch.cuda.device_count()))


def _parse_bool(flag: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise BenchError(f"{flag} {value!r}: expected true or false")


def _check_numbers(opts: BenchOptions, shape: Shape) -> None:
    errors = []
    for flag, value, low in (("--micro-batch", opts.micro_batch, 1), ("--steps", opts.steps, 1),
                             ("--warmup", opts.warmup, 0), ("--repeats", opts.repeats, 1),
                             ("--sync-tp", opts.sync_tp, 1), ("--rounds", opts.rounds, 2),
                             ("--gen-batch", opts.gen_batch, 1),
                             ("--gen-new-tokens", opts.gen_new_tokens, 1),
                             ("--round-prompts", opts.round_prompts, 2)):
        if value < low:
            errors.append(f"{flag} {value}: must be >= {low}"
                          + (" (round 1 is warm-up and not counted)" if flag == "--rounds" else ""))
    if opts.seq_len < 16 or opts.seq_len % 16 or opts.seq_len > shape.max_positions:
        errors.append(f"--seq-len {opts.seq_len}: must be a multiple of 16 in [16, "
                      f"{shape.max_positions}] (the trainer pads to multiples of 8, 16 for FP8)")
    if shape.heads % opts.sync_tp or shape.kv_heads % opts.sync_tp:
        errors.append(f"--sync-tp {opts.sync_tp}: must divide the {opts.shape} shape's "
                      f"{shape.heads} heads and {shape.kv_heads} KV heads")
    if opts.device == "cuda" and opts.sync_tp > torch.cuda.device_count() and "sync" in opts.only:
        errors.append(f"--sync-tp {opts.sync_tp}: only {torch.cuda.device_count()} GPU(s) "
                      "visible; use --sync-tp 1")
    if opts.round_prompts % 2:
        errors.append(f"--round-prompts {opts.round_prompts}: must be even (two optimizer "
                      "steps per round)")
    if opts.gen_new_tokens + 64 > shape.max_positions:
        errors.append(f"--gen-new-tokens {opts.gen_new_tokens}: prompt + answer must fit the "
                      f"shape's {shape.max_positions} positions")
    if errors:
        raise BenchError("\n  ".join(errors))


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
    splits = build_splits(0, n_train=max(256, opts.round_prompts * opts.rounds), n_val=0,
                          n_test=0)
    if not os.path.isfile(train_jsonl):
        write_jsonl(splits["train"], train_jsonl)
    marker = os.path.join(hf_dir, "BENCH_COMPLETE")
    if not os.path.isfile(marker):
        _progress(f"building the random-init {opts.shape} model in {hf_dir}")
        _build_hf_model(shape, hf_dir, splits["train"], opts.device)
        Path(marker).write_text("ok\n")
    return Inputs(hf_dir, train_jsonl, work_dir, parameter_count(_arch(hf_dir)))


def _build_hf_model(shape: Shape, hf_dir: str, problems, device: str) -> None:
    import transformers

    from sept_megatron.demo.tokenizer import train_tokenizer

    corpus = [text for p in problems[:300] for text in (p.question, p.solution)]
    tokenizer = train_tokenizer(corpus, hf_dir, vocab_size=shape.vocab or 512)
    config = transformers.Qwen2Config(
        vocab_size=shape.vocab or len(tokenizer), hidden_size=shape.hidden,
        intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # 1.31B parameters initialise in seconds on a GPU
        model = transformers.Qwen2ForCausalLM(config).to(dtype)
    model.save_pretrained(hf_dir)
    del model
    _free_memory()


def _arch(hf_dir: str):
    from sept_megatron import model as mdl

    return mdl.arch_from_hf_config(mdl.load_hf_config(hf_dir))


def parameter_count(arch) -> int:
    """Parameters of a Llama/Qwen-style model from its shape (tied embeddings counted once)."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if arch.qkv_bias else 0)
    attention += 2 * d if arch.qk_layernorm else 0
    per_layer = attention + 3 * h * arch.ffn_hidden_size + 2 * h
    embeddings = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    return arch.num_layers * per_layer + embeddings + h


def flops_per_token(arch, params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 L H Dh S (PaLM, appendix B)."""
    attention = 12 * arch.num_layers * arch.num_attention_heads * arch.head_dim * seq_len
    return 6.0 * params + attention


# --- timing helpers ------------------------------------------------------------------------
_STARTED = time.perf_counter()


def _progress(message: str) -> None:
    print(f"[bench {time.perf_counter() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def side_by_side(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
                 device: torch.device, interleave: bool) -> dict[str, list[float]]:
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
                times[name].append(_timed(fn, device))
        return times
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        times[name] = [_timed(fn, device) for _ in range(repeats)]
    return times


def best(times) -> float:
    """The fastest of the timed calls (timeit's rule): on a shared machine interference only
    ever adds time, so the minimum is the steadiest estimate of what the code costs."""
    return min(times)


def _ratio(ours_s: float, theirs_s: float) -> float:
    return theirs_s / ours_s if ours_s > 0 else float("nan")


# --- train -----------------------------------------------------------------------------------
def _random_samples(vocab: int, count: int, seq_len: int, seed: int):
    """``count`` samples of ``seq_len + 1`` tokens (a quarter prompt): after the shift, every
    micro-batch is exactly ``count x seq_len`` positions on both sides."""
    from sept_megatron.train import Sample

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (count, seq_len + 1), generator=generator).tolist()
    prompt = seq_len // 4
    return [Sample(row[:prompt], row[prompt:]) for row in ids]


def _build_trainer(hf_dir: str, micro_batch: int, *, transformer_impl: str = "auto",
                   fp8: str | None = None):
    """The SFT trainer of a ``sept-megatron train`` run (world of one), HF weights loaded."""
    from sept_megatron import model as mdl
    from sept_megatron.config import TrainConfig
    from sept_megatron.convert import HFTensorReader, load_hf_into_model
    from sept_megatron.train import SFTTrainer

    arch = _arch(hf_dir)
    padded = mdl.padded_vocab_size(arch.vocab_size, 128, 1)
    model = mdl.build_megatron_model(
        arch, tensor_parallel=1, pipeline_parallel=1, params_dtype=mdl.resolve_dtype("auto"),
        transformer_impl=transformer_impl, fp8=fp8, padded_vocab=padded)
    reader = HFTensorReader(hf_dir)
    load_hf_into_model(model.chunks, reader, arch, padded_vocab=padded, tp_rank=0, tp_size=1)
    reader.close()
    train_cfg = TrainConfig(micro_batch_size=micro_batch, mini_batch_size=micro_batch,
                            prompts_per_round=micro_batch, lr=1e-5, warmup_steps=0)
    return SFTTrainer(model, train_cfg, total_steps=10**6, use_distributed_optimizer=False,
                      pad_id=0)


def _megatron_step(trainer, samples) -> Callable[[], object]:
    return lambda: trainer.step(samples)


def _transformers_step(hf_dir: str, samples, device: torch.device) -> Callable[[], object]:
    """What a plain transformers user writes: SDPA, AdamW (fused on CUDA), clipping."""
    from transformers import AutoModelForCausalLM

    from sept_megatron import model as mdl

    dtype = mdl.resolve_dtype("auto")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa",
                                                 local_files_only=True).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01,
                                  fused=device.type == "cuda")
    tokens = torch.tensor([s.prompt_ids + s.response_ids for s in samples], device=device)
    input_ids = tokens[:, :-1].contiguous()
    labels = input_ids.clone()
    labels[:, : len(samples[0].prompt_ids)] = -100  # the same response-only loss as ours

    def step():
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_train(opts: BenchOptions, inputs: Inputs) -> dict:
    from sept_megatron import model as mdl
    from sept_megatron.distributed import compute_device

    device = compute_device()
    arch = _arch(inputs.hf_dir)
    mb, seq = opts.micro_batch, opts.seq_len
    samples = _random_samples(arch.vocab_size, mb, seq, seed=0)
    _progress(f"train: our trainer and the transformers baseline, micro-batch {mb} x {seq}")
    if device.type == "cpu":
        trainer, times, peaks = _train_times_cpu(opts, inputs, samples, device)
    else:
        trainer, times, peaks = _train_times_gpu(opts, inputs, samples, device)
    tokens = mb * seq
    per_token = flops_per_token(arch, inputs.params, seq)
    result = {
        "bench": "train", "shape": opts.shape, "device": str(device),
        "dtype": str(mdl.resolve_dtype("auto")).removeprefix("torch."),
        "transformer_impl": "transformer_engine" if mdl.use_transformer_engine("auto") else "local",
        "seq_len": seq, "micro_batch": mb, "params": inputs.params, "steps": opts.steps,
        "flops_per_token": per_token, "flops_formula": "6*N + 12*L*H*Dh*S (PaLM appendix B)",
        **_throughput("", times["ours"], tokens, per_token, inputs.params),
        **_throughput("transformers_", times["transformers"], tokens, per_token, inputs.params),
        "ratio_to_transformers": (_ratio(best(times["ours"]),
                                         best(times["transformers"]))
                                  if times["ours"] and times["transformers"] else None),
        "peak_memory_gb": peaks["ours"], "transformers_peak_memory_gb": peaks["transformers"],
    }
    if device.type == "cpu":
        result["max_micro_batch"] = None
        result["max_micro_batch_skipped"] = "CPU: no device memory limit to search"
    elif opts.find_max_micro_batch:
        _progress("train: searching the largest micro-batch that fits")
        result["max_micro_batch"] = largest_fitting(
            lambda m: _fits(trainer, arch.vocab_size, m, seq), start=mb, limit=4096)
    del trainer
    _free_memory()
    result["fp8"] = _fp8_side_by_side(opts, inputs, samples, device)
    return result


def _throughput(prefix: str, times: list[float] | None, tokens: int, per_token: float,
                params: int) -> dict:
    """Step seconds (best of the timed steps), tokens/s and TFLOP/s of one side; nulls and ``oom`` if it did
    not fit."""
    if not times:
        return {f"{prefix}step_s": None, f"{prefix}tokens_per_s": None, f"{prefix}oom": True}
    step_s = best(times)
    row = {f"{prefix}step_s": step_s, f"{prefix}tokens_per_s": tokens / step_s,
           f"{prefix}tflops": per_token * tokens / step_s / 1e12}
    if not prefix:
        row["tflops_6n"] = 6.0 * params * tokens / step_s / 1e12
    return row


def _train_times_cpu(opts: BenchOptions, inputs: Inputs, samples, device):
    """Both sides built at once and interleaved step by step. The baseline runs without the
    CUDA->CPU redirect, as a plain transformers user's code does; ours runs with it."""
    from sept_megatron import compat

    with compat.suspended():
        theirs = _transformers_step(inputs.hf_dir, samples, device)

    def theirs_plain():
        with compat.suspended():
            theirs()

    trainer = _build_trainer(inputs.hf_dir, opts.micro_batch)
    times = side_by_side({"ours": _megatron_step(trainer, samples), "transformers": theirs_plain},
                         warmup=opts.warmup, repeats=opts.steps, device=device, interleave=True)
    return trainer, times, {"ours": None, "transformers": None}


def _train_times_gpu(opts: BenchOptions, inputs: Inputs, samples, device):
    """One model on the GPU at a time: the baseline first (then freed), then ours. A side
    that runs out of memory at this micro-batch gets no times (reported as ``oom``)."""
    times: dict[str, list[float] | None] = {}
    peaks: dict[str, float | None] = {}
    _reset_peak(device)
    theirs = _transformers_step(inputs.hf_dir, samples, device)
    times["transformers"] = _times_unless_oom(theirs, opts, device)
    peaks["transformers"] = _peak_memory_gb(device)
    del theirs  # the closure holds the only references to the model and its optimizer
    _free_memory()
    _reset_peak(device)
    trainer = _build_trainer(inputs.hf_dir, opts.micro_batch)
    times["ours"] = _times_unless_oom(_megatron_step(trainer, samples), opts, device)
    peaks["ours"] = _peak_memory_gb(device)
    return trainer, times, peaks


def _times_unless_oom(step: Callable[[], object], opts: BenchOptions, device) -> list[float] | None:
    out_of_memory = False
    try:
        return side_by_side({"x": step}, warmup=opts.warmup, repeats=opts.steps, device=device,
                            interleave=False)["x"]
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True
    if out_of_memory:  # outside the handler: the traceback's tensors are released
        _free_memory()
        _progress(f"train: out of memory at micro-batch {opts.micro_batch}")
    return None


def _peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def largest_fitting(fits: Callable[[int], bool], *, start: int, limit: int) -> int:
    """The largest micro-batch ``m <= limit`` with ``fits(m)``, assuming fitting is monotone:
    doubling from ``start`` (halving when ``start`` does not fit), then bisection. 0 if even
    a micro-batch of one does not fit."""
    if fits(start):
        good, bad = start, None
        while good * 2 <= limit:
            if not fits(good * 2):
                bad = good * 2
                break
            good *= 2
        if bad is None:
            return good
    else:
        good, bad = 0, start
        while bad > 1:
            if fits(bad // 2):
                good = bad // 2
                break
            bad //= 2
        if good == 0:
            return 0
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def _fits(trainer, vocab: int, micro_batch: int, seq_len: int) -> bool:
    """One training step at ``micro_batch``; False on CUDA out-of-memory."""
    trainer.cfg = dataclasses.replace(trainer.cfg, micro_batch_size=micro_batch,
                                      mini_batch_size=micro_batch)
    out_of_memory = False
    try:
        trainer.step(_random_samples(vocab, micro_batch, seq_len, seed=micro_batch))
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True  # the traceback (and its tensors) is gone once we leave except
    _free_memory()
    _progress(f"train: micro-batch {micro_batch}: {'OOM' if out_of_memory else 'fits'}")
    return not out_of_memory


def _fp8_side_by_side(opts: BenchOptions, inputs: Inputs, samples, device) -> dict:
    """Issue 10: each FP8 recipe vs BF16, both through Transformer Engine layers, on the same
    samples and steps (``--seq-len`` is a multiple of 16, so FP8's padding adds nothing). A
    recipe this machine cannot run is skipped with :mod:`sept_megatron.fp8_training`'s reason."""
    from sept_megatron.fp8_training import fp8_shape_problems, fp8_unsupported_reason

    if device.type != "cuda":
        return {"skipped": True, "reason": "no CUDA device (FP8 needs Transformer Engine on a GPU)"}
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return {"skipped": True, "reason": "Transformer Engine is not installed "
                "(pip install 'sept_megatron[gpu]')"}
    rows: dict[str, dict] = {}
    for recipe in (None, *FP8_RECIPES):
        label = recipe or "bf16"
        problems = [fp8_unsupported_reason(recipe)] if recipe else []
        problems += fp8_shape_problems(_arch(inputs.hf_dir), 1) if recipe else []
        if any(problems):
            rows[label] = {"skipped": True, "reason": "; ".join(filter(None, problems))}
            continue
        _progress(f"train: Transformer Engine {label}")
        try:
            trainer = _build_trainer(inputs.hf_dir, opts.micro_batch,
                                     transformer_impl="transformer_engine", fp8=recipe)
            times = _times_unless_oom(_megatron_step(trainer, samples), opts, device)
            del trainer
            rows[label] = ({"step_s": best(times),
                            "tokens_per_s": opts.micro_batch * opts.seq_len / best(times)}
                           if times else {"oom": True})
        except Exception as exc:  # reported in the JSON line; the BF16 figures above stand
            rows[label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            _progress(f"train: Transformer Engine {label} failed: {rows[label]['error']}")
        _free_memory()
    bf16 = rows["bf16"].get("tokens_per_s")
    for recipe in FP8_RECIPES:
        if bf16 and "tokens_per_s" in rows[recipe]:
            rows[recipe]["ratio_to_bf16"] = rows[recipe]["tokens_per_s"] / bf16
    return rows


# --- engine ----------------------------------------------------------------------------------
def _prompts(inputs: Inputs, tokenizer, count: int) -> list[list[int]]:
    """Chat-rendered task questions, longest first (the engine's own order, so both sides
    see identical batches)."""
    from sept_megatron.data import load_questions, render_prompts

    questions = load_questions(inputs.train_jsonl)[:count]
    return sorted(render_prompts(questions, tokenizer, "auto"), key=len, reverse=True)


def _direct_generate(model, tokenizer, prompts: list[list[int]], sampling, eos_ids, pad_id,
                     batch_size: int, device) -> list[list[int]]:
    """``model.generate`` called as a transformers user would: left padding, same settings."""
    from transformers import GenerationConfig

    sample = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                  top_k=0) if sampling.temperature > 0 else dict(do_sample=False)
    config = GenerationConfig(**sample, max_new_tokens=sampling.max_new_tokens,
                              eos_token_id=list(eos_ids), pad_token_id=pad_id, num_beams=1,
                              use_cache=True)
    torch.manual_seed(sampling.seed)
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
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
    from sept_megatron import compat
    from sept_megatron.rollout import SamplingParams
    from sept_megatron.rollout.hf import HFRolloutEngine

    device = torch.device(opts.device)
    dtype = torch.bfloat16 if opts.device == "cuda" else torch.float32
    with compat.suspended():
        engine = HFRolloutEngine(inputs.hf_dir, device=device, dtype=dtype,
                                 batch_size=opts.gen_batch, progress=False)
        prompts = _prompts(inputs, engine.tokenizer, opts.gen_batch)
        sampling = SamplingParams(temperature=0.6, top_p=1.0, top_k=-1, n=1, seed=1234,
                                  max_new_tokens=opts.gen_new_tokens)
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
            rows = _direct_generate(engine.model, engine.tokenizer, prompts, params,
                                    engine.eos_token_ids, engine.pad_token_id, opts.gen_batch, device)
            outputs[key] = [_cut_at_eos(r, engine.eos_token_ids) for r in rows]

        _progress(f"engine: {len(prompts)} prompts x {opts.gen_new_tokens} new tokens, "
                  f"{opts.repeats} repeats")
        times = side_by_side({"direct": direct, "ours": ours}, warmup=1, repeats=opts.repeats,
                             device=device, interleave=True)
        greedy = dataclasses.replace(sampling, temperature=0.0)
        outputs["ours_greedy"] = [g[0].token_ids for g in engine.generate(prompts, greedy)]
        direct(greedy, "direct_greedy")
    ours_s, direct_s = best(times["ours"]), best(times["direct"])
    # Our own work per call (batching, padding, EOS cut, decoding): the call's time minus
    # the time inside model.generate. Unlike the ratio it does not move with the load.
    overhead_s = best(t - g for t, g in zip(times["ours"], inside_generate[-len(times["ours"]):]))
    new_tokens = sum(map(len, outputs["ours"]))
    return {
        "bench": "engine", "shape": opts.shape, "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "prompts": len(prompts),
        "max_new_tokens": opts.gen_new_tokens, "temperature": sampling.temperature,
        "repeats": opts.repeats, "generate_s": ours_s, "direct_generate_s": direct_s,
        "new_tokens": new_tokens, "tokens_per_s": new_tokens / ours_s,
        "ratio_to_transformers": ours_s / direct_s, "overhead_s": overhead_s,
        "overhead_share": overhead_s / ours_s, "same_tokens": outputs["ours_greedy"] == outputs["direct_greedy"],
    }


# --- sync ------------------------------------------------------------------------------------
def bench_sync(opts: BenchOptions, inputs: Inputs) -> dict:
    """Launch ``--sync-tp`` ranks under torchrun (or run in this process for TP=1)."""
    result_path = os.path.join(inputs.work_dir, "sync_result.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    if opts.sync_tp == 1:
        return run_sync_worker(opts, inputs.hf_dir, result_path)
    from sept_megatron.distributed import _free_port

    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={opts.sync_tp}",
               "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
               "-m", "sept_megatron.bench", *_worker_flags(opts),
               "--sync-worker", inputs.hf_dir, result_path]
    _progress(f"sync: launching {opts.sync_tp} ranks: torchrun --nproc-per-node={opts.sync_tp}")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               SEPT_DEVICE=opts.device)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, env=env)
    if proc.returncode != 0 or not os.path.isfile(result_path):
        raise RuntimeError(f"the sync benchmark's torchrun launch failed (exit code "
                           f"{proc.returncode}); its output is above")
    return json.loads(Path(result_path).read_text())


def _worker_flags(opts: BenchOptions) -> list[str]:
    return ["--shape", opts.shape, "--device", opts.device, "--repeats", str(opts.repeats),
            "--sync-tp", str(opts.sync_tp), "--only", "sync"]


def run_sync_worker(opts: BenchOptions, hf_dir: str, result_path: str) -> dict:
    """One rank of the sync benchmark: Megatron at TP=``sync_tp`` holding the HF weights,
    an engine on rank 0, ``repeats`` timed syncs, then the same-device copy baseline."""
    import torch.distributed as dist

    from sept_megatron import compat, distributed
    from sept_megatron import model as mdl
    from sept_megatron.convert import HFTensorReader, load_hf_into_model
    from sept_megatron.reshard import sync_plan, sync_weights

    tp = opts.sync_tp
    distributed.initialize(tensor_parallel=tp, pipeline_parallel=1, device=opts.device)
    rank = dist.get_rank()
    device = distributed.compute_device()
    arch = _arch(hf_dir)
    padded = mdl.padded_vocab_size(arch.vocab_size, 128, tp)
    params_dtype = mdl.resolve_dtype("auto")
    model = mdl.build_megatron_model(arch, tensor_parallel=tp, pipeline_parallel=1,
                                     params_dtype=params_dtype, padded_vocab=padded)
    from megatron.core import parallel_state as ps

    reader = HFTensorReader(hf_dir)
    load_hf_into_model(model.chunks, reader, arch, padded_vocab=padded,
                       tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=tp)
    reader.close()
    engine = None
    if rank == 0:  # the engine lives on rank 0 only (other ranks need not import transformers)
        from sept_megatron.rollout.hf import HFRolloutEngine

        with compat.suspended():
            engine = HFRolloutEngine(hf_dir, device=device, dtype=params_dtype, progress=False)
    bucket_bytes = 512 << 20  # rollout.bucket_size_mb's default
    nbytes = sum(item.numel for item in sync_plan(arch, 1)) * torch.empty(
        (), dtype=params_dtype).element_size()

    def one_sync():
        sync_weights(model, engine, bucket_bytes)

    # Every timed call starts with the ranks lined up by a barrier outside the timed region:
    # the time is the sync's own, not a wait for a rank still busy with the previous call.
    times = _aligned_times(one_sync, warmup=1, repeats=opts.repeats, device=device)
    from sept_megatron.sync_transport import engine_weights_of

    path = "direct" if engine_weights_of(model) is not None else "buckets"
    bucket_times = _aligned_times(  # the bucket stream, side by side (the GPU path)
        lambda: sync_weights(model, engine, bucket_bytes, direct=False),
        warmup=1, repeats=opts.repeats, device=device)
    barrier_s = best(_aligned_times(dist.barrier, warmup=1, repeats=opts.repeats, device=device))
    dist.barrier()
    profile = _profile_sync(one_sync) if rank == 0 else None
    if rank != 0:
        one_sync()  # rank 0 runs one more (profiled) sync: take part in it
    result = None
    if rank == 0:
        sync_s = best(times)
        copy_s, tensor_copy_s = _copy_baselines(engine, arch, nbytes, device, opts.repeats)
        result = {
            "bench": "sync", "shape": opts.shape, "device": str(device),
            "tensor_parallel": tp, "backend": dist.get_backend(),
            "dtype": str(params_dtype).removeprefix("torch."), "bytes": nbytes,
            "tensors": engine.loaded_tensor_count, "repeats": opts.repeats,
            "path": path, "sync_s": sync_s, "gb_per_s": nbytes / sync_s / 1e9, "copy_s": copy_s,
            "copy_gb_per_s": nbytes / copy_s / 1e9, "ratio_to_copy": _ratio(sync_s, copy_s),
            "tensor_copy_s": tensor_copy_s, "ratio_to_tensor_copy": _ratio(sync_s, tensor_copy_s),
            "bucket_sync_s": best(bucket_times),
            "ratio_bucket_to_copy": _ratio(best(bucket_times), copy_s),
            "barrier_s": barrier_s, "profile": profile,
        }
        Path(result_path).write_text(json.dumps(result))
    dist.barrier()
    return result


def _aligned_times(fn: Callable[[], object], *, warmup: int, repeats: int, device) -> list[float]:
    """Seconds of each timed call of the collective ``fn``, every call (warm-up included)
    preceded by an untimed barrier."""
    import torch.distributed as dist

    times = []
    for index in range(warmup + repeats):
        dist.barrier()
        elapsed = _timed(fn, device)
        if index >= warmup:
            times.append(elapsed)
    return times


def _copy_baselines(engine, arch, nbytes: int, device, repeats: int) -> tuple[float, float]:
    """Seconds of (one flat same-device copy of ``nbytes``, the engine loading the same HF
    tensors from same-device copies): the bandwidth bound, and the receiving side alone."""
    from sept_megatron.reshard import sync_plan

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    names = {name for item in sync_plan(arch, 1) for name in item.hf_names}
    tensors = [(name, t.detach().clone()) for name, t in engine._named_tensors().items()
               if name in names]
    times = side_by_side({"copy": lambda: dst.copy_(src),
                          "tensors": lambda: engine.update_weights([tensors])},
                         warmup=1, repeats=repeats, device=device, interleave=True)
    return best(times["copy"]), best(times["tensors"])


def _profile_sync(one_sync: Callable[[], object], top: int = 10) -> dict:
    """Where rank 0's time goes in one sync (cProfile; the timed syncs run without it):
    ``own`` = functions by time spent in themselves (collective waits, copies, Python),
    ``within`` = our own reshard / engine functions by cumulative time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(one_sync)
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, calls, own, cumulative, _)

    def label(key) -> str:
        path, _, name = key
        return f"{Path(path).stem}.{name}" if path != "~" else name

    def row(key, value) -> dict:
        return {"fn": label(key), "calls": value[1], "own_s": value[2], "cumulative_s": value[3]}

    by_own = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    ours = [(k, v) for k, v in stats.items()
            if any(part in k[0] for part in ("sept_megatron/reshard", "sept_megatron/rollout",
                                             "sept_megatron/convert"))]
    within = sorted(ours, key=lambda kv: kv[1][3], reverse=True)[:top]
    return {"wall_s": wall, "own": [row(k, v) for k, v in by_own],
            "within": [row(k, v) for k, v in within]}


# --- checkpoint ------------------------------------------------------------------------------
def bench_checkpoint(opts: BenchOptions, inputs: Inputs) -> dict:
    from sept_megatron import checkpoint as ckpt_io
    from sept_megatron.train import trainer_sharded_state_dict

    arch = _arch(inputs.hf_dir)
    trainer = _build_trainer(inputs.hf_dir, opts.micro_batch)
    samples = _random_samples(arch.vocab_size, opts.micro_batch, opts.seq_len, seed=1)
    trainer.step(samples)  # optimizer state exists, as in a real checkpoint
    meta = ckpt_io.CheckpointMeta(arch, trainer.model.padded_vocab,
                                  ckpt_io.torch_dtype_name(trainer.model.config.params_dtype), 1, 1,
                                  train_state={"round": 0})
    root = os.path.join(inputs.work_dir, "checkpoint_bench")
    savers = {mode: ckpt_io.CheckpointSaver(async_save=mode == "async", keep_last=0)
              for mode in ("sync", "async")}

    def save(mode: str, index: int) -> tuple[float, float]:
        """(seconds the save call blocked, seconds until the background write was published);
        the checkpoint is deleted afterwards (at 1.5b each one is ~18 GB)."""
        blocked = savers[mode].save(root, f"round_{index:06d}",
                                    trainer_sharded_state_dict(trainer), meta, inputs.hf_dir)
        start = time.perf_counter()
        savers[mode].finish()
        published = time.perf_counter() - start
        sizes.append(sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file()))
        shutil.rmtree(root)
        return blocked, published

    # The first save of a process pays one-time set-up (dist_checkpointing imports and
    # plans) whatever the mode: measured apart, then the two modes alternate.
    sizes: list[int] = []
    first_save_s = sum(save("sync", 0))
    times: dict[str, list[tuple[float, float]]] = {"sync": [], "async": []}
    for index in range(1, opts.repeats + 1):
        for mode in ("sync", "async"):
            times[mode].append(save(mode, index))
            _progress(f"checkpoint: {mode} save {index}: blocked {times[mode][-1][0]:.3f} s"
                      + (f", then written in {times[mode][-1][1]:.3f} s" if mode == "async" else ""))
    del trainer
    _free_memory()
    sync_s = best(t[0] for t in times["sync"])
    async_s = best(t[0] for t in times["async"])
    return {
        "bench": "checkpoint", "shape": opts.shape, "bytes_on_disk": max(sizes),
        "repeats": opts.repeats, "first_save_s": first_save_s, "sync_blocking_s": sync_s,
        "async_blocking_s": async_s,
        "async_background_s": best(t[1] for t in times["async"]),
        "ratio_async_to_sync": async_s / sync_s,
    }


# --- round -----------------------------------------------------------------------------------
def round_config(opts: BenchOptions, inputs: Inputs, run_dir: str):
    from sept_megatron.config import (
        CheckpointConfig, Config, DataConfig, LoggingConfig, ModelConfig, ParallelConfig,
        RolloutConfig, TrainConfig)

    return Config(
        model=ModelConfig(hf_path=inputs.hf_dir),
        parallel=ParallelConfig(device=opts.device),
        rollout=RolloutConfig(batch_size=opts.gen_batch),
        data=DataConfig(train_files=[inputs.train_jsonl],
                        max_response_length=opts.gen_new_tokens),
        train=TrainConfig(rounds=opts.rounds, prompts_per_round=opts.round_prompts,
                          mini_batch_size=opts.round_prompts // 2,
                          micro_batch_size=_divisor_at_most(opts.round_prompts // 2, opts.micro_batch),
                          lr=1e-5, warmup_steps=0),
        logging=LoggingConfig(run_dir=run_dir, progress=False),
        checkpoint=CheckpointConfig(save_every_n_rounds=1, keep_last=1, export_hf=False,
                                    async_save=opts.async_checkpoint))


def _divisor_at_most(number: int, cap: int) -> int:
    return max(d for d in range(1, min(number, cap) + 1) if number % d == 0)


PHASES = ("generate", "train", "sync", "checkpoint")


def round_shares(records: list[dict]) -> dict:
    """Seconds per round of each phase and of the whole round, and ``other_share``, from the
    records of ``metrics.jsonl``. A round's wall time is the interval between its log record
    and the previous one (everything the loop did in between, logging included), so round 1,
    which has no previous record, is left out; ``timing/round`` (the loop's own measure, from
    the round's first line to its log call) is reported beside it."""
    steady = records[1:]
    wall = sum(b["time"] - a["time"] for a, b in zip(records, records[1:]))
    phases = {p: sum(r[f"timing/{p}"] for r in steady) for p in PHASES}
    other = wall - sum(phases.values())
    return {"rounds_measured": len(steady),
            **{f"{p}_s": phases[p] / len(steady) for p in PHASES},
            "round_s": wall / len(steady),
            "loop_timing_round_s": sum(r["timing/round"] for r in steady) / len(steady),
            "other_s": other / len(steady), "other_share": other / wall}


def bench_round(opts: BenchOptions, inputs: Inputs) -> dict:
    from sept_megatron.loop import run

    run_dir = os.path.join(inputs.work_dir, "round_run")
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # a fresh run, not a resume
    _progress(f"round: {opts.rounds} SePT rounds x {opts.round_prompts} prompts")
    run(round_config(opts, inputs, run_dir))
    records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)  # ~18 GB at 1.5b
    return {"bench": "round", "shape": opts.shape, "device": opts.device, "rounds": len(records),
            "prompts_per_round": opts.round_prompts, "max_new_tokens": opts.gen_new_tokens,
            "async_checkpoint": opts.async_checkpoint, **round_shares(records)}


RUNNERS: dict[str, Callable[[BenchOptions, Inputs], dict]] = {
    "train": bench_train, "engine": bench_engine, "sync": bench_sync,
    "checkpoint": bench_checkpoint, "round": bench_round}
NEEDS_PROCESS_GROUP = ("train", "checkpoint")


# --- driver ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _work_dir(opts: BenchOptions):
    if opts.work_dir:
        os.makedirs(opts.work_dir, exist_ok=True)
        yield os.path.abspath(opts.work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="sept-bench-") as tmp:
        yield tmp


def run_benchmarks(opts: BenchOptions, emit: Callable[[dict], None]) -> None:
    """Run the selected benchmarks in order, emitting each result as soon as it is known."""
    from sept_megatron import distributed

    with _work_dir(opts) as work_dir:
        inputs = prepare_inputs(opts, work_dir)
        if any(name in opts.only for name in NEEDS_PROCESS_GROUP):
            # A world of one, as `sept-megatron train` on one device; `round` (last) reuses it.
            distributed.initialize(tensor_parallel=1, pipeline_parallel=1, device=opts.device)
        try:
            for name in opts.only:
                started = time.perf_counter()
                result = RUNNERS[name](opts, inputs)
                result["bench_wall_s"] = time.perf_counter() - started
                emit(result)
        finally:
            distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts, args = parse_options(argv)
        if args.sync_worker is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise BenchError("run `sept-megatron bench` as one plain process: it launches "
                             "torchrun itself for the TP sync benchmark (--sync-tp)")
    except BenchError as exc:
        print(f"sept-megatron bench: error: {exc}", file=sys.stderr)
        return 2
    if args.sync_worker is not None:
        from sept_megatron import distributed

        run_sync_worker(opts, *args.sync_worker)
        distributed.shutdown()
        return 0
    stdout = sys.stdout

    def emit(result: dict) -> None:
        stdout.write(json.dumps(result) + "\n")
        stdout.flush()

    # Libraries print to stdout; only the JSON lines belong there.
    with contextlib.redirect_stdout(sys.stderr):
        run_benchmarks(opts, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
