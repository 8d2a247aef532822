"""A local Hugging Face config -> :class:`~sept_megatron.trainer.arch.ModelArch`.

Which families exist, and their fixed traits (q/k/v biases, qk-norm), is declared by their
adapters (:mod:`sept_megatron.convert.adapters`); this module only reads a config through them.
"""

from __future__ import annotations

import logging
from typing import Any

from sept_megatron.convert.adapters import family_for
from sept_megatron.trainer.arch import ModelArch

log = logging.getLogger(__name__)

# Megatron's llama3 rope scaling hard-codes these (rotary_pos_embedding.py, 0.16.x).
_MEGATRON_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def load_hf_config(hf_dir: str):
    """The transformers config of a local HF checkpoint dir (never the hub)."""
    import os

    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(
            f"{hf_dir}: no config.json; model.hf_path must be a local HF checkpoint directory"
        )
    return AutoConfig.from_pretrained(hf_dir, local_files_only=True)


def _rope_parameters(hf_config) -> dict[str, Any]:
    """transformers 5 keeps rope settings in ``rope_parameters``; older configs in two fields."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    legacy = getattr(hf_config, "rope_scaling", None)
    if legacy and "rope_type" not in params:
        params.update(legacy)
    return params


def _rope_scaling_factor(model_type: str, rope: dict[str, Any]) -> float | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise ValueError(
            f"model: rope scaling type {rope_type!r} of this {model_type} checkpoint is not "
            "supported; supported: none, 'llama3'"
        )
    for key, expected in _MEGATRON_LLAMA3_ROPE.items():
        if float(rope.get(key, expected)) != expected:
            raise ValueError(
                f"model: rope_scaling.{key}={rope.get(key)} differs from Megatron-Core's fixed "
                f"llama3 value {expected}; such a checkpoint cannot be represented exactly"
            )
    return float(rope["factor"])


def arch_from_hf_config(hf_config) -> ModelArch:
    """Read a transformers config; an unsupported family is an error listing supported ones."""
    model_type = getattr(hf_config, "model_type", None)
    family = family_for(model_type)
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"model: hidden_act={hf_config.hidden_act!r}; only 'silu' (SwiGLU) is supported")
    if family.warns_on_sliding_window and getattr(hf_config, "sliding_window", None):
        log.warning(
            "%s sliding_window=%s is not applied: attention is full-causal; exact for "
            "sequences shorter than the window",
            model_type,
            hf_config.sliding_window,
        )
    heads = hf_config.num_attention_heads
    rope = _rope_parameters(hf_config)
    return ModelArch(
        model_type=model_type,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_attention_heads=heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        ffn_hidden_size=hf_config.intermediate_size,
        norm_eps=hf_config.rms_norm_eps,
        rope_theta=float(rope["rope_theta"]),
        rope_scaling_factor=_rope_scaling_factor(model_type, rope),
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        # The family's fixed traits; otherwise what the config says (attention_bias).
        qkv_bias=family.qkv_bias or bool(getattr(hf_config, "attention_bias", False)),
        qk_layernorm=family.qk_layernorm,
    )
