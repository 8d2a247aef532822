"""What a rollout engine holds on a GPU: the question the planner asks every backend.

The planner (:mod:`sept_megatron.plan.planner`) knows the model, the trainer and the hardware;
only the backend knows how its engine spends memory. So each backend class answers
:meth:`~sept_megatron.rollout.base.RolloutBackend.memory_model` with an
:class:`EngineMemoryModel`, the planner hands it one :class:`EngineGPU` (the engine's share of
the round, what the trainer keeps beside it) and puts the :class:`EngineMemory` it returns in
its table, without naming any backend. Plain data and arithmetic in GiB: nothing here imports
torch, a backend's library or the planner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

GIB = float(1 << 30)


@dataclass(frozen=True)
class MemoryLine:
    """One line of the planner's table: what it is, GiB on one GPU, and whether it counts
    towards the phase's total (alternatives are shown, not counted)."""

    label: str
    gib: float
    counted: bool = True


@dataclass(frozen=True, kw_only=True)
class EngineGPU:
    """One GPU that hosts an engine, as the planner sees it."""

    rollout: Any
    """The ``rollout`` config section, with the layout's engine TP and tuned settings applied."""
    arch: Any
    """The model's :class:`~sept_megatron.trainer.arch.ModelArch`."""
    weights_gib: float
    """The whole model at the engine's weight dtype (``rollout.weights``), not yet sharded."""
    share: int
    """The engine's share of the round's sequences."""
    prompt_tokens: int
    response_tokens: int
    gpu_mem_gib: float
    reserve_gib: float
    """CUDA contexts, NCCL buffers, allocator slack: never the engine's."""
    resident_gib: float
    """Trainer state that stays on this GPU while the engine generates (0 disaggregated, or
    with the trainer offloaded)."""
    colocated: bool
    name: str = "GPU"
    """Which GPU, for messages ("GPU", "first stage", "engine GPU")."""

    @property
    def sequence_tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens

    def kv_gib(self, sequences: int) -> float:
        """The KV cache of ``sequences`` full-length sequences on this GPU."""
        per_token = kv_bytes_per_token(self.arch, self.rollout.engine_tp)
        return sequences * self.sequence_tokens * per_token / GIB

    @property
    def where(self) -> str:
        """`` (first stage)`` in a message, nothing for a single-stage GPU."""
        return "" if self.name == "GPU" else f" ({self.name})"


@dataclass
class EngineMemory:
    """A backend's answer for one :class:`EngineGPU`."""

    generating: list[MemoryLine] = field(default_factory=list)
    """The engine's lines while it generates (the rollout phase)."""
    released: list[MemoryLine] = field(default_factory=list)
    """What a colocated engine keeps while it is released and the trainer runs."""
    problems: list[str] = field(default_factory=list)
    """Why it cannot work, each naming the field and the fix."""
    notes: list[str] = field(default_factory=list)
    """What works but is worth knowing (e.g. sequences that queue)."""


@runtime_checkable
class EngineMemoryModel(Protocol):
    """How one backend's engine spends a GPU's memory (its class's ``memory_model()``)."""

    def engine_tps(self, arch: Any, *, gpus_per_node: int, world: int) -> list[int]:
        """The engine TP sizes it can run on such hardware, narrowest first."""

    def settings(self, rollout: Any) -> dict[str, Any]:
        """The ``rollout`` fields that size the engine's memory and that :meth:`tuned` may
        change (shown in the planner's layout line); empty when there are none."""

    def estimate(self, gpu: EngineGPU) -> EngineMemory:
        """The engine's lines, problems and notes on ``gpu``."""

    def tuned(self, gpu: EngineGPU) -> dict[str, Any]:
        """Settings under which the engine holds its whole share on ``gpu`` beside the
        trainer, or as much of it as fits; empty when nothing can be tuned."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def kv_bytes_per_token(arch: Any, engine_tp: int) -> float:
    """bf16 K and V of every layer for one token on one engine GPU; KV heads are replicated
    when there are fewer than the engine's TP."""
    kv_heads = math.ceil(arch.num_query_groups / engine_tp)
    return 2 * arch.num_layers * kv_heads * arch.head_dim * 2
