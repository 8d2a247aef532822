"""HF <-> Megatron-Core tensor mapping: one declarative adapter per model family.

The same adapter serves three paths, so they cannot disagree:
- HF import (:mod:`tools.convert_hf_to_megatron`): HF tensors -> this rank's Megatron shards;
- HF export (:func:`export_megatron_to_hf`): a Megatron dist checkpoint -> HF safetensors;
- the per-round weight sync (:mod:`sept_megatron.weight_sync.plan`): live TP shards -> HF tensors.

Terms. A *full* Megatron tensor is the TP=1 layout of one layer's parameter (fused QKV
interleaved per query group, ``linear_fc1`` = cat(gate, up), vocab padded). Its *kind* says
how HF tensors fuse into it and how TP splits it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import torch

from sept_megatron.trainer.arch import ModelArch


class Kind(enum.Enum):
    REPLICATED = "replicated"  # norms: every TP rank holds all of it
    VOCAB = "vocab"  # embedding / output layer: rows padded, split along dim 0
    ROW_PARALLEL = "row"  # linear_proj, linear_fc2: split along dim 1 (input features)
    QKV = "qkv"  # q, k, v fused per query group; split along dim 0 by groups
    GATE_UP = "gate_up"  # gate, up fused; each TP rank holds cat(gate_r, up_r)


@dataclass(frozen=True)
class TensorRule:
    """One Megatron parameter (canonical dist-checkpoint name; ``{i}`` = global layer)."""

    megatron: str
    hf: tuple[str, ...]
    kind: Kind
    fp8: bool = False
    """Its HF tensors are linear weights that blockwise FP8 quantises (export --fp8 and
    rollout.weights=fp8); norms, embeddings, the output layer and biases stay unquantised."""

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.megatron


_LAYER = "decoder.layers.{i}."
_HF_LAYER = "model.layers.{i}."


class LlamaAdapter:
    """Llama, Llama-3, DeepSeek-Math (a Llama) and Mistral: the base name map.

    A family is one adapter class: its name map (the rules below) and its fixed traits (the
    class attributes), which :func:`sept_megatron.convert.hf_config.arch_from_hf_config` reads.
    Adding a family is a subclass here and its ``model_type`` in :data:`ADAPTERS`.
    """

    qkv_bias: bool = False
    """q/k/v projections always carry biases (else only when the config sets attention_bias)."""
    qk_layernorm: bool = False
    """Per-head RMSNorm on q and k."""
    warns_on_sliding_window: bool = False
    """The family may declare a sliding window, which Megatron's full-causal attention ignores."""

    def __init__(self, arch: ModelArch):
        self.arch = arch

    def layer_rules(self) -> list[TensorRule]:
        a = _HF_LAYER + "self_attn."
        return [
            TensorRule(
                _LAYER + "self_attention.linear_qkv.layer_norm_weight",
                (_HF_LAYER + "input_layernorm.weight",),
                Kind.REPLICATED,
            ),
            TensorRule(
                _LAYER + "self_attention.linear_qkv.weight",
                (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                Kind.QKV,
                fp8=True,
            ),
            TensorRule(
                _LAYER + "self_attention.linear_proj.weight",
                (a + "o_proj.weight",),
                Kind.ROW_PARALLEL,
                fp8=True,
            ),
            TensorRule(
                _LAYER + "mlp.linear_fc1.layer_norm_weight",
                (_HF_LAYER + "post_attention_layernorm.weight",),
                Kind.REPLICATED,
            ),
            TensorRule(
                _LAYER + "mlp.linear_fc1.weight",
                (_HF_LAYER + "mlp.gate_proj.weight", _HF_LAYER + "mlp.up_proj.weight"),
                Kind.GATE_UP,
                fp8=True,
            ),
            TensorRule(
                _LAYER + "mlp.linear_fc2.weight",
                (_HF_LAYER + "mlp.down_proj.weight",),
                Kind.ROW_PARALLEL,
                fp8=True,
            ),
        ] + self._extra_layer_rules()

    def _extra_layer_rules(self) -> list[TensorRule]:
        rules = []
        if self.arch.qkv_bias:
            a = _HF_LAYER + "self_attn."
            rules.append(
                TensorRule(
                    _LAYER + "self_attention.linear_qkv.bias",
                    (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
                    Kind.QKV,
                )
            )
        return rules

    def pre_rules(self) -> list[TensorRule]:
        return [TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Kind.VOCAB)]

    def post_rules(self) -> list[TensorRule]:
        rules = [TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",), Kind.REPLICATED)]
        if not self.arch.tie_word_embeddings:
            rules.append(TensorRule("output_layer.weight", ("lm_head.weight",), Kind.VOCAB))
        return rules

    def all_rules(self) -> list[TensorRule]:
        return self.pre_rules() + self.layer_rules() + self.post_rules()

    def hf_names(self) -> list[str]:
        """Every HF tensor name of the model, in export order."""
        names = [n for r in self.pre_rules() for n in r.hf]
        for i in range(self.arch.num_layers):
            names += [n.format(i=i) for r in self.layer_rules() for n in r.hf]
        return names + [n for r in self.post_rules() for n in r.hf]

    def fp8_hf_names(self) -> frozenset[str]:
        """The HF tensors blockwise FP8 quantises (from the rules' ``fp8`` flags)."""
        names = {n for r in self.pre_rules() + self.post_rules() if r.fp8 for n in r.hf}
        names |= {
            n.format(i=i)
            for i in range(self.arch.num_layers)
            for r in self.layer_rules()
            if r.fp8
            for n in r.hf
        }
        return frozenset(names)


class MistralAdapter(LlamaAdapter):
    """Mistral: Llama's names; its sliding window is not applied (warned about)."""

    warns_on_sliding_window = True


class Qwen2Adapter(LlamaAdapter):
    """Qwen2 / Qwen2.5: q/k/v biases."""

    qkv_bias = True


class Qwen3Adapter(LlamaAdapter):
    """Qwen3: per-head RMSNorm on q and k (qk-norm)."""

    qk_layernorm = True

    def _extra_layer_rules(self) -> list[TensorRule]:
        a = _HF_LAYER + "self_attn."
        return super()._extra_layer_rules() + [
            TensorRule(_LAYER + "self_attention.q_layernorm.weight", (a + "q_norm.weight",), Kind.REPLICATED),
            TensorRule(_LAYER + "self_attention.k_layernorm.weight", (a + "k_norm.weight",), Kind.REPLICATED),
        ]


ADAPTERS: dict[str, type[LlamaAdapter]] = {
    "llama": LlamaAdapter,
    "mistral": MistralAdapter,
    "qwen2": Qwen2Adapter,
    "qwen3": Qwen3Adapter,
}
"""HF ``model_type`` -> its family: the one registry of supported model families."""


def family_for(model_type: str | None) -> type[LlamaAdapter]:
    """The adapter class of ``model_type``; an unsupported family is an error listing the
    supported ones."""
    if model_type not in ADAPTERS:
        raise ValueError(
            f"model: architecture {model_type!r} is not supported; supported model_type values: "
            f"{', '.join(ADAPTERS)} (DeepSeek-Math is 'llama')"
        )
    return ADAPTERS[model_type]


def adapter_for(arch: ModelArch) -> LlamaAdapter:
    return family_for(arch.model_type)(arch)


# --- names of live modules --------------------------------------------------------------
# The local layer spec keeps norms as separate modules; TE fuses them into the next linear.
# Dist checkpoints always use the TE names, so live names are normalised to those.
_LOCAL_TO_CANONICAL = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def canonical_name(live_name: str, layer_offset: int) -> str | None:
    """``decoder.layers.3.input_layernorm.weight`` on a stage whose first layer is 8 ->
    ``decoder.layers.{11}.self_attention.linear_qkv.layer_norm_weight``; None for extra state."""
    if live_name.endswith("_extra_state"):
        return None
    match = _LAYER_NAME.match(live_name)
    if not match:
        return live_name
    local_idx, rest = int(match.group(1)), match.group(2)
    return f"decoder.layers.{local_idx + layer_offset}.{_LOCAL_TO_CANONICAL.get(rest, rest)}"


def rule_index(adapter: LlamaAdapter) -> dict[str, tuple[TensorRule, int | None]]:
    """Canonical Megatron name (layer filled in) -> (rule, layer index)."""
    index: dict[str, tuple[TensorRule, int | None]] = {}
    for rule in adapter.pre_rules() + adapter.post_rules():
        index[rule.megatron] = (rule, None)
    for i in range(adapter.arch.num_layers):
        for rule in adapter.layer_rules():
            index[rule.megatron.format(i=i)] = (rule, i)
    return index


# --- full-tensor transforms (TP=1 layout <-> HF) -----------------------------------------
def hf_to_full(rule: TensorRule, hf: list[torch.Tensor], arch: ModelArch, padded_vocab: int) -> torch.Tensor:
    """Fuse HF tensors into the full Megatron tensor."""
    if rule.kind is Kind.QKV:
        return _merge_qkv(*hf, arch)
    if rule.kind is Kind.GATE_UP:
        return torch.cat(hf, dim=0)
    if rule.kind is Kind.VOCAB:
        return _pad_vocab(hf[0], padded_vocab)
    return hf[0]


def full_to_hf(rule: TensorRule, full: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    """Split the full Megatron tensor back into HF tensors (inverse of :func:`hf_to_full`)."""
    if rule.kind is Kind.QKV:
        return _split_qkv(full, arch)
    if rule.kind is Kind.GATE_UP:
        return list(full.chunk(2, dim=0))
    if rule.kind is Kind.VOCAB:
        return [full[: arch.vocab_size]]
    return [full]


def _pad_vocab(weight: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    extra = padded_vocab - weight.shape[0]
    if extra < 0:
        raise ValueError(f"vocab of {weight.shape[0]} rows exceeds the padded size {padded_vocab}")
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])]) if extra else weight


def _merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """Megatron's fused QKV: for each query group g, [q heads of g; k_g; v_g]."""
    groups, d = arch.num_query_groups, arch.head_dim
    per_group = arch.num_attention_heads // groups
    tail = q.shape[1:]
    fused = torch.cat(
        [q.reshape(groups, per_group * d, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)],
        dim=1,
    )
    return fused.reshape(-1, *tail)


def _split_qkv(fused: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    groups, d = arch.num_query_groups, arch.head_dim
    per_group = arch.num_attention_heads // groups
    tail = fused.shape[1:]
    grouped = fused.reshape(groups, (per_group + 2) * d, *tail)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return [t.reshape(-1, *tail).contiguous() for t in (q, k, v)]


# --- tensor-parallel split / join --------------------------------------------------------
def tp_shard(kind: Kind, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a full tensor, exactly as Megatron's parallel layers hold it."""
    if kind is Kind.REPLICATED or tp_size == 1:
        return full
    if kind is Kind.ROW_PARALLEL:
        return full.chunk(tp_size, dim=1)[tp_rank]
    if kind is Kind.GATE_UP:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])
    return full.chunk(tp_size, dim=0)[tp_rank]  # VOCAB, QKV (whole query groups per rank)


def tp_join(kind: Kind, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`tp_shard` over all TP ranks' slices, in rank order."""
    if kind is Kind.REPLICATED or len(shards) == 1:
        return shards[0]
    if kind is Kind.ROW_PARALLEL:
        return torch.cat(shards, dim=1)
    if kind is Kind.GATE_UP:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards, dim=0)
