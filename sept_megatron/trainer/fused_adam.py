"""Fused AdamW on CUDA when Megatron falls back to torch's optimizer.

Without Transformer Engine or Apex, ``get_megatron_optimizer`` builds a plain
``torch.optim.AdamW`` (``megatron.core.optimizer.USING_PYTORCH_OPTIMIZER``), which on CUDA runs
the *foreach* implementation: several passes over the fp32 main weights, grads and moments per
step, and ``torch._foreach_sqrt`` of the second moments, a temporary as large as all fp32 main
weights at once (5.2 GB at the 1.31B bench shape). The *fused* implementation (one kernel per
tensor group, ``fused=True``, what a transformers user gets and what TE/Apex's FusedAdam is) does
the same update without the temporary. Same algorithm; results differ only in float rounding.

A param group's ``fused`` flag is read at every step, so switching it on after Megatron built the
optimizer is enough. ``Optimizer.load_state_dict`` restores the saved groups' flags, so call
:func:`use_fused_adam` again after loading a checkpoint. The CPU keeps the foreach path: the demo's
documented figures were trained with it.
"""

from __future__ import annotations

import torch


def use_fused_adam(optimizer, device: torch.device) -> int:
    """Switch the torch AdamW param groups of a Megatron optimizer to the fused kernel on CUDA.

    Returns the number of groups switched: 0 on the CPU, and 0 when TE or Apex provide the
    optimizer (theirs is fused already). The Adam step counters move to the parameters' device
    in float32, as torch stores them for fused groups (a checkpoint saved unfused keeps them on
    the host).
    """
    from megatron.core.optimizer import USING_PYTORCH_OPTIMIZER

    if device.type != "cuda" or not USING_PYTORCH_OPTIMIZER:
        return 0
    return fuse_torch_adam_groups(optimizer)


def fuse_torch_adam_groups(optimizer) -> int:
    """Set ``fused`` on every param group of a torch Adam/AdamW (or a Megatron optimizer that
    exposes its ``param_groups`` and ``state``); returns the number of groups."""
    groups = optimizer.param_groups
    for group in groups:
        group["fused"], group["foreach"] = True, False
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)
    return len(groups)
