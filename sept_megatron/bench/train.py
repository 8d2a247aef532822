"""``train``: SFTTrainer steps vs a plain transformers step (and FP8 vs BF16 with TE)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from sept_megatron.bench.common import (
    Inputs,
    arch_of,
    best,
    flops_per_token,
    free_memory,
    log_progress,
    ratio_of,
    side_by_side,
)
from sept_megatron.bench.options import BenchOptions
from sept_megatron.trainer.fp8 import FP8_RECIPES


def random_samples(vocab: int, count: int, seq_len: int, seed: int):
    """``count`` samples of ``seq_len + 1`` tokens (a quarter prompt): after the shift, every
    micro-batch is exactly ``count x seq_len`` positions on both sides."""
    from sept_megatron.trainer.sft import Sample

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (count, seq_len + 1), generator=generator).tolist()
    prompt = seq_len // 4
    return [Sample(row[:prompt], row[prompt:]) for row in ids]


def build_trainer(hf_dir: str, micro_batch: int, *, transformer_impl: str = "auto", fp8: str | None = None):
    """The SFT trainer of a ``sept-megatron train`` run (world of one), HF weights loaded."""
    from sept_megatron.config import TrainConfig
    from sept_megatron.convert import HFTensorReader, load_hf_into_model
    from sept_megatron.trainer import model as mdl
    from sept_megatron.trainer.sft import SFTTrainer

    arch = arch_of(hf_dir)
    padded = mdl.padded_vocab_size(arch.vocab_size, 128, 1)
    model = mdl.build_megatron_model(
        arch,
        tensor_parallel=1,
        pipeline_parallel=1,
        params_dtype=mdl.resolve_dtype("auto"),
        transformer_impl=transformer_impl,
        fp8=fp8,
        padded_vocab=padded,
    )
    reader = HFTensorReader(hf_dir)
    load_hf_into_model(model.chunks, reader, arch, padded_vocab=padded, tp_rank=0, tp_size=1)
    reader.close()
    train_cfg = TrainConfig(
        micro_batch_size=micro_batch,
        mini_batch_size=micro_batch,
        prompts_per_round=micro_batch,
        lr=1e-5,
        warmup_steps=0,
    )
    return SFTTrainer(model, train_cfg, total_steps=10**6, use_distributed_optimizer=False, pad_id=0)


def _megatron_step(trainer, samples) -> Callable[[], object]:
    return lambda: trainer.step(samples)


def _transformers_step(hf_dir: str, samples, device: torch.device) -> Callable[[], object]:
    """What a plain transformers user writes: SDPA, AdamW (fused on CUDA), clipping."""
    from transformers import AutoModelForCausalLM

    from sept_megatron.trainer import model as mdl

    dtype = mdl.resolve_dtype("auto")
    model = (
        AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=dtype, attn_implementation="sdpa", local_files_only=True
        )
        .to(device)
        .train()
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=device.type == "cuda")
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


def bench_train(opts: BenchOptions, inputs: Inputs) -> dict:
    from sept_megatron.runtime.distributed import compute_device
    from sept_megatron.trainer import model as mdl

    device = compute_device()
    arch = arch_of(inputs.hf_dir)
    mb, seq = opts.micro_batch, opts.seq_len
    samples = random_samples(arch.vocab_size, mb, seq, seed=0)
    log_progress(f"train: our trainer and the transformers baseline, micro-batch {mb} x {seq}")
    if device.type == "cpu":
        trainer, times, peaks = _train_times_cpu(opts, inputs, samples, device)
    else:
        trainer, times, peaks = _train_times_gpu(opts, inputs, samples, device)
    tokens = mb * seq
    per_token = flops_per_token(arch, inputs.params, seq)
    result = {
        "bench": "train",
        "shape": opts.shape,
        "device": str(device),
        "dtype": str(mdl.resolve_dtype("auto")).removeprefix("torch."),
        "transformer_impl": "transformer_engine" if mdl.use_transformer_engine("auto") else "local",
        "seq_len": seq,
        "micro_batch": mb,
        "params": inputs.params,
        "steps": opts.steps,
        "flops_per_token": per_token,
        "flops_formula": "6*N + 12*L*H*Dh*S (PaLM appendix B)",
        **_throughput("", times["ours"], tokens, per_token, inputs.params),
        **_throughput("transformers_", times["transformers"], tokens, per_token, inputs.params),
        "ratio_to_transformers": (
            ratio_of(best(times["ours"]), best(times["transformers"]))
            if times["ours"] and times["transformers"]
            else None
        ),
        "peak_memory_gb": peaks["ours"],
        "transformers_peak_memory_gb": peaks["transformers"],
    }
    if device.type == "cpu":
        result["max_micro_batch"] = None
        result["max_micro_batch_skipped"] = "CPU: no device memory limit to search"
    elif opts.find_max_micro_batch:
        log_progress("train: searching the largest micro-batch that fits")
        result["max_micro_batch"] = largest_fitting(
            lambda m: _fits(trainer, arch.vocab_size, m, seq), start=mb, limit=4096
        )
    trainer = None  # free it (the lambda above holds the name) before the baseline runs
    free_memory()
    result["fp8"] = _fp8_side_by_side(opts, inputs, samples, device)
    return result


def _throughput(prefix: str, times: list[float] | None, tokens: int, per_token: float, params: int) -> dict:
    """Step seconds (best of the timed steps), tokens/s and TFLOP/s of one side; nulls and ``oom`` if it did
    not fit."""
    if not times:
        return {f"{prefix}step_s": None, f"{prefix}tokens_per_s": None, f"{prefix}oom": True}
    step_s = best(times)
    row = {
        f"{prefix}step_s": step_s,
        f"{prefix}tokens_per_s": tokens / step_s,
        f"{prefix}tflops": per_token * tokens / step_s / 1e12,
    }
    if not prefix:
        row["tflops_6n"] = 6.0 * params * tokens / step_s / 1e12
    return row


def _train_times_cpu(opts: BenchOptions, inputs: Inputs, samples, device):
    """Both sides built at once and interleaved step by step. The baseline runs without the
    CUDA->CPU redirect, as a plain transformers user's code does; ours runs with it."""
    from sept_megatron.runtime import compat

    with compat.suspended():
        theirs = _transformers_step(inputs.hf_dir, samples, device)

    def theirs_plain():
        with compat.suspended():
            theirs()

    trainer = build_trainer(inputs.hf_dir, opts.micro_batch)
    times = side_by_side(
        {"ours": _megatron_step(trainer, samples), "transformers": theirs_plain},
        warmup=opts.warmup,
        repeats=opts.steps,
        device=device,
        interleave=True,
    )
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
    free_memory()
    _reset_peak(device)
    trainer = build_trainer(inputs.hf_dir, opts.micro_batch)
    times["ours"] = _times_unless_oom(_megatron_step(trainer, samples), opts, device)
    peaks["ours"] = _peak_memory_gb(device)
    return trainer, times, peaks


def _times_unless_oom(step: Callable[[], object], opts: BenchOptions, device) -> list[float] | None:
    out_of_memory = False
    try:
        return side_by_side(
            {"x": step}, warmup=opts.warmup, repeats=opts.steps, device=device, interleave=False
        )["x"]
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True
    if out_of_memory:  # outside the handler: the traceback's tensors are released
        free_memory()
        log_progress(f"train: out of memory at micro-batch {opts.micro_batch}")
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
    trainer.cfg = dataclasses.replace(trainer.cfg, micro_batch_size=micro_batch, mini_batch_size=micro_batch)
    out_of_memory = False
    try:
        trainer.step(random_samples(vocab, micro_batch, seq_len, seed=micro_batch))
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True  # the traceback (and its tensors) is gone once we leave except
    free_memory()
    log_progress(f"train: micro-batch {micro_batch}: {'OOM' if out_of_memory else 'fits'}")
    return not out_of_memory


def _fp8_side_by_side(opts: BenchOptions, inputs: Inputs, samples, device) -> dict:
    """Issue 10: each FP8 recipe vs BF16, both through Transformer Engine layers, on the same
    samples and steps (``--seq-len`` is a multiple of 16, so FP8's padding adds nothing). A
    recipe this machine cannot run is skipped with :mod:`sept_megatron.trainer.fp8`'s reason."""
    from sept_megatron.trainer.fp8 import fp8_shape_problems, fp8_unsupported_reason

    if device.type != "cuda":
        return {"skipped": True, "reason": "no CUDA device (FP8 needs Transformer Engine on a GPU)"}
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return {
            "skipped": True,
            "reason": "Transformer Engine is not installed (pip install 'sept_megatron[gpu]')",
        }
    rows: dict[str, dict] = {}
    for recipe in (None, *FP8_RECIPES):
        label = recipe or "bf16"
        problems = [fp8_unsupported_reason(recipe)] if recipe else []
        problems += fp8_shape_problems(arch_of(inputs.hf_dir), 1) if recipe else []
        if any(problems):
            rows[label] = {"skipped": True, "reason": "; ".join(filter(None, problems))}
            continue
        log_progress(f"train: Transformer Engine {label}")
        try:
            trainer = build_trainer(
                inputs.hf_dir, opts.micro_batch, transformer_impl="transformer_engine", fp8=recipe
            )
            times = _times_unless_oom(_megatron_step(trainer, samples), opts, device)
            del trainer
            rows[label] = (
                {"step_s": best(times), "tokens_per_s": opts.micro_batch * opts.seq_len / best(times)}
                if times
                else {"oom": True}
            )
        except Exception as exc:  # reported in the JSON line; the BF16 figures above stand
            rows[label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            log_progress(f"train: Transformer Engine {label} failed: {rows[label]['error']}")
        free_memory()
    bf16 = rows["bf16"].get("tokens_per_s")
    for recipe in FP8_RECIPES:
        if bf16 and "tokens_per_s" in rows[recipe]:
            rows[recipe]["ratio_to_bf16"] = rows[recipe]["tokens_per_s"] / bf16
    return rows
