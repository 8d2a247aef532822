"""Blockwise FP8 weights: one quantiser for the HF export and the per-round rollout sync.

Format (DeepSeek-V3 / Qwen3-FP8 style, read by SGLang, vLLM and transformers): each quantised
linear weight ``W [out, in]`` becomes

- ``<name>.weight``: ``torch.float8_e4m3fn [out, in]``;
- ``<name>.weight_scale_inv``: ``float32 [ceil(out/128), ceil(in/128)]``, one per 128x128
  block, such that ``W ~= fp8 * weight_scale_inv`` block by block (the name is the engines':
  it is the *inverse* of the quantisation scale, i.e. the dequantisation multiplier).

Scales are amax-based: ``scale_inv = amax(|W_block|) / 448`` (448 = e4m3's largest finite
value), so each block's largest element lands on +-448 and nothing saturates. A shape that is
not a multiple of 128 gets partial edge blocks: zero padding is used only to compute the amax
(zeros never raise an amax), never stored. An all-zero block gets ``scale_inv = 1`` (any
positive scale dequantises its zeros exactly; 0 would make the quantiser divide 0 by 0).

Which HF tensors are quantised is declared by the family adapters (``TensorRule.fp8``):
attention q/k/v/o and MLP gate/up/down weights; norms, embeddings, the output layer and biases
stay in the training dtype. The export (:func:`sept_megatron.convert.hf_export.
export_megatron_to_hf` with ``fp8="blockwise"``) and the sync (``rollout.weights=fp8``,
:func:`rollout_bucket_transform`) both call :func:`quantize_hf_tensors` on the same full HF
tensors in the same dtype, so they produce the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator

import torch
import torch.nn.functional as F

BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0
SCALE_SUFFIX = "weight_scale_inv"
EXPORT_RECIPES = ("blockwise",)
"""``--fp8`` choices of the HF export (only 128x128 blockwise e4m3 is a serving format)."""

HFTensors = list[tuple[str, torch.Tensor]]


def scale_grid(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, int]:
    """Shape of ``weight_scale_inv`` for a weight of ``shape``: ceil(out/128) x ceil(in/128)."""
    rows, cols = shape
    return math.ceil(rows / block), math.ceil(cols / block)


def quantize_blockwise(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [out, in]`` -> (e4m3 ``[out, in]``, fp32 ``weight_scale_inv [ceil(out/b), ceil(in/b)]``).

    Computed in fp32 on the weight's own device; the result is a pure function of the input
    values and dtype, which is what makes the export and the sync agree bit for bit.
    """
    if weight.ndim != 2:
        raise ValueError(f"blockwise FP8 quantises 2-D linear weights; got shape {tuple(weight.shape)}")
    if not weight.is_floating_point() or weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"blockwise FP8 quantises bf16/fp16/fp32 weights; got {weight.dtype}")
    rows, cols = weight.shape
    grid_rows, grid_cols = scale_grid((rows, cols), block)
    full = weight.float()
    # Zero padding to whole blocks: it cannot raise a block's amax, and it is cut off again.
    pad_rows, pad_cols = grid_rows * block - rows, grid_cols * block - cols
    padded = F.pad(full, (0, pad_cols, 0, pad_rows)) if pad_rows or pad_cols else full
    blocks = padded.view(grid_rows, block, grid_cols, block)
    amax = blocks.abs().amax(dim=(1, 3))
    if not torch.isfinite(amax).all():
        raise ValueError("blockwise FP8: the weight holds inf/NaN values (did training diverge?)")
    scale_inv = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    scaled = (blocks / scale_inv[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX)
    quantized = scaled.view(grid_rows * block, grid_cols * block)[:rows, :cols].to(FP8_DTYPE)
    return quantized.contiguous(), scale_inv.contiguous()


def dequantize_blockwise(
    quantized: torch.Tensor,
    scale_inv: torch.Tensor,
    *,
    block: int = BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``fp8 * scale_inv`` per block, computed in fp32."""
    if quantized.ndim != 2 or quantized.dtype != FP8_DTYPE:
        raise ValueError(f"expected a 2-D {FP8_DTYPE} weight; got {quantized.dtype} {tuple(quantized.shape)}")
    rows, cols = quantized.shape
    if tuple(scale_inv.shape) != scale_grid((rows, cols), block):
        raise ValueError(
            f"weight_scale_inv of shape {tuple(scale_inv.shape)} does not fit a "
            f"{rows}x{cols} weight in {block}x{block} blocks; expected "
            f"{scale_grid((rows, cols), block)}"
        )
    per_element = scale_inv.float().repeat_interleave(block, 0).repeat_interleave(block, 1)
    return (quantized.float() * per_element[:rows, :cols]).to(dtype)


def scale_name(weight_name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``...q_proj.weight_scale_inv``."""
    if not weight_name.endswith(".weight"):
        raise ValueError(f"{weight_name!r} is declared FP8-quantised but is not a '.weight' tensor")
    return weight_name + "_scale_inv"


def quantize_hf_tensors(tensors: Iterable[tuple[str, torch.Tensor]], quantized: Collection[str]) -> HFTensors:
    """The bucket transform: HF (name, tensor) pairs in, the same pairs out with every name in
    ``quantized`` replaced by its e4m3 weight followed by its ``weight_scale_inv``. Everything
    else passes through untouched (same tensor object, training dtype)."""
    out: HFTensors = []
    for name, tensor in tensors:
        if name not in quantized:
            out.append((name, tensor))
            continue
        if tensor.ndim != 2:
            raise ValueError(
                f"{name} is declared FP8-quantised by the model adapter but has shape "
                f"{tuple(tensor.shape)}; only 2-D linear weights can be blockwise-quantised "
                "(fix the TensorRule's fp8 flag in sept_megatron/convert/adapters.py)"
            )
        weight, scales = quantize_blockwise(tensor)
        out += [(name, weight), (scale_name(name), scales)]
    return out


def hf_quantization_config() -> dict:
    """config.json ``quantization_config`` of a blockwise FP8 checkpoint, exactly the four keys
    the published ones carry (Qwen3-*-FP8, DeepSeek-V3). No ``modules_to_not_convert``: the
    three loaders only quantise linear layers, and each keeps the LM head unquantised by
    itself (SGLang/vLLM: the LM head is not a LinearBase; transformers: its default skip list
    holds the output embedding)."""
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [BLOCK, BLOCK],
    }


def check_export_recipe(recipe: str | None) -> None:
    if recipe is not None and recipe not in EXPORT_RECIPES:
        raise ValueError(
            f"--fp8 {recipe!r}: unknown FP8 export recipe; choose one of "
            f"{', '.join(EXPORT_RECIPES)} (128x128 blocks, e4m3, as SGLang/vLLM "
            "load), or leave --fp8 out for the training dtype"
        )


# --- the rollout sync ---------------------------------------------------------------------
BucketStream = Iterable[HFTensors]


def rollout_bucket_transform(weights: str, arch) -> Callable[[BucketStream], Iterator[HFTensors]]:
    """``rollout.weights`` -> what the sync applies to its HF bucket stream (the one place that
    choice is made): ``native`` passes buckets through, ``fp8`` quantises each bucket with the
    same quantiser as the export."""
    from sept_megatron.convert.adapters import adapter_for

    if weights == "native":
        return iter
    if weights == "fp8":
        names = adapter_for(arch).fp8_hf_names()
        return lambda stream: (quantize_hf_tensors(bucket, names) for bucket in stream)
    raise ValueError(f"rollout.weights={weights!r}: choose native or fp8")


def sglang_block_problems(arch, engine_tp: int) -> list[str]:
    """Shapes SGLang's 128x128 block-FP8 loader refuses at ``engine_tp`` GPUs per engine.

    SGLang (``Fp8LinearMethod.validate_block_quant_shapes``) needs every output partition of a
    merged (q/k/v, gate/up) or column-parallel layer, and the input partition of a
    row-parallel layer when TP > 1, to be a multiple of the block size: this is the block-size
    mismatch RL frameworks' users hit when they change the rollout TP.
    """
    d, ffn = arch.head_dim, arch.ffn_hidden_size
    kv_heads_per_gpu = max(1, arch.num_query_groups // engine_tp)  # SGLang replicates KV heads
    partitions = {
        "q_proj output (heads x head_dim)": arch.num_attention_heads * d // engine_tp,
        "k/v_proj output (kv heads x head_dim)": kv_heads_per_gpu * d,
        "gate/up_proj output (ffn size)": ffn // engine_tp,
    }
    if engine_tp > 1:
        partitions |= {
            "o_proj input (heads x head_dim)": arch.num_attention_heads * d // engine_tp,
            "down_proj input (ffn size)": ffn // engine_tp,
        }
    return [
        f"{what} per engine GPU is {size} at rollout.engine_tp={engine_tp}, not a multiple "
        f"of the {BLOCK}-wide FP8 block"
        for what, size in partitions.items()
        if size % BLOCK
    ]
