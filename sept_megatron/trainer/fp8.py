"""Transformer Engine FP8 training (``model.fp8``): can it run here, with these shapes?

Megatron-Core hands ``model.fp8`` to Transformer Engine (:func:`sept_megatron.trainer.model.fp8_kwargs`),
which then runs every linear layer's GEMMs in FP8 (the output layer is Megatron's own
``ColumnParallelLinear`` and stays in the training dtype). This module refuses a run that
cannot work, with the reason and the fix, before a model is built or a weight is loaded:

- **Hopper or newer** (compute capability >= 9.0), the hardware this project targets. TE
  itself accepts 8.9 (Ada) for the delayed and tensorwise recipes, and needs >= 9.0 with
  CUDA >= 12.9 for blockwise (``check_fp8_block_scaling_support`` in TE's fp8 module); its
  own verdict is asked as well.
- **Transformer Engine importable**, at least the version Megatron-Core 0.16 needs to build
  the recipe (``megatron/core/fp8_utils.py::get_fp8_recipe``: Float8CurrentScaling from TE
  2.2.0, Float8BlockScaling from 2.3.0; setup.py's ``[gpu]`` extra pins >= 2.4).
- **GEMM shapes TE can run in FP8**: ``assert_dim_for_fp8_exec`` (TE ``pytorch/utils.py``)
  requires every FP8 GEMM operand to have leading dims divisible by 8 and a last dim
  divisible by 16; the backward GEMMs use the transposes, so every weight dimension a TP rank
  holds, and the tokens of a micro-batch, must be multiples of 16 (the trainer pads sequence
  lengths accordingly: :func:`token_multiple`).

``sept-megatron bench`` uses :func:`fp8_unsupported_reason` to decide whether to time FP8.
"""

from __future__ import annotations

import torch

from sept_megatron.trainer.arch import ModelArch

FP8_RECIPES = ("delayed", "tensorwise", "blockwise")

MIN_CAPABILITY = (9, 0)
FP8_GEMM_MULTIPLE = 16
MIN_TE_VERSION = {"delayed": "2.1.0", "tensorwise": "2.2.0", "blockwise": "2.3.0"}
_INSTALL = "install it with `pip install 'sept_megatron[gpu]'` on the CUDA machine"


def fp8_unsupported_reason(recipe: str) -> str | None:
    """Why ``model.fp8=recipe`` cannot run on this machine, or None when it can."""
    if recipe not in FP8_RECIPES:
        return f"unknown FP8 recipe {recipe!r}; choose one of {', '.join(FP8_RECIPES)}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (FP8 training runs only on NVIDIA Hopper or newer)"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return (
            f"the GPU ({torch.cuda.get_device_name()}) has compute capability "
            f"{capability[0]}.{capability[1]}; FP8 training needs Hopper or newer (>= 9.0)"
        )
    version = _te_version()
    if version is None:
        return f"Transformer Engine is not installed: {_INSTALL}"
    from packaging.version import Version

    if version < Version(MIN_TE_VERSION[recipe]):
        return (
            f"Transformer Engine {version} is too old for the {recipe} recipe (Megatron-Core "
            f"needs >= {MIN_TE_VERSION[recipe]}): {_INSTALL}"
        )
    ok, reason = _te_verdict(recipe)
    return None if ok else f"Transformer Engine refuses the {recipe} recipe here: {reason}"


def _te_version():
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return None
    from megatron.core.utils import get_te_version

    return get_te_version()


def _te_verdict(recipe: str) -> tuple[bool, str]:
    """TE's own check. ``transformer_engine.pytorch.fp8`` is deprecated from TE 2.10 (it warns
    and re-exports ``transformer_engine.pytorch.quantization``); 2.9 has only the old path."""
    try:
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    except ImportError:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

    if recipe == "blockwise":
        return FP8GlobalStateManager.is_fp8_block_scaling_available()
    return FP8GlobalStateManager.is_fp8_available()


def fp8_shape_problems(arch: ModelArch, tensor_parallel: int) -> list[str]:
    """Per-TP-rank weight dimensions of the TE linear layers that FP8 GEMMs cannot take."""
    tp, d = tensor_parallel, arch.head_dim
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    dims = {
        "hidden_size": arch.hidden_size,
        "fused q/k/v rows per TP rank ((heads + 2 x kv heads) x head_dim / TP)": qkv_rows // tp,
        "attention output width per TP rank (heads x head_dim / TP)": arch.num_attention_heads * d // tp,
        "ffn_hidden_size per TP rank": arch.ffn_hidden_size // tp,
    }
    return [
        f"{what} = {size} is not a multiple of {FP8_GEMM_MULTIPLE}, which Transformer "
        f"Engine's FP8 GEMMs need (parallel.tensor_parallel={tp})"
        for what, size in dims.items()
        if size % FP8_GEMM_MULTIPLE
    ]


def require_fp8_training(
    recipe: str, arch: ModelArch, *, tensor_parallel: int, transformer_engine: bool
) -> None:
    """Raise one ValueError naming every reason ``model.fp8=recipe`` cannot train here."""
    problems = []
    if not transformer_engine:
        problems.append(
            "the model is built from local (non-TE) layers: set "
            "model.transformer_impl=auto or transformer_engine"
        )
    reason = fp8_unsupported_reason(recipe)
    if reason:
        problems.append(reason)
    problems += fp8_shape_problems(arch, tensor_parallel)
    if problems:
        raise ValueError(
            f"model.fp8={recipe!r} cannot run: "
            + "; ".join(problems)
            + ". Fix these or set model.fp8=null (bf16 training)."
        )


def token_multiple(model_config) -> int:
    """What every micro-batch's sequence length is padded to: 8 (the trainer's default), or
    for FP8 16 tokens per GEMM row block, times TP when sequence parallelism splits the
    sequence across the TP ranks before TE's GEMMs."""
    if not getattr(model_config, "fp8", None):
        return 8
    tp = model_config.tensor_model_parallel_size if model_config.sequence_parallel else 1
    return FP8_GEMM_MULTIPLE * tp
