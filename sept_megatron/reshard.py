"""Megatron layout -> full HF tensors for the rollout engine, every round.

Two parts, kept apart so the first can be tested without any process group:

- the *plan* (:func:`sync_plan`, :func:`plan_buckets`): which pipeline stage owns which HF
  tensor, in a fixed order, cut into per-stage, per-dtype buckets of at most ``bucket_bytes``;
- the *transport* (:func:`stream_hf_buckets`): on each stage, the data-parallel rank 0 replica
  all-gathers its TP shards (other DP replicas send nothing), joins them with the same adapter
  the HF export uses, flattens the bucket into one buffer, and the stage leader sends it
  point-to-point to global rank 0, where the engine lives. Rank 0 yields ``[(hf_name, tensor)]``
  buckets; at most one bucket is ever materialised, never the whole model.

Data path (hf backend, CPU or one GPU): stage leader --gloo/NCCL send--> rank 0 -->
``engine.update_weights``. An SGLang transport (CUDA IPC handles per bucket) plugs in at the
same place: it consumes the same bucket stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from sept_megatron.convert.adapters import (
    TensorRule, adapter_for, canonical_name, full_to_hf, tp_join)
from sept_megatron.convert.fp8 import rollout_bucket_transform
from sept_megatron.convert.hf_import import expected_hf_shapes, layer_offset
from sept_megatron.distributed import compute_device
from sept_megatron.model import MegatronModel, ModelArch


@dataclass(frozen=True)
class SyncItem:
    """One Megatron parameter to send: its rule, layer, owning stage and HF output shapes."""

    rule: TensorRule
    layer: int | None
    stage: int
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.hf_shapes)

    @property
    def megatron_name(self) -> str:
        return self.rule.megatron.format(i=self.layer) if self.layer is not None else self.rule.megatron


def stage_layers(num_layers: int, pipeline_parallel: int,
                 virtual_pipeline: int | None = None) -> list[list[int]]:
    """Global layer indices of each pipeline stage, as Megatron splits them evenly (with
    virtual stages, chunk v of stage s holds block v * pp + s)."""
    chunks = pipeline_parallel * (virtual_pipeline or 1)
    per_chunk = num_layers // chunks
    stages: list[list[int]] = [[] for _ in range(pipeline_parallel)]
    for block in range(chunks):
        stages[block % pipeline_parallel] += list(range(block * per_chunk, (block + 1) * per_chunk))
    return stages


def sync_plan(arch: ModelArch, pipeline_parallel: int,
              virtual_pipeline: int | None = None) -> list[SyncItem]:
    """Every HF tensor of the model, once, with the stage that owns it (pure function)."""
    adapter = adapter_for(arch)
    shapes = expected_hf_shapes(arch)
    last = pipeline_parallel - 1

    def item(rule: TensorRule, layer: int | None, stage: int) -> SyncItem:
        names = tuple(n.format(i=layer) if layer is not None else n for n in rule.hf)
        return SyncItem(rule, layer, stage, names, tuple(shapes[n] for n in names))

    plan = [item(r, None, 0) for r in adapter.pre_rules()]
    for stage, layers in enumerate(stage_layers(arch.num_layers, pipeline_parallel,
                                                virtual_pipeline)):
        plan += [item(r, i, stage) for i in layers for r in adapter.layer_rules()]
    return plan + [item(r, None, last) for r in adapter.post_rules()]


def plan_buckets(plan: list[SyncItem], bucket_bytes: int, element_size: int) -> list[list[SyncItem]]:
    """Consecutive items of one stage, up to ``bucket_bytes`` each (an oversized tensor alone)."""
    buckets: list[list[SyncItem]] = []
    current: list[SyncItem] = []
    size = 0
    for it in plan:
        nbytes = it.numel * element_size
        if current and (it.stage != current[0].stage or size + nbytes > bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append(it)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


# --- transport ---------------------------------------------------------------------------
def _live_params(model: MegatronModel) -> dict[str, torch.Tensor]:
    """Canonical Megatron name -> this rank's parameter shard."""
    params = {}
    for chunk in model.chunks:
        module = chunk
        while hasattr(module, "module"):
            module = module.module
        offset = layer_offset(module)
        for name, param in module.named_parameters():
            canonical = canonical_name(name, offset)
            if canonical is not None:
                params[canonical] = param
    return params


def _gather_full(shard: torch.Tensor, rule: TensorRule) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return shard.detach()
    parts = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(parts, shard.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return tp_join(rule.kind, parts)


def _stage_leaders() -> dict[int, int]:
    """Stage -> global rank of its (tp 0, dp 0) member, as every rank agrees."""
    from megatron.core import parallel_state as ps

    is_leader = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    mine = (ps.get_pipeline_model_parallel_rank(), dist.get_rank()) if is_leader else None
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return dict(filter(None, everyone))


def stream_hf_buckets(model: MegatronModel, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Collective over all ranks: rank 0 yields HF-named buckets; every other rank yields
    nothing but must exhaust the iterator (it takes part in gathers and sends)."""
    from megatron.core import parallel_state as ps

    arch = model.arch
    plan = sync_plan(arch, ps.get_pipeline_model_parallel_world_size(),
                     ps.get_virtual_pipeline_model_parallel_world_size())
    dtype = model.config.params_dtype
    element_size = torch.empty((), dtype=dtype).element_size()
    single = not dist.is_initialized() or dist.get_world_size() == 1
    my_stage = ps.get_pipeline_model_parallel_rank()
    in_dp0 = ps.get_data_parallel_rank() == 0
    params = _live_params(model)
    leaders = {0: 0} if single else _stage_leaders()
    rank = 0 if single else dist.get_rank()
    for bucket in plan_buckets(plan, bucket_bytes, element_size):
        stage, leader = bucket[0].stage, leaders[bucket[0].stage]
        holds_shards = stage == my_stage and in_dp0  # DP replicas other than 0 send nothing
        if rank != 0 and not holds_shards:
            continue
        flat = None
        if holds_shards:
            tensors = [t for it in bucket for t in
                       full_to_hf(it.rule, _gather_full(params[it.megatron_name], it.rule), arch)]
            flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        if rank == leader and leader != 0:
            dist.send(flat.contiguous(), dst=0)
        elif rank == 0:
            if leader != 0:
                flat = torch.empty(sum(it.numel for it in bucket), dtype=dtype,
                                   device=compute_device())
                dist.recv(flat, src=leader)
            yield _unflatten(bucket, flat)


def _unflatten(bucket: list[SyncItem], flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    out, start = [], 0
    for it in bucket:
        for name, shape in zip(it.hf_names, it.hf_shapes):
            n = int(torch.Size(shape).numel())
            out.append((name, flat[start: start + n].view(shape)))
            start += n
    return out


def sync_weights(model: MegatronModel, engine, bucket_bytes: int, *,
                 weights: str = "native") -> int:
    """Push the trainer's current weights into the engine on rank 0; returns buckets sent.
    ``weights`` is ``rollout.weights``: ``fp8`` quantises each bucket on rank 0 (linear
    weights -> e4m3 + ``weight_scale_inv``, the export's quantiser)."""
    stream = rollout_bucket_transform(weights, model.arch)(stream_hf_buckets(model, bucket_bytes))
    if engine is None:
        return sum(1 for _ in stream)
    count = 0

    def counted():
        nonlocal count
        for bucket in stream:
            count += 1
            yield bucket

    engine.update_weights(counted())
    for _ in stream:  # keep collective order even if the engine stopped early
        pass
    return count
