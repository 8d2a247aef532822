"""The blockwise FP8 quantiser (sept_megatron/convert/fp8.py), in isolation: shapes, error
bounds, zero blocks, the bucket transform, the adapters' declarations and bad input."""

import math

import pytest
import torch
from hf_tiny import tiny_config

from sept_megatron.convert.adapters import ADAPTERS, adapter_for
from sept_megatron.convert.fp8 import (
    BLOCK,
    E4M3_MAX,
    FP8_DTYPE,
    check_export_recipe,
    dequantize_blockwise,
    hf_quantization_config,
    quantize_blockwise,
    quantize_hf_tensors,
    rollout_bucket_transform,
    scale_grid,
    scale_name,
    sglang_block_problems,
)
from sept_megatron.convert.hf_config import arch_from_hf_config
from sept_megatron.trainer.arch import ModelArch

# e4m3 keeps 3 mantissa bits: rounding a normal value costs at most half a unit in the last
# place, 2^-4 of it; a subnormal one at most half the subnormal step 2^-9 (times the scale).
# Per block, the largest error is half the spacing of the top binade [256, 448]: 16 / 448.
E4M3_RELATIVE = 2.0**-4
E4M3_SUBNORMAL_ABS = 2.0**-10
BLOCK_RELATIVE = 16 / 448


class StubVocab:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

    def __len__(self):
        return 300


def per_element_scales(scale_inv, shape):
    grid = scale_inv.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    return grid[: shape[0], : shape[1]]


def block_relative_errors(weight, quantized, scale_inv) -> torch.Tensor:
    """[ceil(out/128), ceil(in/128)]: each block's max |dequantised - original| / its amax."""
    weight = weight.float()
    error = (dequantize_blockwise(quantized, scale_inv) - weight).abs()
    rows, cols = scale_grid(tuple(weight.shape))
    ratios = torch.zeros(rows, cols)
    for i in range(rows):
        for j in range(cols):
            block = (slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK))
            amax = weight[block].abs().max()
            ratios[i, j] = error[block].max() / amax if amax > 0 else error[block].max()
    return ratios


def assert_within_e4m3_error(weight, quantized, scale_inv):
    """Element-wise and per-block bounds of e4m3 rounding after amax scaling."""
    weight = weight.float()
    error = (dequantize_blockwise(quantized, scale_inv) - weight).abs()
    scales = per_element_scales(scale_inv, weight.shape)
    bound = E4M3_RELATIVE * weight.abs() * (1 + 1e-6) + E4M3_SUBNORMAL_ABS * scales
    assert (error <= bound).all(), float((error - bound).max())
    assert (block_relative_errors(weight, quantized, scale_inv) <= BLOCK_RELATIVE * (1 + 1e-6)).all()


@pytest.mark.parametrize("shape", [(128, 128), (256, 384), (64, 32), (300, 200), (129, 257), (1, 1)])
def test_shapes_and_error_bound(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    quantized, scale_inv = quantize_blockwise(weight)
    assert quantized.dtype == FP8_DTYPE and quantized.shape == weight.shape
    assert scale_inv.dtype == torch.float32
    assert tuple(scale_inv.shape) == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    assert_within_e4m3_error(weight, quantized, scale_inv)


def test_scales_are_block_amax_over_448_and_the_amax_survives_exactly():
    weight = torch.randn(200, 300, generator=torch.Generator().manual_seed(1))
    quantized, scale_inv = quantize_blockwise(weight)
    for i in range(2):
        for j in range(3):
            block = weight[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            assert scale_inv[i, j] == block.abs().max() / E4M3_MAX
            # The element holding the amax becomes exactly +-448.
            q_block = quantized[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
            assert q_block.abs().max() == E4M3_MAX


def test_padding_does_not_leak_into_partial_blocks():
    """An edge block's scale comes from its real elements only (zeros cannot raise an amax)."""
    weight = torch.full((130, 130), 0.5)
    weight[128:, :] = 0.001  # the bottom partial blocks hold only small values
    _, scale_inv = quantize_blockwise(weight)
    assert scale_inv[0, 0] == 0.5 / E4M3_MAX
    assert scale_inv[1, 0] == torch.tensor(0.001) / E4M3_MAX


def test_all_zero_blocks_dequantise_to_zero_with_a_finite_scale():
    weight = torch.zeros(200, 130)
    weight[150:, :] = 1.0
    quantized, scale_inv = quantize_blockwise(weight)
    assert torch.isfinite(scale_inv).all() and (scale_inv > 0).all()
    assert torch.equal(dequantize_blockwise(quantized, scale_inv), weight)


def test_values_representable_in_e4m3_round_trip_exactly():
    """A block whose values are e4m3 numbers times a power of two comes back bit-exactly."""
    values = torch.arange(-448, 449, dtype=torch.float32).to(FP8_DTYPE).float().unique()
    weight = values[torch.randint(len(values), (128, 256), generator=torch.Generator().manual_seed(2))]
    weight[0, 0] = weight[0, 128] = 448.0  # each block's amax is 448 x 2^-12: scale_inv = 2^-12
    weight = weight * 2.0**-12
    quantized, scale_inv = quantize_blockwise(weight)
    assert torch.equal(dequantize_blockwise(quantized, scale_inv), weight)


def test_bf16_input_is_quantised_from_its_exact_fp32_values():
    weight = torch.randn(256, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    q_bf16, s_bf16 = quantize_blockwise(weight)
    q_fp32, s_fp32 = quantize_blockwise(weight.float())
    assert torch.equal(q_bf16.view(torch.uint8), q_fp32.view(torch.uint8))
    assert torch.equal(s_bf16, s_fp32)
    assert_within_e4m3_error(weight, q_bf16, s_bf16)


def test_quantiser_is_deterministic_bitwise():
    weight = torch.randn(300, 500, generator=torch.Generator().manual_seed(4))
    first, second = quantize_blockwise(weight), quantize_blockwise(weight.clone())
    assert torch.equal(first[0].view(torch.uint8), second[0].view(torch.uint8))
    assert torch.equal(first[1], second[1])


# --- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tensor, message",
    [
        (torch.zeros(8), "2-D"),
        (torch.zeros(2, 3, 4), "2-D"),
        (torch.zeros(4, 4, dtype=torch.int32), "bf16/fp16/fp32"),
        (torch.zeros(4, 4).to(FP8_DTYPE), "bf16/fp16/fp32"),
    ],
)
def test_quantiser_rejects_what_it_cannot_quantise(tensor, message):
    with pytest.raises(ValueError, match=message):
        quantize_blockwise(tensor)


def test_quantiser_rejects_non_finite_weights():
    weight = torch.zeros(4, 4)
    weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match="inf/NaN"):
        quantize_blockwise(weight)


def test_dequantiser_checks_the_scale_grid():
    quantized, scale_inv = quantize_blockwise(torch.ones(300, 100))
    with pytest.raises(ValueError, match=r"expected \(3, 1\)"):
        dequantize_blockwise(quantized, scale_inv[:2])


def test_non_2d_tensor_declared_quantised_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match="model.layers.0.self_attn.q_norm.weight is declared FP8-quantised .* shape \\(16,\\)",
    ):
        quantize_hf_tensors(
            [("model.layers.0.self_attn.q_norm.weight", torch.ones(16))],
            {"model.layers.0.self_attn.q_norm.weight"},
        )


def test_a_quantised_name_must_be_a_weight():
    with pytest.raises(ValueError, match="not a '.weight' tensor"):
        scale_name("model.layers.0.self_attn.q_proj.bias")


@pytest.mark.parametrize("recipe", ["tensorwise", "e4m3", "mxfp8", ""])
def test_unknown_export_recipe_names_the_choices(recipe):
    with pytest.raises(ValueError, match="choose one of blockwise"):
        check_export_recipe(recipe)
    check_export_recipe(None)
    check_export_recipe("blockwise")


def test_unknown_rollout_weights_is_an_error():
    arch = arch_from_hf_config(tiny_config("llama", StubVocab()))
    with pytest.raises(ValueError, match="rollout.weights='int8'"):
        rollout_bucket_transform("int8", arch)


# --- the bucket transform and the adapters' declarations ----------------------------------------
@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", {}),
        ("mistral", {}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("qwen2", {}),
        ("qwen3", {"head_dim": 32}),
    ],
)
def test_adapters_declare_exactly_the_attention_and_mlp_linear_weights(family, overrides):
    arch = arch_from_hf_config(tiny_config(family, StubVocab(), **overrides))
    adapter = adapter_for(arch)
    declared = adapter.fp8_hf_names()
    linear = (
        "q_proj.weight",
        "k_proj.weight",
        "v_proj.weight",
        "o_proj.weight",
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
    )
    expected = {n for n in adapter.hf_names() if n.endswith(linear)}
    assert declared == expected
    assert len(declared) == 7 * arch.num_layers
    untouched = set(adapter.hf_names()) - declared
    assert "model.embed_tokens.weight" in untouched and "model.norm.weight" in untouched
    assert all("norm" in n or "bias" in n or "embed" in n or n == "lm_head.weight" for n in untouched)


def test_every_family_has_an_adapter_under_test():
    assert set(ADAPTERS) == {"llama", "mistral", "qwen2", "qwen3"}


def test_bucket_transform_quantises_declared_weights_and_passes_the_rest_through():
    arch = arch_from_hf_config(tiny_config("qwen2", StubVocab()))
    gen = torch.Generator().manual_seed(5)
    bucket = [
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(64, 64, generator=gen)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(64, generator=gen)),
        ("model.layers.0.input_layernorm.weight", torch.randn(64, generator=gen)),
        ("model.layers.0.mlp.down_proj.weight", torch.randn(64, 128, generator=gen)),
    ]
    native = list(rollout_bucket_transform("native", arch)(iter([bucket])))
    assert native == [bucket]
    (out,) = list(rollout_bucket_transform("fp8", arch)(iter([bucket])))
    assert [n for n, _ in out] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.weight_scale_inv",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.mlp.down_proj.weight_scale_inv",
    ]
    tensors = dict(out)
    assert tensors["model.layers.0.self_attn.q_proj.bias"] is bucket[1][1]
    assert tensors["model.layers.0.input_layernorm.weight"] is bucket[2][1]
    for name, original in (bucket[0], bucket[3]):
        assert tensors[name].dtype == FP8_DTYPE
        assert_within_e4m3_error(original, tensors[name], tensors[scale_name(name)])


def test_quantization_config_is_the_published_format():
    assert hf_quantization_config() == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }


# --- SGLang's block constraints ------------------------------------------------------------
def arch_like(**fields):
    base = dict(
        model_type="qwen2",
        vocab_size=1000,
        hidden_size=1536,
        num_layers=2,
        num_attention_heads=12,
        num_query_groups=2,
        head_dim=128,
        ffn_hidden_size=8960,
        norm_eps=1e-6,
        rope_theta=1e6,
        rope_scaling_factor=None,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        qkv_bias=True,
        qk_layernorm=False,
    )
    return ModelArch(**(base | fields))


def test_sglang_block_problems_of_a_qwen2_5_1_5b_shape():
    arch = arch_like()  # Qwen2.5-1.5B: ffn 8960 = 70 x 128
    assert sglang_block_problems(arch, 1) == []
    assert sglang_block_problems(arch, 2) == []
    problems = sglang_block_problems(arch, 4)  # 8960 / 4 = 2240 = 17.5 x 128
    assert any("gate/up_proj output" in p and "2240" in p for p in problems)
    assert any("down_proj input" in p and "2240" in p for p in problems)


def test_sglang_block_problems_flag_small_kv_projections():
    arch = arch_like(
        head_dim=64, hidden_size=768, num_attention_heads=12, num_query_groups=1, ffn_hidden_size=2048
    )  # one KV head of 64: k/v outputs of 64 rows
    (problem,) = sglang_block_problems(arch, 1)
    assert "k/v_proj output" in problem and " 64 " in problem


def test_export_warns_only_about_shapes_transformers_misreads(caplog):
    """transformers' CPU dequantiser takes the block as dim // scale_dim: a dimension <= 128
    (one partial block) or a multiple of 128 reads right; 192 (two scale rows -> 96) does not."""
    from sept_megatron.convert.hf_export import _warn_partial_blocks

    read_right = {"a.weight": (64, 96), "b.weight": (256, 128), "c.weight": (128, 40)}
    with caplog.at_level("WARNING", logger="sept_megatron.convert.hf_export"):
        _warn_partial_blocks(read_right, set(read_right))
    assert not caplog.records
    misread = {**read_right, "d.weight": (192, 64), "e.weight": (64, 576)}
    with caplog.at_level("WARNING", logger="sept_megatron.convert.hf_export"):
        _warn_partial_blocks(misread, set(misread))
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith("2 FP8 weights")
