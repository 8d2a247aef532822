"""One engine group of two ranks (torchrun --nproc-per-node=2), SGLang's side recorded on rank 0.

Each rank packs its own copy of every bucket; rank 0 (the owner) must hand payload i to SGLang
TP rank i. The copies differ by rank here so the test can see which payload went where. CPU
payloads between independent processes travel through shared-memory files (torch's
"file_system" sharing strategy); on GPUs they are CUDA-IPC handles.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_recorder import RecordingEngine  # noqa: E402

from sept_megatron.rollout.sglang_engine import SGLangRolloutEngine  # noqa: E402
from sept_megatron.weight_sync.sglang_ipc import load_buckets  # noqa: E402

torch.multiprocessing.set_sharing_strategy("file_system")
dist.init_process_group("gloo")
rank = dist.get_rank()
group = dist.new_group([0, 1])
recorder = RecordingEngine(tp_size=2) if rank == 0 else None
engine = SGLangRolloutEngine(None, ranks=(0, 1), process_group=group, engine=recorder)
buckets = [
    [("model.norm.weight", torch.full((3,), float(rank)))],
    [("lm_head.weight", torch.arange(4.0).reshape(2, 2) + 10 * rank)],
]
engine.release_memory()
assert load_buckets(engine, iter(buckets)) == 2
engine.resume_memory()
if rank == 0:
    for tp_rank in (0, 1):
        loaded = recorder.loaded[tp_rank]
        assert torch.equal(loaded["model.norm.weight"], torch.full((3,), float(tp_rank))), loaded
        assert torch.equal(loaded["lm_head.weight"], torch.arange(4.0).reshape(2, 2) + 10 * tp_rank)
    assert recorder.names == [
        "release_memory_occupation",
        "resume_memory_occupation",
        "begin_weight_update",
        "update_weights_from_tensor",
        "update_weights_from_tensor",
        "end_weight_update",
        "flush_cache",
        "resume_memory_occupation",
    ], recorder.names
    assert all(
        len(args["named_tensors"]) == 2
        for name, args in recorder.calls
        if name == "update_weights_from_tensor"
    )
else:
    try:
        engine.generate([[1]], None)
        raise AssertionError("a non-owner rank generated")
    except RuntimeError as error:
        assert "engine owner" in str(error)
dist.barrier()
print(f"rank {rank} OK", flush=True)
dist.destroy_process_group()
