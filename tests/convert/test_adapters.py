"""The declarative adapters and their tensor transforms, without any process group."""

import dataclasses

import pytest
import torch
from hf_checkpoints import MODELS
from hf_tiny import make_tiny_model

from sept_megatron.convert import (
    Kind,
    adapter_for,
    canonical_name,
    expected_hf_shapes,
    full_to_hf,
    hf_to_full,
    rule_index,
    tp_join,
    tp_shard,
)
from sept_megatron.convert.hf_config import arch_from_hf_config
from sept_megatron.trainer.arch import ModelArch


class StubVocab:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

    def __len__(self):
        return 300


def gqa_arch(
    heads: int = 8, groups: int = 4, head_dim: int = 3, hidden: int = 5, qkv_bias: bool = True
) -> ModelArch:
    return ModelArch(
        model_type="qwen2",
        vocab_size=10,
        hidden_size=hidden,
        num_layers=2,
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        ffn_hidden_size=6,
        norm_eps=1e-6,
        rope_theta=1e4,
        rope_scaling_factor=None,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        qkv_bias=qkv_bias,
        qk_layernorm=False,
    )


def tiny_hf_model(name: str):
    family, overrides = MODELS[name]
    return make_tiny_model(family, StubVocab(), **overrides)


def rule_named(arch, suffix: str):
    return next(r for r in adapter_for(arch).all_rules() if r.megatron.endswith(suffix))


def labelled_qkv(arch):
    """q, k, v biases whose entries say where they came from: which * 10000 + head * 100 + row."""

    def make(which, n_heads):
        return torch.tensor(
            [which * 10000 + head * 100 + row for head in range(n_heads) for row in range(arch.head_dim)],
            dtype=torch.float,
        )

    return make(0, arch.num_attention_heads), make(1, arch.num_query_groups), make(2, arch.num_query_groups)


# --- name maps against the real transformers models ---------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_adapter_names_are_exactly_the_hf_state_dict(name):
    hf = tiny_hf_model(name)
    arch = arch_from_hf_config(hf.config)
    names = adapter_for(arch).hf_names()
    assert len(names) == len(set(names)), "an HF tensor is produced twice"
    state = hf.state_dict()
    stored = set(state) - ({"lm_head.weight"} if arch.tie_word_embeddings else set())
    assert set(names) == stored
    shapes = expected_hf_shapes(arch)
    assert {n: tuple(state[n].shape) for n in names} == shapes


@pytest.mark.parametrize("name", MODELS)
def test_every_megatron_parameter_has_one_rule(name):
    arch = arch_from_hf_config(tiny_hf_model(name).config)
    index = rule_index(adapter_for(arch))
    adapter = adapter_for(arch)
    assert len(index) == len(adapter.pre_rules()) + len(adapter.post_rules()) + arch.num_layers * len(
        adapter.layer_rules()
    )
    assert ("output_layer.weight" in index) is (not arch.tie_word_embeddings)
    assert ("decoder.layers.1.self_attention.linear_qkv.bias" in index) is arch.qkv_bias
    assert ("decoder.layers.0.self_attention.q_layernorm.weight" in index) is arch.qk_layernorm


def test_canonical_names_follow_the_te_spelling_and_global_layer():
    assert (
        canonical_name("decoder.layers.3.input_layernorm.weight", 8)
        == "decoder.layers.11.self_attention.linear_qkv.layer_norm_weight"
    )
    assert (
        canonical_name("decoder.layers.0.pre_mlp_layernorm.weight", 2)
        == "decoder.layers.2.mlp.linear_fc1.layer_norm_weight"
    )
    assert (
        canonical_name("decoder.layers.1.mlp.linear_fc2.weight", 0)
        == "decoder.layers.1.mlp.linear_fc2.weight"
    )
    assert canonical_name("embedding.word_embeddings.weight", 4) == "embedding.word_embeddings.weight"
    assert canonical_name("decoder.layers.0.self_attention.linear_qkv._extra_state", 0) is None


# --- QKV ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "heads, groups", [(8, 4), (8, 1), (8, 8), (6, 2)], ids=["gqa", "mqa", "mha", "gqa-3-per-group"]
)
def test_qkv_merge_split_are_inverse(heads, groups):
    arch = gqa_arch(heads=heads, groups=groups)
    rule = rule_named(arch, "linear_qkv.weight")
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(n * arch.head_dim, arch.hidden_size, generator=generator) for n in (heads, groups, groups)
    )
    fused = hf_to_full(rule, [q, k, v], arch, padded_vocab=10)
    assert fused.shape == ((heads + 2 * groups) * arch.head_dim, arch.hidden_size)
    for original, back in zip((q, k, v), full_to_hf(rule, fused, arch)):
        assert torch.equal(original, back)


def test_qkv_bias_merge_split_are_inverse():
    arch = gqa_arch()
    rule = rule_named(arch, "linear_qkv.bias")
    q, k, v = labelled_qkv(arch)
    back = full_to_hf(rule, hf_to_full(rule, [q, k, v], arch, padded_vocab=10), arch)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), back))


def test_qkv_fused_layout_is_megatrons_per_group_interleave():
    """Megatron's linear_qkv: for each query group g, [its query heads; k_g; v_g]."""
    arch = gqa_arch(heads=4, groups=2, head_dim=2)
    q, k, v = labelled_qkv(arch)  # row label = which * 10000 + head * 100 + row
    fused = hf_to_full(rule_named(arch, "linear_qkv.bias"), [q, k, v], arch, padded_vocab=10)
    expected = []
    for g in range(2):
        for head in (2 * g, 2 * g + 1):
            expected += [head * 100 + r for r in range(2)]
        expected += [10000 + g * 100 + r for r in range(2)]
        expected += [20000 + g * 100 + r for r in range(2)]
    assert fused.tolist() == expected


@pytest.mark.parametrize("tp", [2, 4])
def test_qkv_shard_holds_whole_query_groups(tp):
    arch = gqa_arch(heads=8, groups=4, head_dim=2)
    rule = rule_named(arch, "linear_qkv.bias")
    q, k, v = labelled_qkv(arch)
    fused = hf_to_full(rule, [q, k, v], arch, padded_vocab=10)
    groups_per_rank = arch.num_query_groups // tp
    rank_arch = dataclasses.replace(
        arch, num_attention_heads=arch.num_attention_heads // tp, num_query_groups=groups_per_rank
    )
    for rank in range(tp):
        shard_q, shard_k, shard_v = full_to_hf(rule, tp_shard(Kind.QKV, fused, rank, tp), rank_arch)
        groups = range(rank * groups_per_rank, (rank + 1) * groups_per_rank)
        heads_per_group = arch.num_attention_heads // arch.num_query_groups
        heads = [g * heads_per_group + h for g in groups for h in range(heads_per_group)]
        assert sorted({int(x) // 100 for x in shard_q}) == heads
        assert sorted({int(x) // 100 % 100 for x in shard_k}) == list(groups)
        assert sorted({int(x) // 100 % 100 for x in shard_v}) == list(groups)
        assert all(int(x) // 10000 == 1 for x in shard_k)
        assert all(int(x) // 10000 == 2 for x in shard_v)


# --- gate/up, vocab ----------------------------------------------------------------------
def test_gate_up_fuse_split_and_tp_layout():
    arch = gqa_arch()
    rule = rule_named(arch, "linear_fc1.weight")
    gate, up = torch.arange(24.0).reshape(6, 4), -torch.arange(24.0).reshape(6, 4)
    fused = hf_to_full(rule, [gate, up], arch, padded_vocab=10)
    assert torch.equal(fused, torch.cat([gate, up]))
    assert all(torch.equal(a, b) for a, b in zip((gate, up), full_to_hf(rule, fused, arch)))
    # Each TP rank holds its slice of gate followed by its slice of up (Megatron's SwiGLU shard).
    shard = tp_shard(Kind.GATE_UP, fused, 1, 2)
    assert torch.equal(shard, torch.cat([gate[3:], up[3:]]))


def test_vocab_padding_is_zero_rows_and_export_strips_it():
    arch = gqa_arch()
    rule = rule_named(arch, "word_embeddings.weight")
    embedding = torch.randn(10, arch.hidden_size)
    padded = hf_to_full(rule, [embedding], arch, padded_vocab=16)
    assert padded.shape == (16, arch.hidden_size)
    assert torch.equal(padded[:10], embedding) and not padded[10:].any()
    assert torch.equal(full_to_hf(rule, padded, arch)[0], embedding)
    with pytest.raises(ValueError, match="exceeds the padded size"):
        hf_to_full(rule, [embedding], arch, padded_vocab=8)


# --- tensor-parallel split / join --------------------------------------------------------
FULL_SHAPES = {
    Kind.REPLICATED: (8,),
    Kind.VOCAB: (16, 8),
    Kind.ROW_PARALLEL: (8, 16),
    Kind.QKV: (32, 8),
    Kind.GATE_UP: (16, 8),
}


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.value)
def test_tp_shard_join_are_inverse(kind, tp):
    full = torch.randn(FULL_SHAPES[kind], generator=torch.Generator().manual_seed(tp))
    shards = [tp_shard(kind, full, rank, tp) for rank in range(tp)]
    assert torch.equal(tp_join(kind, shards), full)
    if kind is Kind.REPLICATED:
        assert all(torch.equal(s, full) for s in shards)
    else:
        assert sum(s.numel() for s in shards) == full.numel()
        split_dim = 1 if kind is Kind.ROW_PARALLEL else 0
        assert all(s.shape[split_dim] == full.shape[split_dim] // tp for s in shards)
