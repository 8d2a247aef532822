"""Two ranks (torchrun --nproc-per-node=2), one engine group: do owner and non-owner agree on
the NCCL / SGLang environment once the owner has constructed its engine?

The job starts with none of the variables set. The SGLang backend's ``prepare_process`` runs on
every rank before ``distributed.initialize``, as in the loop; rank 0 then builds the engine (the recorder mimics ``sglang.Engine``'s own
environment side effects); every rank reports its values. ``--no-sglang-env`` runs without the
project's setting, which must show the disagreement the setting prevents.
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_recorder import RecordingEngine

from sept_megatron.config import RolloutConfig
from sept_megatron.rollout.registry import backend_class
from sept_megatron.rollout.sglang_env import SGLANG_PROCESS_ENV
from sept_megatron.runtime import distributed

for name in SGLANG_PROCESS_ENV:
    os.environ.pop(name, None)
if "--no-sglang-env" not in sys.argv:
    backend_class("sglang").prepare_process(RolloutConfig(backend="sglang"))
env = distributed.initialize(tensor_parallel=1, pipeline_parallel=1, device="cpu")
if env.rank == 0:
    RecordingEngine()  # sglang.Engine(...) on the owner only
mine = {name: os.environ.get(name) for name in SGLANG_PROCESS_ENV}
everyone = [None] * dist.get_world_size()
dist.all_gather_object(everyone, mine)
if env.rank == 0:
    print("ENV " + json.dumps(everyone), flush=True)
distributed.shutdown()
