"""The published architectures of the recipes' models, as config.json files built with the
transformers config classes (no hub access: the numbers are copied from each model's
published config.json).

    path = write_config(tmp_path, "qwen2.5-math-7b")   # a dir holding config.json
"""

from __future__ import annotations

from pathlib import Path

import transformers

PUBLISHED: dict[str, tuple[type, dict]] = {
    # Qwen/Qwen2.5-Math-7B
    "qwen2.5-math-7b": (
        transformers.Qwen2Config,
        dict(
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            intermediate_size=18944,
            vocab_size=152064,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
    ),
    # deepseek-ai/deepseek-math-7b-base (a Llama)
    "deepseek-math-7b": (
        transformers.LlamaConfig,
        dict(
            hidden_size=4096,
            num_hidden_layers=30,
            num_attention_heads=32,
            num_key_value_heads=32,
            intermediate_size=11008,
            vocab_size=102400,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
    ),
    # Qwen/Qwen2.5-32B
    "qwen2.5-32b": (
        transformers.Qwen2Config,
        dict(
            hidden_size=5120,
            num_hidden_layers=64,
            num_attention_heads=40,
            num_key_value_heads=8,
            intermediate_size=27648,
            vocab_size=152064,
            max_position_embeddings=131072,
            rope_theta=1000000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
    ),
    # meta-llama/Meta-Llama-3-70B(-Instruct)
    "llama3-70b": (
        transformers.LlamaConfig,
        dict(
            hidden_size=8192,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            intermediate_size=28672,
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
    ),
}

# Parameter counts as published / as transformers counts them for these configs.
PUBLISHED_PARAMS = {
    "qwen2.5-math-7b": 7_615_616_512,
    "deepseek-math-7b": 6_910_365_696,
    "qwen2.5-32b": 32_763_876_352,
    "llama3-70b": 70_553_706_496,
}


def write_config(root: Path, name: str) -> Path:
    """``root/name/config.json`` for the published architecture ``name``; returns the dir."""
    config_class, fields = PUBLISHED[name]
    out = Path(root) / name
    config_class(**fields).save_pretrained(out)
    return out
