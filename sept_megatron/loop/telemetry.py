"""Per-round health and efficiency figures for the dashboard, computed outside the loop.

- the generated tokens' mean log-probability and entropy under the model's own distribution
  (T = 1: what SFT at tau_t = 1 fits), from the engine (:class:`~sept_megatron.rollout.base.Generation`);
  verl logs the same pair for its rollouts. Falling entropy is SePT sharpening the model; a
  collapse towards 0 with a log-probability near 0 is the model repeating itself;
- model TFLOP/s per GPU and MFU of the training phase, by the bench's FLOP formula
  (:func:`sept_megatron.plan.memory.flops_per_token`, PaLM appendix B: 6 N + 12 L H Dh S per
  token) over the tokens actually trained (prompt + response, no padding);
- peak accelerator memory of each phase (generate, train, sync) from torch's allocator.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peak, TFLOP/s, from NVIDIA's data sheets (no sparsity). Matched in
# order against torch.cuda.get_device_name(): longer names first (H200 before H20, L40S
# before L4, GB200 before B200). Override with logging.peak_tflops.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("H20", 148.0),
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)

GIB = 2**30


def peak_tflops_for(device_name: str) -> float | None:
    """The table's peak for a GPU name (``NVIDIA H100 80GB HBM3`` -> 989.4), or None."""
    for marker, tflops in PEAK_BF16_TFLOPS:
        if marker in device_name:
            return tflops
    return None


def device_peak_tflops(configured: float | None, device: torch.device) -> float | None:
    """``logging.peak_tflops`` when set, else the table's value for this GPU; None on CPU."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops_for(name)
    if peak is None:
        log.warning("no peak TFLOP/s known for %r: MFU is not logged; set logging.peak_tflops", name)
    return peak


def token_stats(generations: Iterable[Sequence]) -> dict[str, float]:
    """Token-weighted means of the generated tokens' log-probabilities and entropies (nats),
    over every answer of the round; empty when the engine did not report them (sglang)."""
    logprob_sum = entropy_sum = 0.0
    tokens = 0
    for row in generations:
        for generation in row:
            if generation.logprobs is None or generation.entropies is None:
                return {}
            logprob_sum += sum(generation.logprobs)
            entropy_sum += sum(generation.entropies)
            tokens += len(generation.logprobs)
    if tokens == 0:
        return {}
    return {"rollout/logprob_mean": logprob_sum / tokens, "rollout/entropy_mean": entropy_sum / tokens}


@dataclass(frozen=True)
class RoundTelemetry:
    """What the loop needs once per run to turn a round into TFLOP/s, MFU and memory peaks."""

    arch: object  # model.ModelArch
    params: int
    world_size: int
    device: torch.device
    peak_tflops: float | None
    forward_passes_extra: int = 0
    """Forward-only passes over the round's samples besides training (train.measure_round_fit:
    2), counted at a third of a training pass each (forward = 2 N of the 6 N)."""

    @classmethod
    def for_run(
        cls,
        arch,
        *,
        world_size: int,
        device: torch.device,
        peak_tflops: float | None,
        measure_round_fit: bool,
    ) -> RoundTelemetry:
        from sept_megatron.plan.memory import param_counts

        return cls(
            arch,
            param_counts(arch, arch.vocab_size).total,
            world_size,
            device,
            device_peak_tflops(peak_tflops, device),
            2 if measure_round_fit else 0,
        )

    def train_flops(self, samples) -> float:
        """Model FLOPs of one training pass over ``samples`` (each its own sequence length)."""
        from sept_megatron.plan.memory import flops_per_token

        total = 0.0
        for sample in samples:
            length = len(sample.prompt_ids) + len(sample.response_ids)
            total += length * flops_per_token(self.arch, self.params, length)
        return total * (1 + self.forward_passes_extra / 3)

    def throughput(self, samples, train_seconds: float) -> dict[str, float]:
        """``perf/tflops_per_gpu`` (the round's training FLOPs over the train phase's wall
        time, shared by every rank) and ``perf/mfu`` when the device's peak is known."""
        tflops = self.train_flops(samples) / max(train_seconds, 1e-9) / self.world_size / 1e12
        metrics = {"perf/tflops_per_gpu": tflops}
        if self.peak_tflops:
            metrics["perf/mfu"] = tflops / self.peak_tflops
        return metrics

    @contextlib.contextmanager
    def phase(self, sink: dict[str, float], name: str):
        """Peak allocated and reserved GiB of this rank's device during the block, as
        ``memory/<name>_peak_{allocated,reserved}_gib`` (CUDA only: a CPU has no allocator
        peak to reset). An SGLang engine's memory lives in its own scheduler processes and
        is not counted; the hf engine's is."""
        if self.device.type != "cuda":
            yield
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        sink[f"memory/{name}_peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
        sink[f"memory/{name}_peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / GIB
