"""HF -> Megatron refuses bad input up front: a clear error naming the tensor or field, no
process group started, and no checkpoint directory (not even a half-written one) left behind."""

import json
import shutil

import pytest
import torch
import transformers
from mp import run_python
from safetensors.torch import load_file, save_file

from sept_megatron.config import ConfigError
from sept_megatron.convert import workflows


@pytest.fixture
def no_process_group(monkeypatch):
    """Every check here must fire before any process group (or model) exists."""

    def refuse(**kwargs):
        raise AssertionError("reached distributed.initialize: the bad input was not caught before start-up")

    monkeypatch.setattr(workflows.distributed, "initialize", refuse)


@pytest.fixture
def qwen2_copy(hf_models, tmp_path):
    """A private copy of the untied Qwen2 checkpoint to break."""
    return shutil.copytree(hf_models / "qwen2", tmp_path / "hf")


def edit_weights(hf_dir, edit) -> None:
    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(hf_dir, **changes) -> None:
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def convert_fails(hf_dir, tmp_path, *, tp: int = 1, pp: int = 1) -> str:
    out = tmp_path / "out" / "ckpt"
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        workflows.convert_hf_to_megatron(str(hf_dir), str(out), tp=tp, pp=pp)
    assert not out.exists() and not (out.parent / ".tmp-ckpt").exists()
    return str(info.value)


def test_missing_tensor_is_named(qwen2_copy, tmp_path, no_process_group):
    edit_weights(qwen2_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    message = convert_fails(qwen2_copy, tmp_path)
    assert "missing" in message and "model.layers.1.mlp.up_proj.weight" in message


def test_unexpected_tensor_is_named(qwen2_copy, tmp_path, no_process_group):
    edit_weights(qwen2_copy, lambda t: t.update({"model.layers.0.self_attn.sinks": torch.zeros(4)}))
    message = convert_fails(qwen2_copy, tmp_path)
    assert "unexpected" in message and "model.layers.0.self_attn.sinks" in message


def test_shape_that_contradicts_the_config_is_named(qwen2_copy, tmp_path, no_process_group):
    vocab = json.loads((qwen2_copy / "config.json").read_text())["vocab_size"]
    edit_config(qwen2_copy, vocab_size=vocab + 21)
    message = convert_fails(qwen2_copy, tmp_path)
    assert "model.embed_tokens.weight" in message
    assert f"({vocab}, 64)" in message and f"({vocab + 21}, 64)" in message


def test_dtype_that_contradicts_the_config_is_named(qwen2_copy, tmp_path, no_process_group):
    edit_config(qwen2_copy, dtype="bfloat16")  # the weights are F32
    message = convert_fails(qwen2_copy, tmp_path)
    assert "F32" in message and "bfloat16" in message and "model." in message


def test_unsupported_architecture_lists_supported_ones(tmp_path, no_process_group):
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    )
    gpt2.save_pretrained(tmp_path / "gpt2")
    message = convert_fails(tmp_path / "gpt2", tmp_path)
    assert "'gpt2'" in message
    for supported in ("llama", "mistral", "qwen2", "qwen3"):
        assert supported in message


def test_tp_that_does_not_divide_heads(qwen2_copy, tmp_path, monkeypatch, no_process_group):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")  # as under torchrun --nproc-per-node=3
    message = convert_fails(qwen2_copy, tmp_path, tp=3)
    assert "parallel.tensor_parallel=3" in message
    assert "4 attention heads" in message and "2 key/value heads" in message


def test_no_config_json(tmp_path, no_process_group):
    (tmp_path / "empty").mkdir()
    assert "no config.json" in convert_fails(tmp_path / "empty", tmp_path)


def test_pickled_weights_only_are_refused(qwen2_copy, tmp_path, no_process_group):
    (qwen2_copy / "model.safetensors").rename(qwen2_copy / "pytorch_model.bin")
    assert "safetensors" in convert_fails(qwen2_copy, tmp_path)


def test_tp_x_pp_must_equal_the_process_count(qwen2_copy, tmp_path, no_process_group):
    with pytest.raises(ConfigError, match="--tp x --pp = 2 but 1 processes were launched"):
        workflows.convert_hf_to_megatron(str(qwen2_copy), str(tmp_path / "x"), tp=2, pp=1)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_tp_x_pp_must_equal_the_process_count(hf_models, tmp_path):
    out = tmp_path / "ckpt"
    result = run_python(
        "tools/convert_hf_to_megatron.py",
        "--hf-dir",
        hf_models / "qwen2",
        "--out",
        out,
        "--tp",
        "1",
        "--pp",
        "2",
        check=False,
    )
    assert result.returncode != 0
    assert "--tp x --pp = 2 but 1 processes were launched" in result.output
    assert "--nproc-per-node=2" in result.output
    assert not out.exists() and not (tmp_path / ".tmp-ckpt").exists()


def test_wrong_process_count_names_only_the_launch(qwen2_copy, tmp_path, monkeypatch, no_process_group):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")  # torchrun --nproc-per-node=8 ... --tp 2 --pp 1
    message = convert_fails(qwen2_copy, tmp_path, tp=2)
    assert "--tp x --pp = 2 but 8 processes were launched" in message
    assert "mini_batch_size" not in message  # the batch rules have no say in a conversion
