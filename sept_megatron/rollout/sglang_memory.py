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
