"""Read an HF checkpoint into Megatron model stages, tensor by tensor.

Each rank opens the safetensors files lazily and reads only the tensors its own stage needs,
one at a time, so a 70B import never holds the whole model in one process. Every mismatch is
loud: a missing, unexpected or wrongly shaped tensor is named, and so is a dtype that differs
from the one the config declares.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import ExitStack

import torch

from sept_megatron.convert.adapters import (
    Kind,
    LlamaAdapter,
    TensorRule,
    adapter_for,
    canonical_name,
    hf_to_full,
    rule_index,
    tp_shard,
)
from sept_megatron.trainer.arch import ModelArch
from sept_megatron.trainer.model import unwrap_module

log = logging.getLogger(__name__)

# Buffers some HF checkpoints carry that are not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFTensorReader:
    """Lazy access to the tensors of an HF safetensors checkpoint (sharded or single file)."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self.hf_dir = hf_dir
        index_path = os.path.join(hf_dir, "model.safetensors.index.json")
        single_path = os.path.join(hf_dir, "model.safetensors")
        if os.path.exists(index_path):
            with open(index_path) as f:
                self.name_to_file = json.load(f)["weight_map"]
        elif os.path.exists(single_path):
            with safe_open(single_path, framework="pt") as handle:
                self.name_to_file = {n: "model.safetensors" for n in handle.keys()}
        else:
            raise FileNotFoundError(
                f"{hf_dir}: no model.safetensors or model.safetensors.index.json; convert "
                "PyTorch .bin weights to safetensors first (we never unpickle checkpoints)"
            )
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}

    def names(self) -> set[str]:
        return {n for n in self.name_to_file if not n.endswith(_IGNORED_SUFFIXES)}

    def _handle(self, file_name: str):
        from safetensors import safe_open

        if file_name not in self._handles:
            path = os.path.join(self.hf_dir, file_name)
            self._handles[file_name] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self._handles[file_name]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.name_to_file:
            raise KeyError(f"tensor {name!r} is missing from the HF checkpoint {self.hf_dir}")
        return self._handle(self.name_to_file[name]).get_tensor(name)

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        sl = self._handle(self.name_to_file[name]).get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()

    def close(self) -> None:
        self._stack.close()


def expected_hf_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor this architecture must have."""
    h, d = arch.hidden_size, arch.head_dim
    q_out, kv_out = arch.num_attention_heads * d, arch.num_query_groups * d
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q_out, h),
        "self_attn.k_proj.weight": (kv_out, h),
        "self_attn.v_proj.weight": (kv_out, h),
        "self_attn.o_proj.weight": (h, q_out),
        "self_attn.q_proj.bias": (q_out,),
        "self_attn.k_proj.bias": (kv_out,),
        "self_attn.v_proj.bias": (kv_out,),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "mlp.gate_proj.weight": (arch.ffn_hidden_size, h),
        "mlp.up_proj.weight": (arch.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, arch.ffn_hidden_size),
    }
    shapes = {}
    for name in adapter_for(arch).hf_names():
        if name.startswith("model.layers."):
            shapes[name] = per_layer[name.split(".", 3)[3]]
        elif name == "model.norm.weight":
            shapes[name] = (h,)
        else:  # embed_tokens, lm_head
            shapes[name] = (arch.vocab_size, h)
    return shapes


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def validate_hf_checkpoint(
    reader: HFTensorReader, arch: ModelArch, declared_dtype: torch.dtype | None = None
) -> None:
    """Check names, shapes and dtypes before any weight is copied."""
    expected = expected_hf_shapes(arch)
    present = reader.names()
    if arch.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints still store it
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing:
        raise ValueError(
            f"HF checkpoint {reader.hf_dir}: missing tensor(s) {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} for a {arch.model_type} model"
        )
    if unexpected:
        raise ValueError(
            f"HF checkpoint {reader.hf_dir}: unexpected tensor(s) {unexpected[:5]}; "
            "does config.json match these weights?"
        )
    for name, shape in expected.items():
        found_shape, found_dtype = reader.shape_and_dtype(name)
        if found_shape != shape:
            raise ValueError(
                f"HF checkpoint: tensor {name} has shape {found_shape}, the config "
                f"implies {shape} (vocab_size / heads / head_dim mismatch?)"
            )
        found = _SAFETENSORS_DTYPES.get(found_dtype)
        if declared_dtype is not None and found is not None and found != declared_dtype:
            raise ValueError(
                f"HF checkpoint: tensor {name} is {found_dtype} but config.json "
                f"declares {declared_dtype}; fix config.json's dtype"
            )


def layer_offset(model_chunk) -> int:
    """Global index of the first transformer layer of this pipeline stage."""
    layers = model_chunk.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def _rule_for_live_name(index: dict, adapter: LlamaAdapter, canonical: str):
    if canonical == "output_layer.weight" and adapter.arch.tie_word_embeddings:
        # PP>1 with tied embeddings: the last stage keeps its own copy of the embedding.
        return index["embedding.word_embeddings.weight"]
    if canonical not in index:
        raise ValueError(
            f"Megatron parameter {canonical} has no HF counterpart in the {adapter.arch.model_type} adapter"
        )
    return index[canonical]


def load_hf_into_model(
    model_chunks, reader: HFTensorReader, arch: ModelArch, *, padded_vocab: int, tp_rank: int, tp_size: int
) -> int:
    """Copy HF weights into this rank's model stage(s); returns the number of tensors set."""
    adapter = adapter_for(arch)
    index = rule_index(adapter)
    copied = 0
    for chunk in model_chunks:
        offset = layer_offset(chunk)
        for live_name, param in _named_tensors(chunk):
            canonical = canonical_name(live_name, offset)
            if canonical is None:
                continue
            rule, layer = _rule_for_live_name(index, adapter, canonical)
            full = hf_to_full(rule, [reader.get(_fmt(n, layer)) for n in rule.hf], arch, padded_vocab)
            shard = tp_shard(rule.kind, full, tp_rank, tp_size)
            if shard.shape != param.shape:
                raise ValueError(
                    f"{canonical}: HF-derived shard {tuple(shard.shape)} does not fit "
                    f"the Megatron parameter {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(shard.to(param.dtype))
            copied += 1
    return copied


def _named_tensors(chunk):
    """Parameters of a stage (unwrapping Megatron's DDP / Float16Module wrappers)."""
    return list(unwrap_module(chunk).named_parameters())


def _fmt(name: str, layer: int | None) -> str:
    return name.format(i=layer) if layer is not None else name


__all__ = [
    "HFTensorReader",
    "expected_hf_shapes",
    "validate_hf_checkpoint",
    "load_hf_into_model",
    "layer_offset",
    "Kind",
    "TensorRule",
]
