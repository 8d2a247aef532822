"""SGLang servers of their own (``rollout.placement=disaggregated``): an NCCL broadcast per
pipeline stage into every server's TP ranks.

Data path of a sync (:func:`sync_weights_to_servers`, collective over all trainer ranks):
trainer rank 0 opens a weight-update session on every server (``/begin_weight_update``).
Then, one pipeline stage at a time, the ranks of data-parallel replica 0 stream that stage's
full HF buckets to the stage's (tp 0, dp 0) rank through the gather path every mechanism
uses (:func:`~sept_megatron.weight_sync.gather.stream_hf_buckets`); that rank packs each
bucket with SGLang's ``FlattenedTensorBucket`` and broadcasts the flat byte buffer over its
own group (rank 0 = that trainer rank, then every server's TP ranks, joined once through
``/init_weights_update_group``) while each server receives it in
``/update_weights_from_distributed`` (``load_format="flattened_bucket"``). Stages take turns:
a server handles one such request at a time, so two stages broadcasting at once deadlock.
Rank 0 finally closes the session (``/end_weight_update``, which finalises FP8 layouts) and
flushes the servers' caches. Every HTTP call that pairs with a collective runs in a thread
while this process joins the collective.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from sept_megatron.convert.fp8 import rollout_bucket_transform
from sept_megatron.rollout.base import ServerWeightEngine, WeightBucket
from sept_megatron.rollout.sglang_remote import address_towards
from sept_megatron.runtime.distributed import free_port
from sept_megatron.weight_sync.gather import stream_hf_buckets

logger = logging.getLogger(__name__)

# engine -> {group name -> the process group {this trainer rank, every server's TP ranks}}
_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def connect(
    engine: ServerWeightEngine,
    group_name: str,
    *,
    master_address: str | None = None,
    master_port: int | None = None,
):
    """Create (once per engine) the group {this process = rank 0, every server's TP ranks}."""
    groups = _GROUPS.setdefault(engine, {})
    if group_name in groups:
        return groups[group_name]
    from sglang.srt.utils import init_custom_process_group

    backend = engine.weight_backend
    address = master_address or address_towards(engine.clients[0].url)
    port = master_port or free_port()
    sizes = [client.tp_size() for client in engine.clients]
    world = 1 + sum(sizes)
    offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
    joins = [
        lambda c=c, o=o: c.checked(
            "init_weights_update_group",
            {
                "master_address": address,
                "master_port": port,
                "rank_offset": o,
                "world_size": world,
                "group_name": group_name,
                "backend": backend,
            },
        )
        for c, o in zip(engine.clients, offsets)
    ]
    with ThreadPoolExecutor(max_workers=len(joins)) as pool:
        futures = [pool.submit(join) for join in joins]
        group = init_custom_process_group(
            backend=backend,
            init_method=f"tcp://{address}:{port}",
            world_size=world,
            rank=0,
            group_name=group_name,
        )
        for future in futures:
            future.result()
    logger.info("weight group %s: this rank + %d server ranks", group_name, world - 1)
    groups[group_name] = group
    return group


def broadcast_buckets(
    engine: ServerWeightEngine,
    buckets: Iterable[WeightBucket],
    group_name: str,
    device: torch.device | None = None,
) -> int:
    """Send buckets over a connected group, inside an open session; returns the count."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    group = _GROUPS[engine][group_name]
    count = 0
    for bucket in buckets:
        named = [(name, t.detach().to(device) if device is not None else t.detach()) for name, t in bucket]
        flat = FlattenedTensorBucket(named_tensors=named).get_flattened_tensor()
        request = {
            "names": [n for n, _ in named],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in named],
            "shapes": [list(t.shape) for _, t in named],
            "group_name": group_name,
            "flush_cache": False,
            "load_format": "flattened_bucket",
        }
        with ThreadPoolExecutor(max_workers=len(engine.clients)) as pool:
            futures = [
                pool.submit(c.checked, "update_weights_from_distributed", request) for c in engine.clients
            ]
            dist.broadcast(flat, src=0, group=group)
            for future in futures:
                future.result()
        count += 1
    return count


def send_buckets(engine: ServerWeightEngine, buckets: Iterable[WeightBucket]) -> int:
    """A single-process trainer's sync: begin, broadcast every bucket, end."""
    connect(engine, "sept-stage0")
    engine.begin_update()
    try:
        return broadcast_buckets(engine, buckets, "sept-stage0", _device())
    finally:
        engine.end_update()


def _device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def sync_weights_to_servers(
    model, engine: ServerWeightEngine | None, bucket_bytes: int, *, weights: str = "native"
) -> int:
    """Collective over all trainer ranks; rank 0 and the stage leaders pass their ``engine``
    (others None). ``weights`` is ``rollout.weights`` (fp8: each bucket quantised on its
    leader, as the colocated sync does). Returns the buckets this rank sent."""
    from megatron.core import parallel_state as ps

    rank = dist.get_rank() if dist.is_initialized() else 0
    my_stage = ps.get_pipeline_model_parallel_rank()
    in_replica_0 = ps.get_data_parallel_rank() == 0
    is_leader = in_replica_0 and ps.get_tensor_model_parallel_rank() == 0
    if is_leader and engine is None:
        raise ValueError(f"rank {rank} leads pipeline stage {my_stage} and needs the remote engine")
    if rank == 0:
        engine.begin_update()
    sent = 0
    for stage in range(ps.get_pipeline_model_parallel_world_size()):
        if in_replica_0:
            receive = is_leader and stage == my_stage
            stream = rollout_bucket_transform(weights, model.arch)(
                stream_hf_buckets(model, bucket_bytes, receive=receive, stage=stage)
            )
            if receive:
                name = f"sept-stage{stage}"
                connect(engine, name)
                sent = broadcast_buckets(engine, stream, name, _device())
            else:
                for _ in stream:  # this rank's pieces go to the stage's leader
                    pass
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # one stage at a time: servers serve one update request at a time
    if rank == 0:
        engine.end_update()
    return sent
