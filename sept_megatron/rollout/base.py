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
