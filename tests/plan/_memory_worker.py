"""Measure the peak memory of real SFT steps, for tests/plan/test_memory_estimate.py.

    python tests/plan/_memory_worker.py --hf-dir DIR --micro-batch 4 --prompt 64 --response 192 \
        --out result.json [--device cpu|cuda] [--params-dtype float32] [--steps 2] \
        [--attention sdpa|unfused] [--recompute none|selective|full]

One process (TP = PP = DP = 1): a random-init Megatron model built from ``DIR/config.json``,
``SFTTrainer`` (Megatron DDP, the optimizer, the schedule, our loss), ``--steps`` optimizer steps
on random tokens of exactly prompt + response length. The second step is the peak: Adam's
moments exist from the first step on.

How the peak is measured:
- CPU: ``torch.profiler`` with ``profile_memory=True`` reports every allocation and free of the
  c10 CPU allocator (all tensor storage, from every thread) as a signed ``[memory]`` event; the
  peak is the maximum of their running sum in time order. The window opens before the model is
  built, so weights, gradient buffers, optimizer state and activations are all inside it.
- CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's exact count of live
  tensor bytes), reset after process-group start.
"""

from __future__ import annotations

import argparse
import json
import random


def measure(args) -> dict:

    from sept_megatron.config import TrainConfig
    from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
    from sept_megatron.runtime import distributed
    from sept_megatron.trainer import model as mdl
    from sept_megatron.trainer.sft import Sample, SFTTrainer

    distributed.initialize(tensor_parallel=1, pipeline_parallel=1, device=args.device)
    arch = arch_from_hf_config(load_hf_config(args.hf_dir))
    on_gpu = args.device == "cuda"
    profiler = _start(on_gpu)
    model = mdl.build_megatron_model(
        arch,
        tensor_parallel=1,
        pipeline_parallel=1,
        params_dtype=mdl.resolve_dtype(args.params_dtype),
        transformer_impl=args.transformer_impl,
        attention=args.attention,
        recompute=args.recompute,
        padded_vocab=mdl.padded_vocab_size(arch.vocab_size, 128, 1),
    )
    train_cfg = TrainConfig(
        micro_batch_size=args.micro_batch,
        mini_batch_size=args.micro_batch,
        prompts_per_round=args.micro_batch,
        lr=1e-5,
        warmup_steps=0,
        recompute=args.recompute,
    )
    trainer = SFTTrainer(model, train_cfg, total_steps=args.steps, use_distributed_optimizer=False, pad_id=0)
    rng = random.Random(0)
    samples = [
        Sample(
            [rng.randrange(1, arch.vocab_size) for _ in range(args.prompt)],
            [rng.randrange(1, arch.vocab_size) for _ in range(args.response)],
        )
        for _ in range(args.micro_batch)
    ]
    losses = [trainer.step(samples)["train/loss"] for _ in range(args.steps)]
    peak = _stop(profiler, on_gpu)
    distributed.shutdown()
    return {"peak_bytes": peak, "losses": losses}


def _start(on_gpu: bool):
    import torch

    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return None
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    profiler.__enter__()
    return profiler


def _stop(profiler, on_gpu: bool) -> int:
    import torch

    if on_gpu:
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    profiler.__exit__(None, None, None)
    events = [
        e
        for e in profiler.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU"
    ]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--micro-batch", type=int, required=True)
    parser.add_argument("--prompt", type=int, required=True)
    parser.add_argument("--response", type=int, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--params-dtype", default="float32")
    parser.add_argument("--transformer-impl", default="local")
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--recompute", default="none")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.out, "w") as f:
        json.dump(measure(args), f)


if __name__ == "__main__":
    main()
