"""Tiny real transformers models and a demo-task tokenizer, shared by the tests.

The models are random-init but built from each family's real config class, so names, shapes
and quirks (Qwen2's q/k/v bias, Qwen3's q/k norms, tied embeddings) match the checkpoints the
project converts. Import as ``from hf_tiny import make_tokenizer, make_tiny_model``
(``tests`` is on pytest's pythonpath).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from sept_megatron.demo.task import build_splits
from sept_megatron.demo.tokenizer import train_tokenizer

FAMILIES: dict[str, tuple[type, type]] = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def tokenizer_corpus(n_problems: int = 300) -> list[str]:
    """Questions and worked solutions of the demo task: what the demo tokenizer sees."""
    problems = build_splits(seed=0, n_train=n_problems, n_val=0, n_test=0)["train"]
    return [text for problem in problems for text in (problem.question, problem.solution)]


def make_tokenizer(tmp_dir: str | Path, vocab_size: int = 512):
    """Train the demo tokenizer on a small task corpus and save it under ``tmp_dir``."""
    return train_tokenizer(tokenizer_corpus(), str(tmp_dir), vocab_size=vocab_size)


def tiny_config(family: str, tokenizer, **overrides) -> transformers.PreTrainedConfig:
    """Hidden 64, 4 heads (2 KV heads, head_dim 16), 2 layers, vocab = the tokenizer's size."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    config_class, _ = FAMILIES[family]
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    fields.update(overrides)
    return config_class(**fields)


def make_tiny_model(family: str, tokenizer, *, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random-init float32 model of ``family`` in eval mode; ``overrides`` go to the config
    (e.g. ``tie_word_embeddings=True``). Same ``seed`` -> same weights."""
    config = tiny_config(family, tokenizer, **overrides)
    _, model_class = FAMILIES[family]
    torch.manual_seed(seed)
    return model_class(config).float().eval()
