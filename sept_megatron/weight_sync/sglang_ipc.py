"""SGLang colocated: buckets packed once per engine TP rank and loaded through CUDA IPC.

Data path of one bucket (``rollout.bucket_size_mb``): each rank of an engine group holds the
same full HF-named tensors on its own GPU (from :mod:`~sept_megatron.weight_sync.gather`); it
packs them with SGLang's own ``FlattenedTensorBucket`` (one contiguous byte buffer plus
metadata) and serialises that with SGLang's ``MultiprocessingSerializer`` after
``monkey_patch_torch_reductions`` (CUDA tensors travel as CUDA-IPC handles keyed by device
UUID, so nothing is copied through the host). The payloads are gathered to the owner in
group-rank order (= engine TP rank order), and the owner calls
``Engine.update_weights_from_tensor(load_format="flattened_bucket")``: SGLang's TP rank ``i``
opens payload ``i``, which lives on its own GPU. The whole sync sits between
``begin_weight_update()`` and ``end_weight_update()`` (required since sglang 0.5.21; the end
finalises quantised layouts, e.g. FP8), and the radix cache is flushed once at the end. Send
buffers are allocated by this (trainer) process, never inside the memory saver's region,
which lives in SGLang's scheduler processes; ``torch.cuda.ipc_collect()`` after each bucket
lets the trainer's caching allocator reuse a buffer once SGLang has dropped its IPC reference.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from sept_megatron.rollout.base import IPCWeightEngine, WeightBucket


def pack_bucket(bucket: WeightBucket, device: torch.device | None = None) -> tuple[bytes, Any]:
    """One engine TP rank's payload for ``update_weights_from_tensor(load_format=
    "flattened_bucket")``: SGLang's ``FlattenedTensorBucket`` serialised by its
    ``MultiprocessingSerializer``. Returns ``(payload, flat buffer)``; the caller keeps the
    buffer alive until SGLang has loaded it (CUDA IPC shares memory, it does not copy).

    Tensors pass through in their own dtype (bf16 weights, or FP8 weights with their float32
    ``weight_scale_inv``): the bucket is a byte buffer plus per-tensor dtype/shape metadata.
    SGLang's receiver unpickles with an allow-list, so only its own classes may be sent.
    """
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    if not bucket:
        raise ValueError("pack_bucket: empty bucket")
    named = [(name, _on(tensor.detach(), device)) for name, tensor in bucket]
    flat = FlattenedTensorBucket(named_tensors=named)
    if flat.get_flattened_tensor().is_cuda:
        # CUDA-IPC handles then carry the device UUID, not an index that differs between
        # processes with different CUDA_VISIBLE_DEVICES. The patch is process-wide and
        # CUDA-only (its reduce_tensor indexes CUDA-only arguments; a CPU tensor fails).
        monkey_patch_torch_reductions()
    payload = MultiprocessingSerializer.serialize(
        {"flattened_tensor": flat.get_flattened_tensor(), "metadata": flat.get_metadata()}
    )
    return payload, flat.get_flattened_tensor()


def _on(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    if device is None or tensor.device == device:
        return tensor.contiguous()
    return tensor.to(device=device).contiguous()


def load_buckets(engine: IPCWeightEngine, buckets: Iterable[WeightBucket]) -> int:
    """Load full HF-named buckets into one engine group; collective over the group.

    Every rank of the group passes the same buckets (its own copy, on its own GPU). Returns
    the number of buckets sent. A refusal or failure of any call raises on every rank.
    """
    agree(engine, engine.begin_weight_update(), "begin_weight_update")
    count = 0
    try:
        for bucket in buckets:
            payload, buffer = pack_bucket(bucket, engine.device)
            result = engine.load_payloads(gather_payloads(engine, payload))
            agree(
                engine,
                result,
                f"update_weights_from_tensor (bucket {count}, {len(bucket)} tensors, first {bucket[0][0]!r})",
            )
            del payload, buffer  # SGLang has copied the bucket into its weights
            if engine.device is not None:
                torch.cuda.ipc_collect()
            count += 1
    finally:
        end = engine.end_weight_update()
    agree(engine, end, "end_weight_update")
    engine.weights_loaded()
    return count


def gather_payloads(engine: IPCWeightEngine, payload: bytes) -> list[bytes]:
    """Every rank's payload at the owner, in group-rank order (= SGLang TP rank order); over
    the group's gloo group, so the other ranks wait on the CPU, not in a GPU kernel."""
    if len(engine.ranks) == 1:
        return [payload]
    gathered = [None] * len(engine.ranks) if engine.is_owner else None
    with waiting(engine, "gathering the weight payloads"):
        dist.gather_object(payload, gathered, dst=engine.owner, group=engine.process_group)
    return gathered if engine.is_owner else []


@contextmanager
def waiting(engine: IPCWeightEngine, doing: str):
    """A wait on the owner that fails (``rollout.timeout_minutes`` on the group's gloo group,
    or a dead peer) names the engine group and what it was doing."""
    try:
        yield
    except RuntimeError as error:
        rank = dist.get_rank() if dist.is_initialized() else engine.owner
        raise RuntimeError(
            f"rank {rank}: SGLang engine group {engine.ranks} (owner "
            f"{engine.owner}) failed while {doing}; if the owner is only slow, "
            f"raise rollout.timeout_minutes ({error})"
        ) from error


def agree(engine: IPCWeightEngine, result, what: str) -> None:
    """The owner's ``(success, message)`` reaches every rank; all raise on failure. Also the
    point after which a rank may free its send buffer."""
    status = [success_of(result)] if engine.is_owner else [None]
    if len(engine.ranks) > 1:
        with waiting(engine, f"waiting for {what}"):
            dist.broadcast_object_list(status, src=engine.owner, group=engine.process_group)
    success, message = status[0]
    if not success:
        raise RuntimeError(f"SGLang {what} failed: {message}")


def success_of(result) -> tuple[bool, str]:
    """``sglang.Engine`` weight calls return ``(success, message)`` (or a dict with them)."""
    if isinstance(result, tuple) and len(result) == 2:
        return bool(result[0]), str(result[1])
    if isinstance(result, dict) and "success" in result:
        return bool(result["success"]), str(result.get("message", ""))
    raise RuntimeError(f"unexpected reply from SGLang: {result!r}")
