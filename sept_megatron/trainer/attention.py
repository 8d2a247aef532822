"""Flash attention for Megatron's local layer spec: PyTorch SDPA behind Megatron's core-attention
interface, so a run without Transformer Engine stores no ``[b * heads, s, s]`` scores.

Megatron-Core's local spec uses ``DotProductAttention`` (``baddbmm`` -> fp32 softmax -> ``bmm``),
which materialises the scores and probabilities of every layer for backward: at micro-batch 16 x
1024 on a 1.3B Qwen2 shape that ran out of memory on an 80 GB H100 (issue 8).
:class:`SDPAttention` takes the same constructor arguments and the same ``forward`` call as
``DotProductAttention`` (``megatron/core/transformer/dot_product_attention.py`` 0.16.1, called by
``SelfAttention`` in ``attention.py``) and computes attention with
``torch.nn.functional.scaled_dot_product_attention``:

- causal (``attn_mask_type=causal``) runs as ``is_causal=True`` with no mask tensor, so the
  flash kernels can run. The mask our callers pass (:func:`sept_megatron.trainer.model.causal_mask`) is
  then not read: every batch we build is right-padded, where the plain causal mask is exact
  (padding sits after each sequence, so no real token attends to it). Its shape is always
  checked; its content only on the CPU, where the check costs no device synchronisation.
- GQA without repeated K/V: ``enable_gqa=True`` (torch >= 2.5) lets the kernel map query-head
  groups onto K/V heads. Which CUDA backends accept it (read from pytorch's
  ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp`` and pytorch issue 139586 / PR
  191085; not run on a GPU in this work): flash since 2.5; cuDNN for differing head counts;
  memory-efficient only from PR 191085 (July 2026) on, so possibly not in torch 2.11-2.13. The
  math backend always does, by materialising repeated K/V AND the ``[b, heads, s, s]`` scores.
  On CUDA we therefore call SDPA with the math backend switched off (:data:`FUSED_BACKENDS`).
  In bf16/fp16 with head_dim <= 256 (H100, issue 8's shape) flash runs, or cuDNN attention
  where torch ranks it first (recent torch on sm90 with cuDNN > 9.15); both keep O(s) state per
  query row (the GPU test records which one ran). If no fused kernel accepts the GQA call
  (fp32 on a torch whose memory-efficient kernel lacks GQA), K/V are repeated once (O(s),
  logged once) and the memory-efficient kernel runs; if nothing fused runs at all, a clear
  error says to use ``model.attention=unfused``. Never a silent O(s^2) fallback on GPU.
- On CPU (the test bed) torch runs its own flash kernel (``_scaled_dot_product_flash_attention
  _for_cpu``; GQA native, no scores kept) unless dropout > 0, where it uses the math path.

What one layer keeps for backward in this module (flash or cuDNN on CUDA; b micro-batch,
s sequence, np / ng query / K-V heads of this TP rank, d head_dim): the RoPE'd query
[s, b, np, d] and key [s, b, ng, d]; value, which is a view into the fused QKV projection
output, so that whole [s, b, (np + 2 ng) d] buffer stays alive; the kernel's output
[b, s, np, d]; its log-sum-exp (cuDNN: softmax statistics) [b, np, s] in fp32; and the
dropout RNG seed/offset. The [s, b, np * d] context handed to ``linear_proj`` (which saves it)
is a view of that output when the kernel writes it in the query's layout, else one more copy.
No tensor grows with s^2.

Tensor parallelism: q/k/v arrive already split by heads (``np = heads / tp``,
``ng = groups / tp``, or one group per rank when tp > groups, as ``Attention`` arranges), so the
computation is local to each rank, as in ``DotProductAttention``.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

ATTENTION_IMPLS = ("sdpa", "unfused")
"""``model.attention``: sdpa (this module; the local default) or unfused (Megatron's
``DotProductAttention``, which keeps [b * heads, s, s] scores)."""

FUSED_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
"""The CUDA kernels we allow: each keeps O(s) state per row; the math backend is excluded."""

_NO_KERNEL_HELP = (
    "model.attention=sdpa: no fused scaled_dot_product_attention kernel accepts "
    "these inputs on CUDA (dtype {dtype}, head_dim {head_dim}); the math fallback "
    "would materialise [b * heads, s, s] scores. Use bfloat16/float16 params "
    "(model.params_dtype) or set model.attention=unfused."
)


class SDPAttention(MegatronModule):
    """Megatron core attention computed by ``F.scaled_dot_product_attention``.

    Shapes (this TP rank): query [sq, b, np, d], key/value [sk, b, ng, d] -> [sq, b, np * d].
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        _check_supported(config, layer_number)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type  # self-attention only, as DotProductAttention
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = pg_collection.tp.size()
        self.hidden_size_per_partition = divide(config.kv_channels * config.num_attention_heads, tp)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp)
        # Megatron's query-key layer scaling divides the scores by layer_number and multiplies
        # them back inside its fp32 softmax: the net scale is softmax_scale, which is what we use.
        self.softmax_scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self._repeat_kv = False  # set once if no fused CUDA kernel takes native GQA

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None:
            raise NotImplementedError(
                "SDPAttention: packed sequences (THD) are not supported; "
                "use Transformer Engine (model.transformer_impl)"
            )
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention: attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        is_causal, sdpa_mask = _mask_arguments(mask_type, attention_mask, query.shape[0], key.shape[0])
        # [s, b, h, d] -> [b, h, s, d] views: SDPA's kernels read strided rows, no copy here.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        with self._dropout_rng(dropout_p):
            context = self._attend(q, k, v, sdpa_mask, is_causal, dropout_p)
        # [b, np, sq, d] -> [sq, b, np * d]
        context = context.permute(2, 0, 1, 3)
        return context.reshape(context.shape[0], context.shape[1], self.hidden_size_per_partition)

    def _dropout_rng(self, dropout_p: float):
        """Attention dropout draws from Megatron's model-parallel RNG stream, as in
        DotProductAttention (each TP rank holds different heads)."""
        if dropout_p == 0.0 or self.config.sequence_parallel:
            return contextlib.nullcontext()
        return tensor_parallel.get_cuda_rng_tracker().fork()

    def _attend(self, q, k, v, mask, is_causal, dropout_p):
        kwargs = dict(attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale)
        if not q.is_cuda:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
        if not self._repeat_kv:
            try:
                return _fused_sdpa(q, k, v, enable_gqa=True, **kwargs)
            except RuntimeError as exc:
                if not _is_no_kernel(exc):
                    raise
                if k.shape[1] == q.shape[1]:
                    raise _no_kernel_error(q) from exc
            self._repeat_kv = True
            log.warning(
                "SDPAttention (layer %d): no fused kernel takes grouped K/V for dtype %s "
                "on torch %s; repeating K/V per query head (O(s) memory) so the "
                "memory-efficient kernel runs",
                self.layer_number,
                q.dtype,
                torch.__version__,
            )
        groups = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        try:
            return _fused_sdpa(q, k, v, **kwargs)
        except RuntimeError as exc:
            if _is_no_kernel(exc):
                raise _no_kernel_error(q) from exc
            raise


def _fused_sdpa(q, k, v, **kwargs) -> torch.Tensor:
    """SDPA restricted to the fused CUDA kernels: an unsupported call raises instead of
    silently taking the math path (and its [b, heads, s, s] scores)."""
    with sdpa_kernel(FUSED_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _is_no_kernel(exc: RuntimeError) -> bool:
    return "No available kernel" in str(exc)


def _no_kernel_error(q: torch.Tensor) -> RuntimeError:
    return RuntimeError(_NO_KERNEL_HELP.format(dtype=q.dtype, head_dim=q.shape[-1]))


def _check_supported(config, layer_number: int) -> None:
    """What DotProductAttention supports and SDPA cannot express: a clear error at build time."""
    unsupported = []
    if config.context_parallel_size != 1:
        unsupported.append(f"context_parallel_size={config.context_parallel_size}")
    if config.softmax_type != "vanilla":
        unsupported.append(f"softmax_type={config.softmax_type!r}")
    if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
        unsupported.append(f"window_size={config.window_size}")
    if unsupported:
        raise ValueError(
            f"model.attention=sdpa does not support {', '.join(unsupported)}; "
            "set model.attention=unfused or use Transformer Engine"
        )


def _mask_arguments(
    mask_type, attention_mask: torch.Tensor | None, sq: int, sk: int
) -> tuple[bool, torch.Tensor | None]:
    """Megatron's (mask type, boolean mask with True = masked out) -> SDPA's (is_causal, mask
    with True = attend)."""
    if mask_type == AttnMaskType.causal:
        if sq != sk:
            # SDPA's is_causal aligns top-left; decoding with a KV cache would need bottom-right.
            raise ValueError(
                f"SDPAttention: causal attention needs equal query/key lengths, got "
                f"{sq} and {sk} (KV-cache inference is not supported)"
            )
        if attention_mask is not None:
            _check_plain_causal(attention_mask, sq)
        return True, None
    if attention_mask is None or mask_type == AttnMaskType.no_mask:
        return False, None
    if attention_mask.dtype != torch.bool:
        raise ValueError(
            f"SDPAttention: expected a boolean mask (True = masked out, Megatron's "
            f"convention), got {attention_mask.dtype}"
        )
    return False, ~attention_mask


def _check_plain_causal(mask: torch.Tensor, seq_len: int) -> None:
    """With is_causal=True the passed mask is not read: make sure it says nothing more."""
    if (
        mask.dtype != torch.bool
        or mask.dim() != 4
        or mask.shape[1] != 1
        or tuple(mask.shape[-2:]) != (seq_len, seq_len)
    ):
        raise ValueError(
            f"SDPAttention: a causal layer got a mask of shape {tuple(mask.shape)} "
            f"and dtype {mask.dtype}; expected model.causal_mask ([1|b, 1, s, s] bool)"
        )
    if mask.is_cuda:
        return  # comparing the content would synchronise the device once per layer
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=mask.device).triu_(1)
    if not torch.equal(mask, causal.expand_as(mask)):
        raise ValueError(
            "SDPAttention: a causal layer got a mask that is not the plain causal "
            "one (e.g. a padding mask); batches must be right-padded with "
            "model.causal_mask, or set model.attention=unfused"
        )


def core_attention_class(name: str):
    """``model.attention`` -> the core-attention module class for the local layer spec."""
    if name == "sdpa":
        return SDPAttention
    if name == "unfused":
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        return DotProductAttention
    raise ValueError(f"model.attention={name!r}: choose one of {', '.join(ATTENTION_IMPLS)}")
