"""The model provider: HF config -> ModelArch -> Megatron TransformerConfig / layer spec."""

import json
from types import SimpleNamespace

import pytest
import torch
import transformers
from hf_tiny import make_tiny_model, tiny_config
from mp import run_torchrun

from sept_megatron.convert.adapters import ADAPTERS
from sept_megatron.convert.hf_config import arch_from_hf_config
from sept_megatron.trainer import model as mdl
from sept_megatron.trainer.arch import ModelArch
from sept_megatron.trainer.fp8 import FP8_RECIPES

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


class StubVocab:
    """What tiny_config reads from a tokenizer: its length and special ids."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

    def __len__(self):
        return 300


def arch_of(family: str, **overrides) -> ModelArch:
    return arch_from_hf_config(tiny_config(family, StubVocab(), **overrides))


# --- arch_from_hf_config -----------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_arch_reads_the_shared_fields(family):
    arch = arch_of(family)
    assert arch.model_type == family
    assert (arch.vocab_size, arch.hidden_size, arch.num_layers) == (300, 64, 2)
    assert (arch.num_attention_heads, arch.num_query_groups, arch.head_dim) == (4, 2, 16)
    assert arch.ffn_hidden_size == 128 and arch.norm_eps == 1e-6
    assert arch.rope_theta == 10000.0 and arch.rope_scaling_factor is None
    assert arch.max_position_embeddings == 256 and arch.tie_word_embeddings is False
    assert ModelArch.from_dict(arch.to_dict()) == arch


@pytest.mark.parametrize(
    "family, qkv_bias, qk_layernorm",
    [("llama", False, False), ("mistral", False, False), ("qwen2", True, False), ("qwen3", False, True)],
)
def test_family_quirks(family, qkv_bias, qk_layernorm):
    arch = arch_of(family)
    assert arch.qkv_bias is qkv_bias
    assert arch.qk_layernorm is qk_layernorm


def test_llama_attention_bias_turns_on_qkv_bias():
    assert arch_of("llama", attention_bias=True).qkv_bias is True


def test_tied_embeddings_flag():
    assert arch_of("qwen2", tie_word_embeddings=True).tie_word_embeddings is True
    assert arch_of("qwen2", tie_word_embeddings=False).tie_word_embeddings is False


def test_qwen3_explicit_head_dim_differs_from_hidden_over_heads():
    arch = arch_of("qwen3", head_dim=32)  # Qwen3 checkpoints set head_dim != hidden / heads
    assert arch.head_dim == 32 and arch.hidden_size // arch.num_attention_heads == 16


def test_head_dim_defaults_to_hidden_over_heads():
    assert arch_of("llama", head_dim=None).head_dim == 16


def test_llama3_rope_scaling_factor_is_read_from_rope_parameters():
    arch = arch_of("llama", rope_parameters=dict(LLAMA3_ROPE))
    assert arch.rope_scaling_factor == 8.0
    assert arch.rope_theta == 500000.0


def test_legacy_rope_fields_are_read():
    """Configs written before transformers 5 keep ``rope_theta`` and ``rope_scaling`` apart."""
    legacy = SimpleNamespace(
        model_type="llama",
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        hidden_act="silu",
        tie_word_embeddings=False,
        rope_parameters=None,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    arch = arch_from_hf_config(legacy)
    assert arch.rope_theta == 500000.0 and arch.rope_scaling_factor == 32.0


@pytest.mark.parametrize(
    "config", [transformers.GPT2Config(), transformers.MixtralConfig()], ids=["gpt2", "mixtral"]
)
def test_unsupported_model_type_lists_supported_ones(config):
    with pytest.raises(ValueError) as info:
        arch_from_hf_config(config)
    message = str(info.value)
    assert repr(config.model_type) in message
    for supported in ADAPTERS:
        assert supported in message


@pytest.mark.parametrize(
    "key, value",
    [("low_freq_factor", 2.0), ("high_freq_factor", 8.0), ("original_max_position_embeddings", 4096)],
)
def test_llama3_rope_parameters_megatron_cannot_represent(key, value):
    rope = dict(LLAMA3_ROPE, **{key: value})
    with pytest.raises(ValueError) as info:
        arch_of("llama", rope_parameters=rope)
    assert key in str(info.value) and str(value) in str(info.value)


def test_other_rope_scaling_types_are_rejected():
    with pytest.raises(ValueError, match="'yarn'"):
        arch_of("llama", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})


def test_non_silu_activation_is_rejected():
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        arch_of("llama", hidden_act="gelu")


# --- sizes, dtypes, FP8, layer choice ----------------------------------------------------
@pytest.mark.parametrize(
    "vocab, divisible_by, tp, padded",
    [
        (379, 128, 1, 384),
        (379, 128, 2, 512),
        (384, 128, 1, 384),
        (512, 128, 4, 512),
        (513, 128, 4, 1024),
        (151936, 128, 1, 151936),
        (151936, 128, 8, 152576),
        (1000, 1, 1, 1000),
    ],
)
def test_padded_vocab_size(vocab, divisible_by, tp, padded):
    result = mdl.padded_vocab_size(vocab, divisible_by, tp)
    assert result == padded
    assert result % (divisible_by * tp) == 0 and result >= vocab


def test_resolve_dtype():
    assert mdl.resolve_dtype("bfloat16") is torch.bfloat16
    assert mdl.resolve_dtype("auto") is (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    with pytest.raises(ValueError, match="model.params_dtype='fp8'"):
        mdl.resolve_dtype("fp8")


def test_fp8_kwargs():
    assert mdl.fp8_kwargs(None, "hybrid") == {}
    for recipe in FP8_RECIPES:
        kwargs = mdl.fp8_kwargs(recipe, "e4m3")
        assert kwargs["fp8"] == "e4m3" and kwargs["fp8_recipe"] == recipe


def test_fp8_kwargs_names_a_bad_recipe():
    with pytest.raises(ValueError) as info:
        mdl.fp8_kwargs("mxfp8", "hybrid")
    message = str(info.value)
    assert "model.fp8='mxfp8'" in message
    for recipe in FP8_RECIPES:
        assert recipe in message


def test_fp8_kwargs_names_a_bad_format():
    with pytest.raises(ValueError, match="model.fp8_format='e5m2'"):
        mdl.fp8_kwargs("delayed", "e5m2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answer")
def test_transformer_engine_auto_is_off_on_cpu():
    assert mdl.use_transformer_engine("auto") is False
    assert mdl.use_transformer_engine("local") is False
    assert mdl.use_transformer_engine("transformer_engine") is True


def test_transformer_config_matches_the_hf_architecture():
    arch = arch_of("qwen3", head_dim=32, num_hidden_layers=4)
    config = mdl.transformer_config(arch, tensor_parallel=2, pipeline_parallel=2)
    assert config.kv_channels == 32  # explicit head_dim, not hidden / heads
    assert (config.num_attention_heads, config.num_query_groups) == (4, 2)
    assert config.qk_layernorm is True and config.add_qkv_bias is False
    assert config.gated_linear_unit is True and config.normalization == "RMSNorm"
    assert config.layernorm_epsilon == 1e-6 and config.ffn_hidden_size == 128
    assert config.add_bias_linear is False
    assert config.hidden_dropout == 0.0 and config.attention_dropout == 0.0
    assert (config.tensor_model_parallel_size, config.pipeline_model_parallel_size) == (2, 2)
    assert mdl.transformer_config(arch_of("qwen2")).add_qkv_bias is True


def test_local_layer_spec_has_qk_norm_only_for_qwen3():
    from megatron.core.transformer.identity_op import IdentityOp

    def attention(family):
        return mdl.layer_spec(arch_of(family), transformer_engine=False).submodules.self_attention.submodules

    assert attention("qwen3").q_layernorm is not IdentityOp
    assert attention("qwen3").k_layernorm is not IdentityOp
    assert attention("llama").q_layernorm is IdentityOp


def test_causal_mask_masks_the_future():
    mask = mdl.causal_mask(4)
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1))


# --- GPU: Transformer Engine layers in bf16 ----------------------------------------------
@pytest.mark.gpu
def test_transformer_engine_bf16_logits_match_hf(tmp_path, gpu_env):
    pytest.importorskip("transformer_engine", reason="needs Transformer Engine")
    tokenizer = StubVocab()
    for family in ("llama", "qwen2", "qwen3"):
        hf = make_tiny_model(family, tokenizer, seed=0, initializer_range=0.1)
        hf.save_pretrained(tmp_path / family)
    out = tmp_path / "result.json"
    run_torchrun(1, "tests/trainer/model/_gpu_worker.py", tmp_path, out, env=gpu_env)
    for family, result in json.loads(out.read_text()).items():
        # bf16 rounding is the only difference allowed: Megatron-TE's error against the fp32
        # reference must be of the order of transformers' own bf16 error.
        assert result["megatron_bf16_vs_fp32"] <= 3 * result["hf_bf16_vs_fp32"] + 2e-2, (family, result)


def test_swiglu_fusion_on_cuda_only(monkeypatch):
    """Megatron's SwiGLU function where the trainer computes on CUDA (fewer kept activations);
    the CPU path keeps the unfused one (no inductor compile, the same numbers as before)."""
    from sept_megatron.runtime import distributed

    arch = arch_of("qwen2")
    assert mdl.transformer_config(arch).bias_activation_fusion is False  # this suite: CPU
    monkeypatch.setattr(distributed, "compute_device", lambda: torch.device("cuda", 0))
    assert mdl.transformer_config(arch).bias_activation_fusion is True
