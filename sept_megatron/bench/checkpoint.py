"""``checkpoint``: seconds a training checkpoint blocks training, foreground vs async."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from sept_megatron.bench.common import Inputs, arch_of, best, log_progress
from sept_megatron.bench.options import BenchOptions
from sept_megatron.bench.train import build_trainer, free_memory, random_samples


def bench_checkpoint(opts: BenchOptions, inputs: Inputs) -> dict:
    from sept_megatron.trainer import checkpoint as ckpt_io
    from sept_megatron.trainer.sft import trainer_sharded_state_dict

    arch = arch_of(inputs.hf_dir)
    trainer = build_trainer(inputs.hf_dir, opts.micro_batch)
    samples = random_samples(arch.vocab_size, opts.micro_batch, opts.seq_len, seed=1)
    trainer.step(samples)  # optimizer state exists, as in a real checkpoint
    meta = ckpt_io.CheckpointMeta(
        arch,
        trainer.model.padded_vocab,
        ckpt_io.torch_dtype_name(trainer.model.config.params_dtype),
        1,
        1,
        train_state={"round": 0},
    )
    root = os.path.join(inputs.work_dir, "checkpoint_bench")
    savers = {
        mode: ckpt_io.CheckpointSaver(async_save=mode == "async", keep_last=0) for mode in ("sync", "async")
    }

    def save(mode: str, index: int) -> tuple[float, float]:
        """(seconds the save call blocked, seconds until the background write was published);
        the checkpoint is deleted afterwards (at 1.5b each one is ~18 GB)."""
        blocked = savers[mode].save(
            root, f"round_{index:06d}", trainer_sharded_state_dict(trainer), meta, inputs.hf_dir
        )
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
            log_progress(
                f"checkpoint: {mode} save {index}: blocked {times[mode][-1][0]:.3f} s"
                + (f", then written in {times[mode][-1][1]:.3f} s" if mode == "async" else "")
            )
    trainer = None  # free it before the next benchmark (the closure above holds the name)
    free_memory()
    sync_s = best(t[0] for t in times["sync"])
    async_s = best(t[0] for t in times["async"])
    return {
        "bench": "checkpoint",
        "shape": opts.shape,
        "bytes_on_disk": max(sizes),
        "repeats": opts.repeats,
        "first_save_s": first_save_s,
        "sync_blocking_s": sync_s,
        "async_blocking_s": async_s,
        "async_background_s": best(t[1] for t in times["async"]),
        "ratio_async_to_sync": async_s / sync_s,
    }
