"""``sync``: :func:`~sept_megatron.weight_sync.sync` into a real engine at TP=``--sync-tp`` vs a same-device copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sept_megatron.bench.common import Inputs, arch_of, best, log_progress, ratio_of, side_by_side, timed_call
from sept_megatron.bench.options import BenchOptions


def bench_sync(opts: BenchOptions, inputs: Inputs) -> dict:
    """Launch ``--sync-tp`` ranks under torchrun (or run in this process for TP=1)."""
    result_path = os.path.join(inputs.work_dir, "sync_result.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    if opts.sync_tp == 1:
        return run_sync_worker(opts, inputs.hf_dir, result_path)
    from sept_megatron.runtime.distributed import free_port

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={opts.sync_tp}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "sept_megatron.bench",
        *_worker_flags(opts),
        "--sync-worker",
        inputs.hf_dir,
        result_path,
    ]
    log_progress(f"sync: launching {opts.sync_tp} ranks: torchrun --nproc-per-node={opts.sync_tp}")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), SEPT_DEVICE=opts.device)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, env=env)
    if proc.returncode != 0 or not os.path.isfile(result_path):
        raise RuntimeError(
            f"the sync benchmark's torchrun launch failed (exit code {proc.returncode}); its output is above"
        )
    return json.loads(Path(result_path).read_text())


def _worker_flags(opts: BenchOptions) -> list[str]:
    return [
        "--shape",
        opts.shape,
        "--device",
        opts.device,
        "--repeats",
        str(opts.repeats),
        "--sync-tp",
        str(opts.sync_tp),
        "--only",
        "sync",
    ]


def run_sync_worker(opts: BenchOptions, hf_dir: str, result_path: str) -> dict:
    """One rank of the sync benchmark: Megatron at TP=``sync_tp`` holding the HF weights,
    an engine on rank 0, ``repeats`` timed syncs, then the same-device copy baseline."""
    import torch.distributed as dist

    from sept_megatron.convert import HFTensorReader, load_hf_into_model
    from sept_megatron.runtime import compat, distributed
    from sept_megatron.trainer import model as mdl
    from sept_megatron.weight_sync import sync
    from sept_megatron.weight_sync.plan import sync_plan

    tp = opts.sync_tp
    distributed.initialize(tensor_parallel=tp, pipeline_parallel=1, device=opts.device)
    rank = dist.get_rank()
    device = distributed.compute_device()
    arch = arch_of(hf_dir)
    padded = mdl.padded_vocab_size(arch.vocab_size, 128, tp)
    params_dtype = mdl.resolve_dtype("auto")
    model = mdl.build_megatron_model(
        arch, tensor_parallel=tp, pipeline_parallel=1, params_dtype=params_dtype, padded_vocab=padded
    )
    from megatron.core import parallel_state as ps

    reader = HFTensorReader(hf_dir)
    load_hf_into_model(
        model.chunks,
        reader,
        arch,
        padded_vocab=padded,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=tp,
    )
    reader.close()
    engine = None
    if rank == 0:  # the engine lives on rank 0 only (other ranks need not import transformers)
        from sept_megatron.rollout.hf import HFRolloutEngine

        with compat.suspended():
            engine = HFRolloutEngine(hf_dir, device=device, dtype=params_dtype, progress=False)
    bucket_bytes = 512 << 20  # rollout.bucket_size_mb's default
    nbytes = sum(item.numel for item in sync_plan(arch, 1)) * params_dtype.itemsize

    def one_sync():
        sync(model, engine, bucket_bytes=bucket_bytes)

    # Every timed call starts with the ranks lined up by a barrier outside the timed region:
    # the time is the sync's own, not a wait for a rank still busy with the previous call.
    times = _aligned_times(one_sync, warmup=1, repeats=opts.repeats, device=device)
    from sept_megatron.weight_sync.direct import engine_weights_of
    from sept_megatron.weight_sync.same_device import can_sync_in_place

    path = "buckets"
    if engine_weights_of(model) is not None:
        path = "direct"  # CPU ranks of one host: engine weights in the replica's shared buffer
    elif tp == 1 and can_sync_in_place(model, engine, "native"):
        path = "same_device"  # one GPU: trainer tensors copied straight into the engine's
    bucket_times = _aligned_times(  # the bucket stream, side by side (the GPU path)
        lambda: sync(model, engine, bucket_bytes=bucket_bytes, direct=False),
        warmup=1,
        repeats=opts.repeats,
        device=device,
    )
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
            "bench": "sync",
            "shape": opts.shape,
            "device": str(device),
            "tensor_parallel": tp,
            "backend": dist.get_backend(),
            "dtype": str(params_dtype).removeprefix("torch."),
            "bytes": nbytes,
            "tensors": sum(len(item.hf_names) for item in sync_plan(arch, 1)),
            "repeats": opts.repeats,
            "path": path,
            "sync_s": sync_s,
            "gb_per_s": nbytes / sync_s / 1e9,
            "copy_s": copy_s,
            "copy_gb_per_s": nbytes / copy_s / 1e9,
            "ratio_to_copy": ratio_of(sync_s, copy_s),
            "tensor_copy_s": tensor_copy_s,
            "ratio_to_tensor_copy": ratio_of(sync_s, tensor_copy_s),
            "bucket_sync_s": best(bucket_times),
            "ratio_bucket_to_copy": ratio_of(best(bucket_times), copy_s),
            "barrier_s": barrier_s,
            "profile": profile,
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
        elapsed = timed_call(fn, device)
        if index >= warmup:
            times.append(elapsed)
    return times


def _copy_baselines(engine, arch, nbytes: int, device, repeats: int) -> tuple[float, float]:
    """Seconds of (one flat same-device copy of ``nbytes``, the engine loading the same HF
    tensors from same-device copies): the bandwidth bound, and the receiving side alone."""
    from sept_megatron.weight_sync.plan import sync_plan

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    names = {name for item in sync_plan(arch, 1) for name in item.hf_names}
    tensors = [(name, t.detach().clone()) for name, t in engine._named_tensors().items() if name in names]
    times = side_by_side(
        {"copy": lambda: dst.copy_(src), "tensors": lambda: engine.update_weights([tensors])},
        warmup=1,
        repeats=repeats,
        device=device,
        interleave=True,
    )
    return best(times["copy"]), best(times["tensors"])


def _profile_sync(one_sync: Callable[[], object], top: int = 10) -> dict:
    """Where rank 0's time goes in one sync (cProfile; the timed syncs run without it):
    ``own`` = functions by time spent in themselves (collective waits, copies, Python),
    ``within`` = our own weight-sync / engine functions by cumulative time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(one_sync)
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, calls, own, cumulative, _)

    def label(key) -> str:
        path, _, name = key
        if path == "~":
            return name
        module = Path(path).parent.name if Path(path).stem == "__init__" else Path(path).stem
        return f"{module}.{name}"

    def row(key, value) -> dict:
        return {"fn": label(key), "calls": value[1], "own_s": value[2], "cumulative_s": value[3]}

    by_own = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    ours = [
        (k, v)
        for k, v in stats.items()
        if any(
            part in k[0]
            for part in ("sept_megatron/weight_sync", "sept_megatron/rollout", "sept_megatron/convert")
        )
    ]
    within = sorted(ours, key=lambda kv: kv[1][3], reverse=True)[:top]
    return {"wall_s": wall, "own": [row(k, v) for k, v in by_own], "within": [row(k, v) for k, v in within]}
