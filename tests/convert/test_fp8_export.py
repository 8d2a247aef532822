"""FP8 export and FP8 rollout sync, end to end, for every family (one launch: _fp8_worker.py).

HF -> Megatron -> ``convert_megatron_to_hf.py --fp8 blockwise``: every declared linear weight is
e4m3 with a ceil(out/128) x ceil(in/128) fp32 ``weight_scale_inv`` and dequantises to the
original within e4m3's rounding error; every other tensor is bit-identical to the original;
shards, index and config are a loadable FP8 checkpoint. The per-round sync with
``rollout.weights=fp8`` streams exactly the same bytes. Shapes: the tiny models' (<= 128, one
partial block per dimension), a "wide" Llama whose shapes are multi-block and not multiples of
128 (192, 320, 48-wide heads), and a bf16 checkpoint.
"""

import importlib.util
import json
import math

import pytest
import torch
from hf_checkpoints import MODELS, save_hf_model
from mp import REPO_ROOT, run_python
from safetensors import safe_open
from safetensors.torch import load_file
from test_fp8 import assert_within_e4m3_error, block_relative_errors

from sept_megatron.convert import export_megatron_to_hf
from sept_megatron.convert.adapters import adapter_for
from sept_megatron.convert.fp8 import (
    BLOCK,
    FP8_DTYPE,
    dequantize_blockwise,
    hf_quantization_config,
    quantize_blockwise,
    scale_name,
)
from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config

pytestmark = pytest.mark.slow

WIDE = ("llama", {"hidden_size": 192, "intermediate_size": 320, "head_dim": 48})
# name -> (HF checkpoint under the fixture's root, conversion dtype)
CASES = {
    **{name: (name, "float32") for name in MODELS},
    "llama-wide": ("llama-wide", "float32"),
    "qwen3-bf16": ("qwen3", "bfloat16"),
}
SINGLE_OR_ALIGNED = [n for n in CASES if n != "llama-wide"]  # every FP8 dim <= 128


@pytest.fixture(scope="module")
def exported(hf_models, demo_tokenizer, tmp_path_factory):
    family, overrides = WIDE
    save_hf_model(family, demo_tokenizer, hf_models / "llama-wide", seed=7, **overrides)
    work = tmp_path_factory.mktemp("fp8")
    specs = [f"{name}={hf_models / hf}:{dtype}" for name, (hf, dtype) in CASES.items()]
    run_python("tests/convert/_fp8_worker.py", work, *specs, timeout=900)
    return work


def read_dir(hf_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def original(hf_models, name):
    hf, dtype = CASES[name]
    return {k: v.to(getattr(torch, dtype)) for k, v in read_dir(hf_models / hf).items()}, arch_from_hf_config(
        load_hf_config(str(hf_models / hf))
    )


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8) if tensor.dtype == FP8_DTYPE else tensor


@pytest.mark.parametrize("name", CASES)
def test_names_shapes_and_dtypes(name, hf_models, exported):
    weights, arch = original(hf_models, name)
    fp8 = read_dir(exported / f"{name}-fp8")
    declared = adapter_for(arch).fp8_hf_names()
    assert declared and declared <= set(weights)
    assert set(fp8) == set(weights) | {scale_name(n) for n in declared}
    for tensor_name, tensor in weights.items():
        if tensor_name in declared:
            assert fp8[tensor_name].dtype == FP8_DTYPE and fp8[tensor_name].shape == tensor.shape
            scales = fp8[scale_name(tensor_name)]
            assert scales.dtype == torch.float32
            assert tuple(scales.shape) == (
                math.ceil(tensor.shape[0] / BLOCK),
                math.ceil(tensor.shape[1] / BLOCK),
            ), tensor_name
        else:  # norms, embeddings, lm_head, biases: exactly the training-dtype tensor
            assert fp8[tensor_name].dtype == tensor.dtype, tensor_name
            assert torch.equal(fp8[tensor_name], tensor), tensor_name


def test_the_wide_model_has_multi_block_partial_shapes(hf_models, exported):
    fp8 = read_dir(exported / "llama-wide-fp8")
    assert fp8["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (3, 2)  # 320 x 192
    assert fp8["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 3)  # 192 x 320
    assert fp8["model.layers.0.self_attn.k_proj.weight_scale_inv"].shape == (1, 2)  # 96 x 192


@pytest.mark.parametrize("name", CASES)
def test_dequantised_weights_are_the_originals_within_e4m3_error(name, hf_models, exported):
    weights, arch = original(hf_models, name)
    fp8 = read_dir(exported / f"{name}-fp8")
    worst_block, worst_l2 = 0.0, 0.0
    for tensor_name in adapter_for(arch).fp8_hf_names():
        weight, scales = fp8[tensor_name], fp8[scale_name(tensor_name)]
        assert_within_e4m3_error(weights[tensor_name], weight, scales)
        # The export is the quantiser applied to the training-dtype tensor, bit for bit.
        expected = quantize_blockwise(weights[tensor_name])
        assert torch.equal(bits(weight), bits(expected[0])) and torch.equal(scales, expected[1])
        reference = weights[tensor_name].float()
        error = dequantize_blockwise(weight, scales) - reference
        worst_block = max(worst_block, float(block_relative_errors(reference, weight, scales).max()))
        worst_l2 = max(worst_l2, float(error.norm() / reference.norm()))
    # Figures for the README (pytest -s): per-block max error over the block amax (bound
    # 16/448 = 0.0357) and the tensor's relative L2 error.
    print(
        f"\n{name}: max block error / block amax <= {worst_block:.4f}, max relative L2 error {worst_l2:.4f}"
    )


@pytest.mark.parametrize("name", CASES)
def test_shards_index_and_config(name, hf_models, exported):
    export = exported / f"{name}-fp8"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    files = sorted(set(weight_map.values()))
    assert len(files) > 1 and sorted(p.name for p in export.glob("*.safetensors")) == files
    total = 0
    for file_name in files:
        with safe_open(export / file_name, framework="pt") as handle:
            names = set(handle.keys())
            assert names == {n for n, f in weight_map.items() if f == file_name}
            total += sum(handle.get_tensor(n).numel() * handle.get_tensor(n).element_size() for n in names)
    assert index["metadata"]["total_size"] == total
    assert any(n.endswith(".weight_scale_inv") for n in weight_map)
    hf, dtype = CASES[name]
    config = json.loads((export / "config.json").read_text())
    source = json.loads((hf_models / hf / "config.json").read_text())
    assert config.pop("quantization_config") == hf_quantization_config()
    assert config.pop("dtype") == dtype and source.pop("dtype") == "float32"
    assert config == source
    assert (export / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", CASES)
def test_sync_streams_the_exported_bytes(name, exported):
    """rollout.weights=fp8 through weight_sync.sync == the exported safetensors, bitwise."""
    exported_tensors = read_dir(exported / f"{name}-fp8")
    streamed = load_file(exported / f"{name}-sync.safetensors")
    summary = json.loads((exported / f"{name}-sync.json").read_text())
    assert summary["buckets"] > 1
    order = summary["order"]
    assert sorted(order) == sorted(exported_tensors)
    for i, tensor_name in enumerate(order):  # each FP8 weight is followed by its scales
        if streamed[tensor_name].dtype == FP8_DTYPE:
            assert order[i + 1] == scale_name(tensor_name)
    for tensor_name, tensor in exported_tensors.items():
        assert streamed[tensor_name].dtype == tensor.dtype, tensor_name
        assert torch.equal(bits(streamed[tensor_name]), bits(tensor)), tensor_name


@pytest.mark.parametrize("name", SINGLE_OR_ALIGNED)
def test_transformers_loads_the_fp8_export_on_cpu(name, hf_models, exported):
    """transformers' FineGrainedFP8 quantizer dequantises an FP8 checkpoint on a machine
    without a GPU (it needs accelerate). Its CPU dequantiser infers the block size as
    rows // scale_rows (integrations/finegrained_fp8.py, Fp8Dequantize._dequantize_one), so
    it is exact only when every FP8 dimension is <= 128 or a multiple of 128: the wide model
    is left out (SGLang and vLLM use ceil-sized grids for it)."""
    pytest.importorskip(
        "accelerate", reason="transformers' FP8 loader needs accelerate (pip install 'sept_megatron[test]')"
    )
    from transformers import AutoModelForCausalLM

    weights, arch = original(hf_models, name)
    fp8 = read_dir(exported / f"{name}-fp8")
    model = AutoModelForCausalLM.from_pretrained(exported / f"{name}-fp8", local_files_only=True)
    state = model.state_dict()
    declared = adapter_for(arch).fp8_hf_names()
    assert declared <= set(state)
    for tensor_name, tensor in weights.items():
        if tensor_name in declared:
            expected = dequantize_blockwise(fp8[tensor_name], fp8[scale_name(tensor_name)])
            assert torch.equal(state[tensor_name].float(), expected.to(state[tensor_name].dtype).float()), (
                tensor_name
            )
        else:
            assert torch.equal(state[tensor_name], tensor.to(state[tensor_name].dtype)), tensor_name
    tokens = torch.randint(0, arch.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(tokens).logits).all()


# --- bad input ----------------------------------------------------------------------------------
def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unknown_fp8_recipe_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        load_tool("convert_megatron_to_hf").main(
            ["--ckpt", str(tmp_path), "--out", str(tmp_path / "out"), "--fp8", "tensorwise"]
        )
    assert info.value.code == 2
    assert "--fp8: invalid choice: 'tensorwise'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_fp8_recipe_is_refused_before_the_checkpoint_is_read(tmp_path):
    with pytest.raises(ValueError, match="--fp8 'mxfp8': unknown FP8 export recipe; choose one of blockwise"):
        export_megatron_to_hf(str(tmp_path / "no-such-ckpt"), str(tmp_path / "out"), fp8="mxfp8")
    assert not (tmp_path / "out").exists()
