"""Distributed start-up: torchrun or SLURM environment -> Megatron process groups.

Launch with ``torchrun --nproc-per-node=N ...`` (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR set)
or ``srun`` under sbatch (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; MASTER_ADDR from the first
host of SLURM_JOB_NODELIST, which our sbatch example exports). A plain ``python`` run is a
world of one. NCCL on GPU, gloo on CPU, where :mod:`sept_megatron.runtime.compat` is switched on first.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from sept_megatron.runtime import compat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: str


def launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Read the launcher's environment: torchrun's variables win over SLURM's."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    port = env.get("MASTER_PORT") or (free_port() if world == 1 else "29500")
    return LaunchEnv(rank, world, local, env.get("MASTER_ADDR", "127.0.0.1"), str(port))


def free_port() -> int:
    """A world of one needs no agreed port: take one nobody listens on, so two plain runs on
    one machine (or a test beside a job) never collide on 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def world_size_from_env() -> int:
    return launch_env().world_size


DEVICE_ENV = "SEPT_DEVICE"
"""Overrides ``parallel.device=auto`` (tests set it to ``cpu`` so that CPU-path tests stay on
CPU/gloo on a GPU machine)."""


def resolve_device(setting: str = "auto") -> str:
    """``parallel.device`` -> ``"cuda"`` or ``"cpu"``; auto follows SEPT_DEVICE, then the GPU."""
    if setting == "auto":
        setting = os.environ.get(DEVICE_ENV, "auto") or "auto"
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting not in ("cuda", "cpu"):
        raise ValueError(f"parallel.device (or ${DEVICE_ENV})={setting!r}: choose auto, cuda or cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "parallel.device=cuda but no CUDA device is visible; use "
            "parallel.device=cpu (or auto) on this machine"
        )
    return setting


def compute_device() -> torch.device:
    """The device this rank's model and collectives use: ``cuda:<local rank>`` on GPU, the CPU
    under the compatibility layer. Every tensor that meets the model or a collective is made
    on (or moved to) this device explicitly."""
    if compat.cpu_megatron_enabled() or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def initialize(
    *,
    tensor_parallel: int,
    pipeline_parallel: int,
    virtual_pipeline: int | None = None,
    seed: int = 1234,
    backend: str = "auto",
    device: str = "auto",
    timeout_minutes: float = 30,
) -> LaunchEnv:
    """Create the default process group and Megatron's TP/PP/DP groups; seed every RNG.

    ``timeout_minutes`` bounds every collective of every group: a rank whose peer died or hung
    raises (gloo) or is aborted by the NCCL watchdog after that long, instead of hanging."""
    from megatron.core import parallel_state

    env = launch_env()
    on_gpu = resolve_device(device) == "cuda"
    if not on_gpu:
        compat.enable_cpu_megatron(force=True)
    backend = init_world(on_gpu, backend, timeout_minutes)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            virtual_pipeline_model_parallel_size=virtual_pipeline,
            distributed_timeout_minutes=timeout_minutes,  # TP/PP/DP groups fail in time too
        )
    set_seed(seed)
    log.info(
        "rank %d/%d: TP=%d PP=%d DP=%d backend=%s",
        env.rank,
        env.world_size,
        tensor_parallel,
        pipeline_parallel,
        parallel_state.get_data_parallel_world_size(),
        backend,
    )
    return env


def init_world(on_gpu: bool, backend: str = "auto", timeout_minutes: int = 30) -> str:
    """The default process group only (no Megatron groups: the eval CLI needs no more); on
    GPU each rank takes ``cuda:<local rank>``. Returns the backend."""
    env = launch_env()
    if backend == "auto":
        backend = "nccl" if on_gpu else "gloo"
    if on_gpu:
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", env.master_port)
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return backend


def set_seed(seed: int) -> None:
    """Same seed on every rank for data; Megatron's tracker gives TP ranks distinct streams."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        _cpu_model_parallel_seed(seed)


def _cpu_model_parallel_seed(seed: int) -> None:
    # Mirrors model_parallel_cuda_manual_seed: a per-TP-rank stream for dropout/init forks.
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + 100 + tp_rank + ep_rank * 7)


def shutdown(*, keep_process_group: bool = False) -> None:
    """Destroy Megatron's groups and the default group (safe to call twice).

    ``keep_process_group=True`` leaves the default group up: a caller that created it (a
    script running several conversions in one launch) still owns it. torch cannot create a
    second default group in one torchrun launch (the store's keys of the first are reused).
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.barrier()
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
