"""model.fp8 refusals (sept_megatron/trainer/fp8.py), on CPU: each reason FP8 training cannot
run is named with its fix, before any model is built. The machine facts (CUDA, compute
capability, Transformer Engine) are set with monkeypatch; the GPU runs are in
test_te_fp8_gpu.py."""

import sys
import types
from types import SimpleNamespace

import pytest
import torch
from packaging.version import Version

from sept_megatron.trainer import fp8 as fp8_training
from sept_megatron.trainer import model as mdl
from sept_megatron.trainer.arch import ModelArch
from sept_megatron.trainer.sft import Sample, padded_length


def arch_with(**fields) -> ModelArch:
    base = dict(
        model_type="llama",
        vocab_size=300,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=16,
        ffn_hidden_size=160,
        norm_eps=1e-6,
        rope_theta=1e4,
        rope_scaling_factor=None,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        qkv_bias=False,
        qk_layernorm=False,
    )
    return ModelArch(**(base | fields))


@pytest.fixture
def hopper(monkeypatch):
    """A visible H100 (compute capability 9.0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")


def fake_transformer_engine(monkeypatch, version: str, verdict=(True, "")):
    """transformer_engine importable at ``version``, its own FP8 check answering ``verdict``."""
    import megatron.core.utils  # first: importing it with a fake TE would ask TE's version

    monkeypatch.setattr(megatron.core.utils, "get_te_version", lambda: Version(version))
    manager = SimpleNamespace(
        is_fp8_available=lambda: verdict, is_fp8_block_scaling_available=lambda: verdict
    )
    fp8_module = types.ModuleType("transformer_engine.pytorch.fp8")
    fp8_module.FP8GlobalStateManager = manager
    for name, module in (
        ("transformer_engine", types.ModuleType("transformer_engine")),
        ("transformer_engine.pytorch", types.ModuleType("transformer_engine.pytorch")),
        ("transformer_engine.pytorch.fp8", fp8_module),
    ):
        monkeypatch.setitem(sys.modules, name, module)


def test_no_cuda_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in fp8_training.fp8_unsupported_reason("delayed")


def test_pre_hopper_gpu_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    reason = fp8_training.fp8_unsupported_reason("tensorwise")
    assert "A100" in reason and "compute capability 8.0" in reason and "Hopper" in reason


def test_missing_transformer_engine_is_named_with_the_install(monkeypatch, hopper):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import raises ImportError
    reason = fp8_training.fp8_unsupported_reason("delayed")
    assert "Transformer Engine is not installed" in reason and "sept_megatron[gpu]" in reason


@pytest.mark.parametrize(
    "recipe, version, too_old",
    [
        ("blockwise", "2.2.1", True),
        ("blockwise", "2.3.0", False),
        ("tensorwise", "2.1.0", True),
        ("tensorwise", "2.2.0", False),
        ("delayed", "2.0.0", True),
        ("delayed", "2.1.0", False),
    ],
)
def test_transformer_engine_version_per_recipe(monkeypatch, hopper, recipe, version, too_old):
    fake_transformer_engine(monkeypatch, version)
    reason = fp8_training.fp8_unsupported_reason(recipe)
    if too_old:
        assert f"Transformer Engine {version} is too old for the {recipe} recipe" in reason
        assert fp8_training.MIN_TE_VERSION[recipe] in reason
    else:
        assert reason is None


def test_transformer_engines_own_refusal_is_passed_on(monkeypatch, hopper):
    fake_transformer_engine(
        monkeypatch,
        "2.8.0",
        verdict=(False, "FP8 block scaled GEMM requires compute capability 9.0 or higher and CUDA >= 12.9."),
    )
    reason = fp8_training.fp8_unsupported_reason("blockwise")
    assert "refuses the blockwise recipe" in reason and "CUDA >= 12.9" in reason


def test_unknown_recipe():
    assert "choose one of delayed, tensorwise, blockwise" in fp8_training.fp8_unsupported_reason("mxfp8")


def test_shape_problems_depend_on_the_tensor_parallel_size():
    arch = arch_with(ffn_hidden_size=160)  # 160 = 10 x 16
    assert fp8_training.fp8_shape_problems(arch, 1) == []
    assert fp8_training.fp8_shape_problems(arch, 2) == []  # 80 = 5 x 16
    (problem,) = fp8_training.fp8_shape_problems(arch, 4)
    assert "ffn_hidden_size per TP rank = 40" in problem and "tensor_parallel=4" in problem


def test_every_reason_is_given_at_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as info:
        fp8_training.require_fp8_training(
            "delayed", arch_with(hidden_size=72, head_dim=18), tensor_parallel=1, transformer_engine=False
        )
    message = str(info.value)
    assert message.startswith("model.fp8='delayed' cannot run:")
    assert "model.transformer_impl=auto" in message and "no CUDA device" in message
    assert "hidden_size = 72" in message and "model.fp8=null" in message


def test_build_refuses_before_any_model_exists(monkeypatch):
    """No process group exists here: reaching Megatron's model code would fail differently."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="model.fp8='blockwise' cannot run: .*no CUDA device"):
        mdl.build_megatron_model(
            arch_with(),
            tensor_parallel=1,
            pipeline_parallel=1,
            transformer_impl="auto",
            fp8="blockwise",
            padded_vocab=384,
        )


def test_token_multiple_pads_micro_batches_for_fp8_gemms():
    assert fp8_training.token_multiple(SimpleNamespace(fp8=None)) == 8
    config = SimpleNamespace(fp8="hybrid", sequence_parallel=False, tensor_model_parallel_size=4)
    assert fp8_training.token_multiple(config) == 16
    config.sequence_parallel = True  # each TP rank's GEMMs see seq / TP tokens
    assert fp8_training.token_multiple(config) == 64
    samples = [Sample(prompt_ids=[1] * 10, response_ids=[2] * 11)]  # 20 positions
    assert padded_length(samples, 16) == 32 and padded_length(samples, 64) == 64
