"""Both conversion tools and check_logits on the real CUDA path (bf16), at TP=1 and, where two
GPUs are visible, TP=2. Skipped without CUDA (see tests/conftest.py)."""

import json

import pytest
import torch
from hf_tiny import make_tiny_model, make_tokenizer
from mp import run_python, run_torchrun
from safetensors.torch import load_file

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def bf16_hf(tmp_path_factory):
    """A tiny Qwen2 saved in bf16 (config.json declares bfloat16, as real checkpoints do)."""
    root = tmp_path_factory.mktemp("gpu_convert")
    tokenizer = make_tokenizer(root / "tok")
    model = make_tiny_model("qwen2", tokenizer, seed=0, initializer_range=0.1).to(torch.bfloat16)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    assert json.loads((root / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    return root / "hf"


def hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("tp", [1, 2])
def test_convert_check_logits_and_export_on_gpu(bf16_hf, tmp_path, tp, gpu_env, gpu_count):
    if tp > gpu_count:
        pytest.skip(f"TP={tp} needs {tp} GPUs")
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf_out"
    run_torchrun(
        tp,
        "tools/convert_hf_to_megatron.py",
        "--hf-dir",
        bf16_hf,
        "--out",
        ckpt,
        "--tp",
        str(tp),
        env=gpu_env,
    )
    # Exit code 0 = within the bf16 tolerance (3e-2 of the largest |logit|).
    checked = run_torchrun(tp, "tools/check_logits.py", "--hf-dir", bf16_hf, "--ckpt", ckpt, env=gpu_env)
    assert "bfloat16; relative tolerance" in checked.output, checked.output[-2000:]
    run_python("tools/convert_megatron_to_hf.py", "--ckpt", ckpt, "--out", out, env=gpu_env)
    original, exported = hf_tensors(bf16_hf), hf_tensors(out)
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert exported[name].dtype == torch.bfloat16
        assert torch.equal(exported[name], tensor), name
