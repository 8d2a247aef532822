"""Two ranks (torchrun --nproc-per-node=2), two one-rank engines: rank 0's engine takes 20 s to
answer, rollout.timeout_minutes is 0.05 (3 s). Rank 1 answers at once and waits for rank 0;
its wait must fail in about 3 s with an error naming engine group (0,) and what it was doing
(were the wait on the default group, whose timeout is 30 minutes, it would simply wait).
Each rank prints ``ERROR <message>`` or ``DONE`` and the seconds it took.
"""

import os
import time

import torch.distributed as dist

from sept_megatron.config import RolloutConfig
from sept_megatron.rollout import backend_kwargs
from sept_megatron.rollout.base import Generation, SamplingParams
from sept_megatron.rollout.orchestration import DataParallelEngines
from sept_megatron.rollout.placement import build_placement


class SlowEngine:
    shard_sequences = 1

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def generate(self, prompts, sampling):
        time.sleep(self.delay_s)
        return [[Generation(token_ids=[1], text="a", finish_reason="stop")] * sampling.n for _ in prompts]


dist.init_process_group("gloo")
rank = dist.get_rank()
placement = build_placement(1, timeout_minutes=0.05)
assert dist.get_backend(placement.cpu_group) == "gloo" and dist.get_backend(placement.wait_group) == "gloo"
sglang = backend_kwargs(
    RolloutConfig(backend="sglang"),
    tokenizer=None,
    seed=0,
    device="cpu",
    dtype=None,
    progress=False,
    placement=placement,
)
assert sglang["process_group"] is placement.cpu_group, "SGLang's group waits must use gloo"
engines = DataParallelEngines(placement, SlowEngine(20.0 if rank == 0 else 0.0))
start = time.monotonic()
try:
    engines.generate([[5, 6]] * 8, SamplingParams(temperature=1.0, n=1, max_new_tokens=4))
    print(f"rank {rank} DONE {time.monotonic() - start:.1f}", flush=True)
except RuntimeError as error:
    print(f"rank {rank} ERROR {time.monotonic() - start:.1f} {error}", flush=True)
os._exit(0)  # a peer may already be gone: no teardown collectives
