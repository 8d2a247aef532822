"""Random-init HF checkpoints of every supported family, saved as fp32 safetensors.

Every tensor gets its own random values (norm weights too, which HF initialises to ones), so a
conversion that swaps two tensors of the same shape (q_norm/k_norm, input/post-attention norm)
cannot pass the round-trip or the logit checks by accident. Used by this directory's conftest
(fixtures) and tests (parametrization); import as ``from hf_checkpoints import MODELS``.
"""

import torch
from hf_tiny import make_tiny_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# checkpoint name -> (family, config overrides)
MODELS = {
    "llama3": ("llama", {"rope_parameters": LLAMA3_ROPE, "max_position_embeddings": 16384}),
    "mistral": ("mistral", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),  # head_dim != hidden / heads, as in real Qwen3
}
OTHER_WEIGHTS = "llama3-other"  # same architecture as llama3, different weights


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Distinct values in every tensor; norms around 1, everything else around 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_(noise + 1.0 if "norm" in name else noise)


def save_hf_model(family: str, tokenizer, out_dir, *, seed: int = 0, **overrides):
    """A randomized tiny model of ``family`` and the tokenizer, saved with save_pretrained."""
    model = make_tiny_model(family, tokenizer, seed=seed, **overrides)
    randomize_(model, seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model
