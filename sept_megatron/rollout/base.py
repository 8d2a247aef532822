"""The rollout-engine interface: what the SePT loop and the evaluator need from a generator.

Backends (``hf`` now, ``sglang`` later) implement :class:`RolloutEngine`; the loop picks one
by config in exactly one place (:func:`sept_megatron.rollout.build_engine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

import torch


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy decoding (one sample is enough)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k cut
    max_new_tokens: int = 3072
    n: int = 1  # samples per prompt
    seed: int | None = None

    def check(self) -> None:
        """Reject values an engine would misread or refuse mid-batch; name the field and the fix."""
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 (no cut) or >= 1, got {self.top_k}")
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.n and max_new_tokens must be >= 1, got n={self.n}, "
                             f"max_new_tokens={self.max_new_tokens}")


def check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    """Every prompt needs at least one token: engines cannot start from nothing."""
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty; generation needs at least one token")


@dataclass(kw_only=True)
class Generation:
    """One sampled answer: the response token ids (EOS included when it was produced)."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS produced) or "length" (hit max_new_tokens)
    logprobs: list[float] | None = field(default=None)


# A bucket is a list of (hf_name, full tensor) pairs sent together.
WeightBucket = Sequence[tuple[str, torch.Tensor]]


class RolloutEngine(Protocol):
    """A generator the trainer can refresh with new weights every round."""

    tokenizer: object  # a transformers tokenizer

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[list[Generation]]:
        """Return ``sampling.n`` generations for each prompt (a list of token ids), in order."""

    def update_weights(self, buckets: Iterable[WeightBucket]) -> None:
        """Load full HF-named tensors, bucket by bucket, into the engine's model."""

    def release_memory(self) -> None:
        """Free the engine's accelerator memory while the trainer runs."""

    def resume_memory(self) -> None:
        """Take the memory back before the next generation."""
