"""How big SGLang 0.5.21 makes its KV pool, as the planner needs it (pure arithmetic, GiB).

SGLang sizes its static pool once, in each TP worker at start-up
(``srt/mem_cache/kv_cache_configurator.py``, ``KVCacheConfigurator._profile_available_bytes``)::

    slack = pre_model_load_memory * (1 - mem_fraction_static)
    rest  = available_gpu_memory - slack            # -> the KV pool, in GiB

``pre_model_load_memory`` is the device's free memory (``torch.cuda.mem_get_info``, every
process counted) measured when the scheduler initialises torch.distributed
(``model_runner.init_torch_distributed``), before the weights load; ``available_gpu_memory`` is
the free memory after the weights load (the minimum over the engine's TP ranks). Text models
reserve nothing for multimodal features and have no Mamba state, the two terms we leave out.
So with ``W`` GiB of engine weights on the GPU: ``pool = free_at_start * fraction - W``, and
the engine's whole static footprint is ``fraction * free_at_start``.

The fraction is a share of the memory free *when the engine starts*, not of the GPU: whatever
another process holds then is not counted, and whatever it allocates later must fit in
``(1 - fraction) * free_at_start`` next to SGLang's own non-static memory (CUDA graphs,
activations). Colocated, the engines start before Megatron allocates anything (slime does the
same), so the trainer's resident state lives in that remainder.
"""

from __future__ import annotations

import math

from sept_megatron.rollout.memory_model import EngineGPU, EngineMemory, MemoryLine, divisors


def kv_pool_gib(*, free_at_start_gib: float, free_after_load_gib: float, mem_fraction_static: float) -> float:
    """SGLang's KV pool budget (GiB; <= 0 means SGLang refuses to start): the transcription
    of ``_profile_available_bytes`` above, for a text model."""
    slack_gib = free_at_start_gib * (1 - mem_fraction_static)
    return free_after_load_gib - slack_gib


def engine_pool_gib(
    *, free_at_start_gib: float, engine_weights_gib: float, mem_fraction_static: float
) -> float:
    """The pool of an engine that loads ``engine_weights_gib`` per GPU after starting with
    ``free_at_start_gib`` free."""
    return kv_pool_gib(
        free_at_start_gib=free_at_start_gib,
        free_after_load_gib=free_at_start_gib - engine_weights_gib,
        mem_fraction_static=mem_fraction_static,
    )


def fraction_for_pool(*, free_at_start_gib: float, engine_weights_gib: float, pool_gib: float) -> float:
    """The smallest ``mem_fraction_static`` (two decimals) whose pool holds ``pool_gib``."""
    return math.ceil(100 * (engine_weights_gib + pool_gib) / free_at_start_gib - 1e-9) / 100


def largest_fraction(*, free_at_start_gib: float, beside_engine_gib: float) -> float:
    """The largest ``mem_fraction_static`` (two decimals) that leaves ``beside_engine_gib`` of
    the start-time free memory to everything outside SGLang's static pool (the trainer's
    resident state, SGLang's workspace)."""
    return math.floor(100 * (1 - beside_engine_gib / free_at_start_gib) + 1e-9) / 100


# --- the planner's questions (rollout/memory_model.py) ----------------------------------------
RELEASED_GIB = 1.5
"""What a colocated engine keeps while released for training (its own CUDA context and graph
buffers; torch_memory_saver frees weights and KV cache)."""
WORKSPACE_GIB = 3.0
"""SGLang's memory outside its static pool while generating (CUDA graphs, the activations of
one chunked-prefill step, sampling buffers): the reason mem_fraction_static stays below 1."""
MAX_FRACTION = 0.9
"""The highest mem_fraction_static the planner proposes."""


class SGLangMemory:
    """:class:`~sept_megatron.rollout.memory_model.EngineMemoryModel` of SGLang 0.5.21: a static
    pool of ``mem_fraction_static`` of the memory free when the engine starts (its weights and
    KV cache), plus a workspace outside it. Colocated, the engines start before Megatron
    allocates anything, so the trainer's resident state and that workspace share the rest."""

    def engine_tps(self, arch, *, gpus_per_node: int, world: int) -> list[int]:
        return [
            tp for tp in divisors(gpus_per_node) if arch.num_attention_heads % tp == 0 and world % tp == 0
        ]

    def settings(self, rollout) -> dict[str, float]:
        return {"mem_fraction_static": rollout.mem_fraction_static}

    def estimate(self, gpu: EngineGPU) -> EngineMemory:
        r = gpu.rollout
        weights, kv = self._weights(gpu), gpu.kv_gib(gpu.share)
        free, fraction = self._free(gpu), r.mem_fraction_static
        pool = engine_pool_gib(
            free_at_start_gib=free, engine_weights_gib=weights, mem_fraction_static=fraction
        )
        memory = EngineMemory(
            generating=[
                MemoryLine(
                    f"engine weights ({'fp8' if r.weights == 'fp8' else 'bf16'}, /engine TP={r.engine_tp})",
                    weights,
                ),
                MemoryLine(f"  (KV cache: {gpu.share} sequences x {gpu.sequence_tokens} tokens)", kv, False),
                MemoryLine(
                    f"KV pool: mem_fraction_static {fraction:g} x {free:g} free at engine start, less its weights",
                    max(pool, 0.0),
                ),
                MemoryLine("SGLang workspace outside its pool (CUDA graphs, prefill)", WORKSPACE_GIB),
            ],
            released=[MemoryLine("SGLang engine while released (context, graphs)", RELEASED_GIB)]
            if gpu.colocated
            else [],
        )
        self._check_pool(gpu, weights, kv, pool, memory)
        return memory

    def tuned(self, gpu: EngineGPU) -> dict[str, float]:
        fraction = min(MAX_FRACTION, self._fraction_needed(gpu))
        return {"mem_fraction_static": fraction} if fraction > 0 else {}

    def _weights(self, gpu: EngineGPU) -> float:
        return gpu.weights_gib / gpu.rollout.engine_tp

    @staticmethod
    def _free(gpu: EngineGPU) -> float:
        """What SGLang measures as free when its scheduler starts: the engines start before
        Megatron allocates anything, so the GPU less the reserve (CUDA contexts, NCCL)."""
        return gpu.gpu_mem_gib - gpu.reserve_gib

    def _highest(self, gpu: EngineGPU) -> float:
        """The largest fraction that leaves room for the resident trainer and the workspace."""
        return largest_fraction(
            free_at_start_gib=self._free(gpu), beside_engine_gib=gpu.resident_gib + WORKSPACE_GIB
        )

    def _fraction_needed(self, gpu: EngineGPU) -> float:
        """The smallest fraction whose pool holds every sequence, capped by :meth:`_highest`."""
        needed = fraction_for_pool(
            free_at_start_gib=self._free(gpu),
            engine_weights_gib=self._weights(gpu),
            pool_gib=gpu.kv_gib(gpu.share),
        )
        return min(needed, self._highest(gpu))

    def _check_pool(self, gpu: EngineGPU, weights: float, kv: float, pool: float, memory: EngineMemory):
        """A fraction that crowds out the trainer, or a pool that holds not one sequence, is a
        problem; a pool that holds fewer than the engine's share is a note (the rest queue)."""
        fraction, free, highest = gpu.rollout.mem_fraction_static, self._free(gpu), self._highest(gpu)
        one_sequence = gpu.kv_gib(1)
        wanted = min(self._fraction_needed(gpu), MAX_FRACTION)
        fits_one = (
            engine_pool_gib(free_at_start_gib=free, engine_weights_gib=weights, mem_fraction_static=highest)
            >= one_sequence
        )
        fix = (
            f"set rollout.mem_fraction_static={wanted:g}"
            if fits_one
            else "offload the trainer during rollout, or shard the engine wider "
            "(rollout.engine_tp) or the trainer (more TP/PP)"
        )
        if fraction > highest:
            memory.problems.append(
                f"rollout engine{gpu.where}: at mem_fraction_static={fraction:g} SGLang's "
                f"static pool takes {fraction * free:.1f} of the {free:.1f} GiB free at its "
                f"start, leaving {(1 - fraction) * free:.1f} GiB for {gpu.resident_gib:.1f} GiB of "
                f"trainer state and {WORKSPACE_GIB:g} GiB of SGLang workspace: {fix}"
            )
        elif pool < one_sequence:
            memory.problems.append(
                f"rollout engine{gpu.where}: at mem_fraction_static={fraction:g} SGLang's KV "
                f"pool is {pool:.1f} GiB after {weights:.1f} GiB of engine weights, "
                f"less than one full-length sequence ({one_sequence:.2f} GiB): {fix}"
            )
        elif pool < kv:
            memory.notes.append(
                f"SGLang's KV pool{gpu.where} ({pool:.1f} GiB) holds {int(pool / one_sequence)} "
                f"of the engine's {gpu.share} full-length sequences at once; the rest "
                f"queue (rollout.mem_fraction_static={wanted:g} "
                "holds the most that fits beside the trainer)"
            )
