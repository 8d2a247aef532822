"""HF <-> Megatron conversion: adapters (name maps + transforms), streaming import and export."""

from sept_megatron.convert.adapters import (
    ADAPTERS,
    Kind,
    TensorRule,
    adapter_for,
    canonical_name,
    full_to_hf,
    hf_to_full,
    rule_index,
    tp_join,
    tp_shard,
)
from sept_megatron.convert.hf_export import export_megatron_to_hf
from sept_megatron.convert.hf_import import (
    HFTensorReader,
    expected_hf_shapes,
    layer_offset,
    load_hf_into_model,
    validate_hf_checkpoint,
)

__all__ = [
    "ADAPTERS",
    "Kind",
    "TensorRule",
    "adapter_for",
    "canonical_name",
    "full_to_hf",
    "hf_to_full",
    "rule_index",
    "tp_join",
    "tp_shard",
    "export_megatron_to_hf",
    "HFTensorReader",
    "expected_hf_shapes",
    "layer_offset",
    "load_hf_into_model",
    "validate_hf_checkpoint",
]
