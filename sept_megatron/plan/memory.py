"""Bytes one GPU holds for training: closed-form counts that follow what the code keeps.

Used by :mod:`sept_megatron.plan.planner` (``sept-megatron plan`` and train's fit check); checked
against measured peaks in tests/plan/test_memory_estimate.py. All functions are pure
arithmetic on a :class:`~sept_megatron.trainer.model.ModelArch`; widths are per tensor-parallel rank.

- Weights: TP shards every linear layer and the padded vocab; PP gives each stage
  ``layers / PP`` layers, the first stage the embedding, the last the output layer (a second
  copy of a tied embedding when PP > 1, as Megatron keeps one).
- Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", adapted to RMSNorm, GQA, SwiGLU, RoPE, no dropout):
  :func:`layer_activation_bytes`; micro-batches in flight under 1F1B and interleaving
  (Narayanan et al. 2021): :func:`in_flight`; the transient on top: :func:`logits_bytes`,
  :func:`backward_working_bytes`, :func:`score_buffer_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kernels:
    """What the layer implementation keeps for backward (it decides the activation bytes)."""

    param_bytes: int  # 2 (bf16/fp16) or 4 (fp32): also the activation dtype (Float16Module)
    transformer_engine: bool  # TE spec: each RMSNorm fused into the linear after it
    fused_attention: bool  # SDPA / flash / TE: no s x s scores kept
    fp8: bool = False
    fused_swiglu: bool = False  # CUDA: Megatron's SwiGLU function (model.transformer_config)

    def describe(self) -> str:
        dtype = {2: "bf16", 4: "fp32"}.get(self.param_bytes, f"{self.param_bytes}-byte")
        layers = "Transformer Engine" if self.transformer_engine else "Megatron local spec"
        attention = (
            "fused attention (SDPA/flash: no s x s scores kept)"
            if self.fused_attention
            else "unfused DotProductAttention (keeps fp32 softmax + its copy: s x s per head)"
        )
        return f"{dtype} params/activations, {layers}, {attention}" + (", FP8 GEMMs" if self.fp8 else "")


# --- parameters ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamCounts:
    """Unsharded parameter counts; ``layer_linear`` is what TP shards, ``layer_norm`` is not."""

    layer_linear: int
    layer_norm: int
    embedding: int  # padded vocab x hidden
    num_layers: int
    hidden: int
    tied: bool

    @property
    def total(self) -> int:
        out = 0 if self.tied else self.embedding
        return self.num_layers * (self.layer_linear + self.layer_norm) + self.embedding + out + self.hidden


def param_counts(arch, padded_vocab: int) -> ParamCounts:
    h, q, kv = (
        arch.hidden_size,
        arch.num_attention_heads * arch.head_dim,
        arch.num_query_groups * arch.head_dim,
    )
    linear = h * (q + 2 * kv) + q * h + 3 * h * arch.ffn_hidden_size
    if arch.qkv_bias:
        linear += q + 2 * kv
    norm = 2 * h + (2 * arch.head_dim if arch.qk_layernorm else 0)
    return ParamCounts(linear, norm, padded_vocab * h, arch.num_layers, h, arch.tie_word_embeddings)


def flops_per_token(arch, params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 L H Dh S (PaLM, appendix B), the figure the bench's
    TFLOP/s and the loop's MFU both use."""
    attention = 12 * arch.num_layers * arch.num_attention_heads * arch.head_dim * seq_len
    return 6.0 * params + attention


def stage_params(counts: ParamCounts, tp: int, pp: int, stage: int) -> tuple[int, int]:
    """(all params, transformer-layer linear params) held by one GPU of pipeline ``stage``."""
    layers = counts.num_layers // pp
    linear = layers * counts.layer_linear // tp
    total = linear + layers * counts.layer_norm
    if stage == 0:
        total += counts.embedding // tp
    if stage == pp - 1:
        total += counts.hidden  # final norm
        if not counts.tied or pp > 1:
            total += counts.embedding // tp  # output layer (a copy of a tied embedding if PP > 1)
    return total, linear


# --- activations ----------------------------------------------------------------------------
def layer_activation_bytes(
    arch, kernels: Kernels, *, tp: int, sequence_parallel: bool, seq_len: int, recompute: str
) -> float:
    """Bytes autograd keeps per token for one transformer layer on one GPU.

    Korthikanti et al. count 34 s b h (+ 5 a s^2 b) for a GPT layer in 16-bit with dropout.
    Ours, term by term (B = activation bytes, widths per TP rank, h not divided by TP unless
    sequence parallel; measured with saved-tensor hooks on megatron-core 0.16):
      - each RMSNorm: torch's (local spec) computes in fp32 and keeps its fp32 input and the
        normalised tensor (8 h bytes); TE's fused norm keeps its input (B h);
      - linear inputs: QKV and FC1 (B h each), the attention output into the projection (B q),
        FC2 (counted with the MLP);
      - attention: Q and K after RoPE; V is a view of the fused QKV output, which it keeps whole
        (B (q + 2 kv)); Megatron's unfused path repeats K and V to every head for GQA (B q each
        instead) and keeps the fp32 softmax (4 a s) and, in 16-bit, its cast (2 a s) per token;
        fused kernels keep the log-sum-exp (4 a) instead;
      - SwiGLU MLP: FC1 output (2 f), silu output (f), the linear half plus offset (f), their
        product into FC2 (f): 5 B f; with Megatron's SwiGLU function (CUDA) FC1's output and the
        product, silu recomputed in backward: 3 B f.
    Recompute ``selective`` keeps only core attention's inputs (no s x s, no GQA copies);
    ``full`` keeps each layer's input (B h) and rebuilds the rest in backward, one layer at a
    time (see :func:`backward_working_bytes`).
    """
    B = kernels.param_bytes
    h = arch.hidden_size / (tp if sequence_parallel else 1)
    heads = arch.num_attention_heads / tp
    q = heads * arch.head_dim
    kv = arch.num_query_groups * arch.head_dim / tp
    f = arch.ffn_hidden_size / tp
    if recompute == "full":
        return B * h
    norms = 2 * (B * h if kernels.transformer_engine else 8 * h)
    linear_inputs = B * (2 * h + q)
    v_storage = B * (q + 2 * kv)
    if kernels.fused_attention or recompute == "selective":
        attention = B * (q + kv) + v_storage + (0 if recompute == "selective" else 4 * heads)
    else:
        gqa = arch.num_query_groups < arch.num_attention_heads
        attention = B * 2 * q + (B * q if gqa else v_storage)
        attention += (4 + (2 if B < 4 else 0)) * heads * seq_len
    mlp = (3 if kernels.fused_swiglu else 5) * B * f  # fused: FC1 output and the product
    return norms + linear_inputs + attention + mlp


def logits_bytes(arch, kernels: Kernels, vocab_per_rank: float, tp: int, sequence_parallel: bool) -> float:
    """Per token, the peak of the last stage's head and our loss (sept_megatron.trainer.sft.token_nll):
    the logits in the params dtype, their fp32 copy divided by tau_t, and the copy with the
    vocab padding masked (which vocab_parallel_cross_entropy then overwrites in place); plus
    what the final norm and the output layer keep."""
    B = kernels.param_bytes
    h = arch.hidden_size / (tp if sequence_parallel else 1)
    head = (B * h if kernels.transformer_engine else 8 * h) + B * h
    return (B + 8) * vocab_per_rank + head


def backward_working_bytes(
    arch, kernels: Kernels, *, tp: int, sequence_parallel: bool, seq_len: int, recompute: str
) -> float:
    """Per token, what one layer's backward adds: the gradients alive at once (the MLP's: FC1
    output's grad and both halves', 4 f; in Megatron's unfused attention the fp32 grads of the
    probabilities and the scores, 2 x 4 a s) and, with full recomputation, the layer's own
    activations rebuilt for it. It never meets the head's logits (:func:`logits_bytes`), which
    are freed before the first layer's backward starts."""
    mlp = (3 if kernels.fused_swiglu else 4) * kernels.param_bytes * arch.ffn_hidden_size / tp
    scores = 0 if kernels.fused_attention else 8 * arch.num_attention_heads / tp * seq_len
    rebuilt = 0.0
    if recompute == "full":
        rebuilt = layer_activation_bytes(
            arch, kernels, tp=tp, sequence_parallel=sequence_parallel, seq_len=seq_len, recompute="none"
        )
    return max(mlp, scores) + rebuilt


def score_buffer_bytes(arch, kernels: Kernels, *, tp: int, seq_len: int) -> float:
    """Per token: Megatron's unfused attention computes the scores into a global buffer of
    a s^2 b elements (``get_global_memory_buffer``), kept for the whole run."""
    if kernels.fused_attention:
        return 0.0
    return kernels.param_bytes * arch.num_attention_heads / tp * seq_len


def in_flight(pp: int, vpp: int | None, micro_batches: int, stage: int) -> float:
    """Micro-batches of a stage's layers held at once: 1F1B warm-up (Narayanan et al. 2021);
    interleaved: ((PP - stage - 1) 2 + (v - 1) PP + 1) chunk forwards of 1/v of the layers."""
    if pp == 1:
        return 1.0
    if not vpp:
        return float(min(pp - stage, micro_batches))
    chunks = (pp - stage - 1) * 2 + (vpp - 1) * pp + 1
    return min(chunks / vpp, float(micro_batches))


def stage_activations(
    arch,
    kernels: Kernels,
    *,
    tp: int,
    pp: int,
    vpp: int | None,
    sequence_parallel: bool,
    micro_batch: int,
    seq_len: int,
    micro_batches: int,
    stage: int,
    recompute: str,
) -> float:
    """Activation bytes kept for backward at the end of the forward passes in flight on one
    GPU of ``stage`` (the transient on top: :func:`backward_working_bytes`, :func:`logits_bytes`)."""
    tokens = micro_batch * seq_len
    layers = arch.num_layers // pp
    held = in_flight(pp, vpp, micro_batches, stage)
    return (
        tokens
        * layers
        * held
        * layer_activation_bytes(
            arch, kernels, tp=tp, sequence_parallel=sequence_parallel, seq_len=seq_len, recompute=recompute
        )
    )
