"""The engine fleet: every rank's view of the rollout engines for the loop.

It owns what the loop would otherwise repeat around every engine call: the CPU compatibility
layer is suspended while engines run plain PyTorch, a colocated engine's memory is released
while Megatron trains and taken back after the sync, and the trainer's cached blocks are
returned before an engine in other processes (SGLang) maps its memory again. The order of one
colocated round: generate -> :meth:`release` -> train -> :meth:`sync` (empty the trainer's
cache, resume and load the weights, then resume the KV cache / CUDA graphs).
"""

from __future__ import annotations

import torch

from sept_megatron import weight_sync
from sept_megatron.config import RolloutConfig
from sept_megatron.rollout.base import Generation, SamplingParams
from sept_megatron.rollout.orchestration import DataParallelEngines
from sept_megatron.runtime import compat


class EngineFleet:
    """The engines of a run (``engines``: all of them, spread over the world) and this rank's
    own (``local``; None on a rank without one)."""

    def __init__(
        self, engines: DataParallelEngines, rollout: RolloutConfig, *, releases_memory: bool
    ) -> None:
        self.engines = engines
        self.rollout = rollout
        self.releases_memory = releases_memory and rollout.placement == "colocated"
        self.released = False

    @property
    def local(self):
        return self.engines.local

    def generate(self, prompts, sampling: SamplingParams) -> list[list[Generation]]:
        """Answers of every engine, in prompt order, on every rank (collective)."""
        with compat.suspended():
            return self.engines.generate(prompts, sampling)

    def suspended(self):
        """The context every other engine-side call (evaluation) runs in."""
        return compat.suspended()

    def release(self) -> None:
        """Colocated: the engine's memory goes to Megatron's steps."""
        if self.releases_memory and self.local is not None:
            self.local.release_memory()
            self.released = True

    def sync(self, model, *, refresh: bool = True) -> int:
        """The trainer's weights into every engine (collective), then the engine's memory back.
        ``refresh=False`` only takes the memory back."""
        if self.released and torch.cuda.is_available():
            # SGLang maps its weights and KV cache again from other processes: the memory
            # Megatron's caching allocator still holds must go back to the driver first.
            torch.cuda.empty_cache()
        received = 0
        if refresh:
            received = weight_sync.sync(
                model,
                self.local,
                bucket_bytes=self.rollout.bucket_size_mb << 20,
                weights=self.rollout.weights,
                placement=self.rollout.placement,
            )
        if self.released:
            self.local.resume_memory()  # the KV cache (CUDA graphs), after the weights
            self.released = False
        return received
