"""Same-device sync: trainer and engine on one device, TP = PP = 1 (one GPU per replica, or
one CPU process), engine in this process.

No bucket and no gather: every HF tensor of the engine receives its Megatron counterpart by one
``torch._foreach_copy_`` over views worked out from the plan (fused QKV split into q, k and v
by query group, gate/up into its halves, the padded vocabulary cut to the real one: the same
:func:`~sept_megatron.weight_sync.plan.piece_source` / ``piece_target`` views the bucket path
uses, so both paths write the same bytes). The copy casts where the engine keeps another dtype.
"""

from __future__ import annotations

import torch

from sept_megatron.rollout.base import InPlaceWeightEngine
from sept_megatron.trainer.model import MegatronModel
from sept_megatron.weight_sync.gather import live_params
from sept_megatron.weight_sync.plan import cached_plan, piece_source, piece_target, tp_pieces


def can_sync_in_place(model: MegatronModel, engine, weights: str) -> bool:
    """Whether :func:`same_device_sync` serves this rank (decided locally: with TP = PP = 1 a
    replica is this rank alone, so no other rank needs to agree)."""
    from megatron.core import parallel_state as ps

    if weights != "native" or not isinstance(engine, InPlaceWeightEngine):
        return False
    if ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
        return False
    first = next(iter(engine.weight_tensors().values()))
    return first.device == next(iter(live_params(model).values())).device


def same_device_sync(model: MegatronModel, engine: InPlaceWeightEngine) -> int:
    """Copy every trainer tensor straight into the engine's; returns the tensors written."""
    plan = cached_plan(model.arch, 1, None)
    params = live_params(model)
    engine_tensors = engine.weight_tensors()
    targets, sources = [], []
    for item in plan:
        shard = params[item.megatron_name]
        for piece in tp_pieces(item, 1, 0, model.padded_vocab):
            source = piece_source(item, piece, shard, model.arch)
            hf_tensor = engine_tensors[item.hf_names[piece.hf_index]]
            targets.append(piece_target(hf_tensor, piece, source.shape))
            sources.append(source)
    with torch.no_grad():
        torch._foreach_copy_(targets, sources)
    return len(targets)
