"""How the trainer's weights reach the rollout engines, every round: :func:`sync`.

One plan, one gather path, one mechanism per way an engine takes weights (the engine declares
which, :mod:`sept_megatron.rollout.base`):

============================  ==========================================================
module                        role
============================  ==========================================================
``plan``                      pure: which stage owns which HF tensor, buckets, TP pieces
``replica``                   where a replica's ranks sit; its shared host memory
``gather``                    Megatron layout -> full HF buckets on the receiving ranks
``buckets``                   what the bucket transports share (own pieces, flat buffers)
``peer``                      bucket transport: batched point-to-point (GPU, many hosts)
``shared_memory``             bucket transport: /dev/shm slots (CPU ranks of one host)
``direct``                    no bucket: engine weights live in the replica's shared buffer
``same_device``               no bucket: TP = PP = 1, trainer tensors copied into the engine's
``sglang_ipc``                SGLang colocated: packed buckets loaded through CUDA IPC
``server_broadcast``          SGLang servers: per-stage broadcast into the servers' ranks
============================  ==========================================================

The loop, evaluation, the demo and the bench all call :func:`sync`.
"""

from __future__ import annotations

from sept_megatron.rollout.base import BucketWeightEngine, IPCWeightEngine, RolloutEngine, ServerWeightEngine

PLACEMENTS = ("colocated", "disaggregated")


def sync(
    model,
    engine: RolloutEngine | None,
    *,
    bucket_bytes: int = 512 << 20,
    weights: str = "native",
    placement: str = "colocated",
    direct: bool = True,
) -> int:
    """Push the trainer's current weights into this rank's engine (None: this rank only
    sends); collective over every trainer rank. Returns what this rank's engine received:
    buckets, or 1 for a direct sync.

    ``weights`` (``rollout.weights``): ``fp8`` quantises each bucket on every receiving rank
    (linear weights -> e4m3 + ``weight_scale_inv``, the export's quantiser). ``placement``
    (``rollout.placement``): ``disaggregated`` broadcasts to SGLang servers stage by stage.
    ``direct``: where the replica can (CPU ranks of one host, engines that bind shared
    weights, native weights; or TP = PP = 1 with the engine on the trainer's device), write
    straight into the engines' weights; ``False`` always streams buckets. Every argument must be the same on every rank.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"rollout.placement={placement!r}: choose one of {', '.join(PLACEMENTS)}")
    if placement == "disaggregated":
        from sept_megatron.weight_sync.server_broadcast import sync_weights_to_servers

        if engine is not None and not isinstance(engine, ServerWeightEngine):
            raise TypeError(
                f"rollout.placement=disaggregated needs a server engine, got {type(engine).__name__}"
            )
        return sync_weights_to_servers(model, engine, bucket_bytes, weights=weights)
    from sept_megatron.weight_sync.direct import direct_sync, forget_other_engine

    if direct:
        done = direct_sync(model, engine, weights)
        if done is not None:
            return done
        from sept_megatron.weight_sync.same_device import can_sync_in_place, same_device_sync

        if can_sync_in_place(model, engine, weights):
            same_device_sync(model, engine)
            return 1
    else:
        forget_other_engine(model, engine)
    return _stream_into(model, engine, bucket_bytes, weights)


def _stream_into(model, engine: RolloutEngine | None, bucket_bytes: int, weights: str) -> int:
    from sept_megatron.convert.fp8 import rollout_bucket_transform
    from sept_megatron.weight_sync.gather import stream_hf_buckets

    stream = rollout_bucket_transform(weights, model.arch)(
        stream_hf_buckets(model, bucket_bytes, receive=engine is not None)
    )
    if engine is None:
        return sum(1 for _ in stream)
    count = 0

    def counted():
        nonlocal count
        for bucket in stream:
            count += 1
            yield bucket

    if isinstance(engine, IPCWeightEngine):
        from sept_megatron.weight_sync.sglang_ipc import load_buckets

        load_buckets(engine, counted())
    elif isinstance(engine, BucketWeightEngine):
        engine.update_weights(counted())
    else:
        raise TypeError(
            f"{type(engine).__name__} declares no way to take weights (see "
            "sept_megatron.rollout.base: BucketWeightEngine, IPCWeightEngine)"
        )
    for _ in stream:  # keep collective order even if the engine stopped early
        pass
    return count
