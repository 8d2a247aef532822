"""The rollout-engine interface: what the SePT loop and the evaluator need from a generator.

Backends (``hf``, ``sglang``; :mod:`sept_megatron.rollout.registry`) implement
:class:`RolloutEngine`, and each declares exactly one way of taking new weights: a capability
protocol below, which the weight sync (:func:`sept_megatron.weight_sync.sync`) dispatches on.
Nothing probes an engine with ``getattr`` or sets attributes on it from outside.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from sept_megatron.rollout.memory_model import EngineMemoryModel


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
            raise ValueError(
                f"SamplingParams.n and max_new_tokens must be >= 1, got n={self.n}, "
                f"max_new_tokens={self.max_new_tokens}"
            )


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


def stop_ids(tokenizer, checkpoint_eos: int | Sequence[int] | None = None) -> list[int]:
    """EOS ids that end a response: the tokenizer's EOS, then the checkpoint's own EOS list
    (its ``generation_config``: instruct models end turns with ``<|im_end|>`` but may emit
    ``<|endoftext|>``), ids outside the tokenizer's vocabulary left out. Every backend stops on
    this same union."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    extra = [checkpoint_eos] if isinstance(checkpoint_eos, int) else (checkpoint_eos or [])
    for token_id in extra:
        if int(token_id) not in ids and int(token_id) < len(tokenizer):
            ids.append(int(token_id))
    if not ids:
        raise ValueError("the tokenizer has no eos_token; set one so generations can stop")
    return ids


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


@runtime_checkable
class RolloutEngine(Protocol):
    """A generator the trainer can refresh with new weights every round.

    Placement (:mod:`sept_megatron.rollout.placement`): the world is cut into engine groups of
    ``rollout.engine_tp`` consecutive ranks; every rank of a group holds an engine object
    (built with ``group=`` its :class:`~sept_megatron.rollout.placement.EngineGroup`), and the
    group's first rank is its owner. Who calls what:

    - :meth:`generate`: the owner only, with its shard of the prompts;
    - the weight capability (:class:`BucketWeightEngine`, :class:`IPCWeightEngine` or
      :class:`ServerWeightEngine`): every rank of every group, through the weight sync;
    - :meth:`release_memory` / :meth:`resume_memory`: every rank that holds an engine.
    """

    tokenizer: object  # a transformers tokenizer

    shard_sequences: int
    """Rollout shards are cut in whole multiples of this many sequences:
    an engine whose samples depend on which sequences share a batch (hf: a fixed
    ``batch_size``, batched float kernels) sets its batch size, so that one engine and many
    form the same batches; an engine with per-request seeds and batch-invariant sampling
    leaves it at 1 for the finest balance."""

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Generation]]:
        """Return ``sampling.n`` generations for each prompt (a list of token ids), in order.
        A seeded call draws copy ``j`` of prompt ``i`` with ``sequence_seeds(sampling, ...)``:
        which other prompts share the call must not change it."""

    def release_memory(self) -> None:
        """Free the engine's accelerator memory while the trainer runs."""

    def resume_memory(self) -> None:
        """Take the memory back before the next generation (after the weight sync)."""


@runtime_checkable
class RolloutBackend(Protocol):
    """What ``rollout.backend`` names (:mod:`sept_megatron.rollout.registry`): an engine class
    that owns its configuration: it checks it, builds itself from it and says how much memory
    it will take. All are class methods."""

    @classmethod
    def check_config(cls, rollout: Any, *, arch: Any = None) -> list[str]:
        """Every problem of the ``rollout`` section for this backend (given the model's
        :class:`~sept_megatron.trainer.arch.ModelArch` when known), each naming the field and
        the fix; empty when it is fine."""

    @classmethod
    def prepare_process(cls, rollout: Any) -> None:
        """Run on every rank before any communicator exists (process-wide settings the
        backend needs identical on every rank, e.g. NCCL's environment)."""

    @classmethod
    def config_kwargs(
        cls,
        rollout: Any,
        *,
        tokenizer: Any,
        seed: int,
        device: str,
        dtype: torch.dtype,
        progress: bool,
        placement: Any = None,
        run_dir: str | None = None,
    ) -> dict[str, Any]:
        """:meth:`build`'s keyword arguments from the ``rollout`` section. ``placement``
        (:class:`~sept_megatron.rollout.placement.Placement`, colocated engines): this rank's
        engine group and its process groups; ``run_dir`` (``logging.run_dir``): where the
        engine may write files of its own."""

    @classmethod
    def build(cls, model_path: str | None = None, **kwargs: Any) -> RolloutEngine:
        """This rank's engine (every rank of an engine group builds one)."""

    @classmethod
    def memory_model(cls) -> EngineMemoryModel:
        """How the engine spends a GPU's memory, for ``sept-megatron plan`` and train's
        fit check (:mod:`sept_megatron.rollout.memory_model`)."""


# --- how an engine takes new weights: one capability per engine ----------------------------
@runtime_checkable
class BucketWeightEngine(Protocol):
    """Takes full HF-named tensors bucket by bucket, in process (the hf engine;
    :mod:`sept_megatron.weight_sync.gather` streams them)."""

    def update_weights(self, buckets: Iterable[WeightBucket]) -> int:
        """Load full HF-named tensors, bucket by bucket, into the engine's model. The tensors
        of a bucket are views into the sender's buffer, valid until the next bucket is
        requested: copy what must outlive that. Returns the number of tensors loaded."""


@runtime_checkable
class SharedBufferEngine(BucketWeightEngine, Protocol):
    """A :class:`BucketWeightEngine` whose parameters can be views of tensors the trainer owns
    (host memory shared by a replica's ranks: :mod:`sept_megatron.weight_sync.direct`)."""

    def can_bind_weights(self, dtype: torch.dtype) -> bool:
        """Whether :meth:`bind_weights` can take tensors of ``dtype`` now."""

    def bind_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Make the named parameters views of the given tensors; returns how many."""

    def unbind_weights(self) -> None:
        """Give every bound parameter private memory again, keeping its values."""


@runtime_checkable
class InPlaceWeightEngine(BucketWeightEngine, Protocol):
    """A :class:`BucketWeightEngine` in this process whose own tensors the trainer may write in
    place (:func:`sept_megatron.weight_sync.same_device.same_device_sync`: TP = PP = 1, engine
    and trainer on one device, no bucket in between)."""

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        """Every loadable tensor by HF name (tied aliases included), writable in place; valid
        until the engine's memory is released or its parameters rebound."""


@runtime_checkable
class IPCWeightEngine(Protocol):
    """An engine in other processes on the group's GPUs that loads packed buckets whose memory
    it maps (SGLang colocated: :mod:`sept_megatron.weight_sync.sglang_ipc` packs, gathers the
    payloads to the owner and drives these calls). Every rank of the group calls each method;
    those that talk to the engine act on the owner and return None elsewhere."""

    ranks: tuple[int, ...]
    owner: int
    process_group: Any
    device: torch.device | None

    @property
    def is_owner(self) -> bool: ...

    def begin_weight_update(self) -> Any:
        """Open an update session (the engine's weights resumed first); the owner's reply."""

    def load_payloads(self, payloads: list[bytes]) -> Any:
        """Load one bucket, one payload per engine TP rank; the owner's reply."""

    def end_weight_update(self) -> Any:
        """Close the session; the owner's reply."""

    def weights_loaded(self) -> None:
        """After a successful session: flush caches, mark the weights valid."""


@runtime_checkable
class ServerWeightEngine(Protocol):
    """SGLang servers of their own (disaggregated): weights arrive by a collective broadcast
    from the trainer into the servers' ranks
    (:mod:`sept_megatron.weight_sync.server_broadcast`) inside an update session."""

    clients: list
    weight_backend: str

    def begin_update(self) -> None: ...

    def end_update(self) -> None: ...
