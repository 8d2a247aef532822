"""``round``: real SePT rounds through the loop; the share of each phase."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from sept_megatron.bench.common import Inputs, log_progress
from sept_megatron.bench.options import BenchOptions


def round_config(opts: BenchOptions, inputs: Inputs, run_dir: str):
    from sept_megatron.config import (
        CheckpointConfig,
        Config,
        DataConfig,
        LoggingConfig,
        ModelConfig,
        ParallelConfig,
        RolloutConfig,
        TrainConfig,
    )

    return Config(
        model=ModelConfig(hf_path=inputs.hf_dir),
        parallel=ParallelConfig(device=opts.device),
        rollout=RolloutConfig(batch_size=opts.gen_batch),
        data=DataConfig(train_files=[inputs.train_jsonl], max_response_length=opts.gen_new_tokens),
        train=TrainConfig(
            rounds=opts.rounds,
            prompts_per_round=opts.round_prompts,
            mini_batch_size=opts.round_prompts // 2,
            micro_batch_size=_divisor_at_most(opts.round_prompts // 2, opts.micro_batch),
            lr=1e-5,
            warmup_steps=0,
        ),
        logging=LoggingConfig(run_dir=run_dir, progress=False, wandb_mode=opts.wandb_mode),
        checkpoint=CheckpointConfig(
            save_every_n_rounds=1, keep_last=1, export_hf=False, async_save=opts.async_checkpoint
        ),
    )


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
    return {
        "rounds_measured": len(steady),
        **{f"{p}_s": phases[p] / len(steady) for p in PHASES},
        "round_s": wall / len(steady),
        "loop_timing_round_s": sum(r["timing/round"] for r in steady) / len(steady),
        "other_s": other / len(steady),
        "other_share": other / wall,
    }


def bench_round(opts: BenchOptions, inputs: Inputs) -> dict:
    from sept_megatron.loop.driver import run

    run_dir = os.path.join(inputs.work_dir, "round_run")
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # a fresh run, not a resume
    log_progress(f"round: {opts.rounds} SePT rounds x {opts.round_prompts} prompts")
    run(round_config(opts, inputs, run_dir))
    records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)  # ~18 GB at 1.5b
    return {
        "bench": "round",
        "shape": opts.shape,
        "device": opts.device,
        "rounds": len(records),
        "prompts_per_round": opts.round_prompts,
        "max_new_tokens": opts.gen_new_tokens,
        "async_checkpoint": opts.async_checkpoint,
        "wandb_mode": opts.wandb_mode,
        **round_shares(records),
    }
