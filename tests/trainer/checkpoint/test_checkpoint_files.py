"""Checkpoint directory bookkeeping: metadata, the ``latest`` pointer, pruning, compatibility.

The tensor side (dist_checkpointing save/load at another layout) runs in the conversion
acceptance tests (tests/convert) and the kill-and-resume loop tests (tests/loop).
"""

import dataclasses
import json

import pytest

from sept_megatron.trainer import checkpoint as ckpt
from sept_megatron.trainer.arch import ModelArch

ARCH = ModelArch(
    model_type="qwen2",
    vocab_size=379,
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,
    head_dim=16,
    ffn_hidden_size=128,
    norm_eps=1e-6,
    rope_theta=10000.0,
    rope_scaling_factor=None,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    qkv_bias=True,
    qk_layernorm=False,
)


def write_checkpoint_dir(path, meta: ckpt.CheckpointMeta):
    path.mkdir(parents=True)
    (path / ckpt.META_FILE).write_text(json.dumps(meta.to_json()))
    return path


def meta(**changes) -> ckpt.CheckpointMeta:
    fields = dict(
        arch=ARCH,
        padded_vocab=384,
        params_dtype="float32",
        tensor_parallel=2,
        pipeline_parallel=1,
        train_state={"round": 3},
    )
    fields.update(changes)
    return ckpt.CheckpointMeta(**fields)


def test_meta_round_trips_through_json():
    original = meta()
    assert ckpt.CheckpointMeta.from_json(json.loads(json.dumps(original.to_json()))) == original


def test_meta_of_another_format_version_is_refused():
    data = meta().to_json()
    data["format"] = ckpt.FORMAT_VERSION + 1
    with pytest.raises(ValueError, match="format"):
        ckpt.CheckpointMeta.from_json(data)


def test_resolve_follows_the_latest_pointer(tmp_path):
    write_checkpoint_dir(tmp_path / "round_000002", meta())
    (tmp_path / ckpt.LATEST_FILE).write_text("round_000002\n")
    assert ckpt.resolve_checkpoint(str(tmp_path)) == str(tmp_path / "round_000002")
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(tmp_path / "round_000002")
    assert ckpt.read_meta(str(tmp_path)).train_state == {"round": 3}
    assert ckpt.is_checkpoint(str(tmp_path)) and ckpt.is_checkpoint(str(tmp_path / "round_000002"))


def test_a_directory_without_metadata_is_not_a_checkpoint(tmp_path):
    assert ckpt.latest_checkpoint(str(tmp_path)) is None
    assert not ckpt.is_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=ckpt.META_FILE):
        ckpt.resolve_checkpoint(str(tmp_path))


def test_a_half_written_temp_dir_is_never_resolved(tmp_path):
    write_checkpoint_dir(tmp_path / ".tmp-round_000003", meta())
    assert ckpt.latest_checkpoint(str(tmp_path)) is None


def test_prune_keeps_the_newest_and_the_one_latest_names(tmp_path):
    for r in range(1, 6):
        write_checkpoint_dir(tmp_path / f"round_{r:06d}", meta())
    (tmp_path / ckpt.LATEST_FILE).write_text("round_000002\n")
    ckpt.prune_checkpoints(str(tmp_path), keep=2)
    remaining = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("round_"))
    assert remaining == ["round_000002", "round_000004", "round_000005"]


def test_hf_side_files_travel_without_weights(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    for name in ("config.json", "tokenizer.json", "generation_config.json", "model.safetensors"):
        (src / name).write_text("{}")
    ckpt.copy_hf_side_files(str(src), str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
    ]


def test_compatibility_names_every_differing_field():
    ckpt.check_compatible(meta(), ARCH, tensor_parallel=2)
    other = dataclasses.replace(ARCH, hidden_size=128, num_layers=4)
    with pytest.raises(ValueError) as info:
        ckpt.check_compatible(meta(), other, tensor_parallel=1)
    message = str(info.value)
    assert "hidden_size: checkpoint 64 vs model 128" in message
    assert "num_layers: checkpoint 2 vs model 4" in message


def test_compatibility_checks_the_padded_vocab_against_tp():
    with pytest.raises(ValueError, match="parallel.tensor_parallel=5"):
        ckpt.check_compatible(meta(), ARCH, tensor_parallel=5)


def test_dtype_names():
    import torch

    assert ckpt.torch_dtype_name(torch.bfloat16) == "bfloat16"
    assert getattr(torch, ckpt.torch_dtype_name(torch.float32)) is torch.float32
