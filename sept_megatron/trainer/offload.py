"""Trainer offload during rollout (``train.offload_during_rollout``, slime's ``offload_train``).

While a colocated engine generates, the trainer's weights, gradient buffers and optimizer state
need not occupy the GPU: :func:`offloaded` copies every storage behind them to host memory
(pinned on CUDA) and shrinks the storage to zero bytes, then grows it back and copies the bytes
in before the step. Storages are resized in place, so every view (Megatron's parameters are
views into its DDP buffers, ``main_grad`` views into the gradient buffer) stays valid and sees
the same bytes afterwards: the step after an offload is bitwise the step without one.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def trainer_tensors(trainer) -> list[torch.Tensor]:
    """Every tensor of the trainer's state: parameters, their ``main_grad`` views, the
    optimizer's own (fp32 main) parameters and its state (Adam moments)."""
    tensors: list[torch.Tensor] = []
    for chunk in trainer.chunks:
        for param in chunk.parameters():
            tensors.append(param)
            main_grad = param.__dict__.get("main_grad")  # Megatron DDP's gradient view
            if isinstance(main_grad, torch.Tensor):
                tensors.append(main_grad)
    for optimizer in _torch_optimizers(trainer.optimizer):
        for group in optimizer.param_groups:
            tensors += list(group["params"])
        for state in optimizer.state.values():
            tensors += [
                value for value in state.values() if isinstance(value, torch.Tensor) and value.dim() > 0
            ]
    return tensors


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside Megatron's (a chained optimizer holds several)."""
    chained = optimizer.__dict__.get("chained_optimizers")
    members = chained if chained is not None else [optimizer]
    return [member.optimizer for member in members if member.optimizer is not None]


def _storages(tensors: list[torch.Tensor]) -> list[torch.UntypedStorage]:
    seen: dict[int, torch.UntypedStorage] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.nbytes() > 0:
            seen.setdefault(storage.data_ptr(), storage)
    return list(seen.values())


def offload(trainer) -> list[tuple[torch.UntypedStorage, torch.Tensor]]:
    """Move the trainer's state to host memory; returns what :func:`onload` needs."""
    parked = []
    for storage in _storages(trainer_tensors(trainer)):
        device_bytes = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=storage.device.type == "cuda")
        host.copy_(device_bytes)
        storage.resize_(0)
        parked.append((storage, host))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the engine may take the memory now
    return parked


def onload(parked: list[tuple[torch.UntypedStorage, torch.Tensor]]) -> None:
    """Give every storage its bytes back, in place."""
    for storage, host in parked:
        storage.resize_(host.numel())
        torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage).copy_(host)


@contextmanager
def offloaded(trainer, enabled: bool):
    """The block runs with the trainer's state in host memory (when ``enabled``)."""
    parked = offload(trainer) if enabled else []
    try:
        yield
    finally:
        onload(parked)
