"""The rollout-engine interface: what the SePT loop and the evaluator need from a generator.

Backends (``hf`` now, ``sglang`` later) implement :class:`RolloutEngine`; the loop picks one
by config in exactly one place (:func:`sept_megatron.rollout.build_engine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

import numpy as np
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
    seed_keys: tuple[int, ...] | None = None
    """One key per prompt (default: the prompt's position in the call). Copy ``j`` of prompt
    ``i`` is drawn from its own stream, seeded with ``sequence_seed(seed, seed_keys[i], j)``,
    so a sample depends on its prompt, key, copy and ``seed`` only: a batch split over several
    engines or calls, each call passing its prompts' positions in the whole batch, draws the
    same samples as one call (see :mod:`sept_megatron.rollout.orchestration`)."""

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


def sequence_seed(seed: int, key: int, copy: int) -> int:
    """The seed of one sequence's sampling stream: a 63-bit hash of (call seed, prompt key,
    copy) by numpy's SeedSequence, so nearby seeds (rounds r and r + 1, keys i and i + 1) give
    unrelated streams rather than shifted copies of each other."""
    state = np.random.SeedSequence([seed % 2**64, key % 2**64, copy]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)


def sequence_seeds(sampling: SamplingParams, num_prompts: int) -> list[list[int]] | None:
    """``[prompt][copy]`` seeds of a seeded call (None when ``sampling.seed`` is None)."""
    if sampling.seed is None:
        return None
    keys = sampling.seed_keys if sampling.seed_keys is not None else range(num_prompts)
    if len(keys) != num_prompts:
        raise ValueError(f"SamplingParams.seed_keys has {len(keys)} keys for {num_prompts} prompts")
    return [[sequence_seed(sampling.seed, key, copy) for copy in range(sampling.n)] for key in keys]


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
    logprobs: Sequence[float] | None = field(default=None)
    """Per token: its log-probability under the model's own distribution (T = 1, before
    top-k/top-p), when the engine reports it (hf: always; a compact float32 array)."""
    entropies: Sequence[float] | None = field(default=None)
    """Per token: the entropy (nats) of that T = 1 distribution at its position."""


# A bucket is a list of (hf_name, full tensor) pairs sent together.
WeightBucket = Sequence[tuple[str, torch.Tensor]]


class RolloutEngine(Protocol):
    """A generator the trainer can refresh with new weights every round.

    Placement (:mod:`sept_megatron.rollout.placement`): the world is cut into engine groups of
    ``rollout.engine_tp`` consecutive ranks; every rank of a group holds an engine object
    (built with ``group=`` its :class:`~sept_megatron.rollout.placement.EngineGroup`), and the
    group's first rank is its owner. Who calls what:

    - :meth:`generate`: the owner only, with its shard of the prompts;
    - :meth:`update_weights`: every rank of every group, with the same full HF-named buckets
      (for a multi-rank engine it is collective within the group);
    - :meth:`release_memory` / :meth:`resume_memory`: every rank that holds an engine.
    """

    tokenizer: object  # a transformers tokenizer

    shard_sequences: int
    """Optional (default 1). Rollout shards are cut in whole multiples of this many sequences:
    an engine whose samples depend on which sequences share a batch (hf: a fixed
    ``batch_size``, batched float kernels) sets its batch size, so that one engine and many
    form the same batches; an engine with per-request seeds and batch-invariant sampling
    leaves it at 1 for the finest balance."""

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[list[Generation]]:
        """Return ``sampling.n`` generations for each prompt (a list of token ids), in order.
        A seeded call draws copy ``j`` of prompt ``i`` with ``sequence_seeds(sampling, ...)``:
        which other prompts share the call must not change it."""

    def update_weights(self, buckets: Iterable[WeightBucket]) -> None:
        """Load full HF-named tensors, bucket by bucket, into the engine's model. The tensors
        of a bucket are views into the sender's buffer, valid until the next bucket is
        requested: copy what must outlive that."""

    def release_memory(self) -> None:
        """Free the engine's accelerator memory while the trainer runs."""

    def resume_memory(self) -> None:
        """Take the memory back before the next generation."""
