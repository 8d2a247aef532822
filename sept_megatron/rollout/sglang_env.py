"""The process environment a colocated SGLang rollout needs, set on every rank alike.

Called by :func:`sept_megatron.distributed.initialize` (``sglang_env=True`` when
``rollout.backend=sglang``) before the default process group or any NCCL communicator exists,
so that every rank of the job, engine owners and the others alike, builds its communicators
with the same settings. Values a user exported for the job win (every rank inherits them, and
``sglang.Engine`` keeps them too), so the ranks still agree.

Why each variable, and where upstream (sglang 0.5.21, slime's ``backends/sglang_utils``):

- ``NCCL_CUMEM_ENABLE=0``, ``NCCL_NVLS_ENABLE=0``: ``sglang.Engine(...)`` sets both in the
  process that constructs it unless already set (``srt/entrypoints/engine.py``,
  ``_set_envs_and_config``: ``str(int(enable_symm_mem))`` and ``str(int(enable_nccl_nvls or
  enable_symm_mem))``, both 0 by default). Only engine owners construct it, so with
  ``rollout.engine_tp > 1`` owners and non-owners would build their NCCL communicators with
  different buffer registration, a known cause of ``transport/p2p.cc ... Cuda failure 'invalid
  argument'``. Setting them first on every rank makes the Engine keep them.
- ``SGLANG_MEMORY_SAVER_CUDA_GRAPH=true``: without it the ``cuda_graph`` memory-saver tag is a
  no-op and CUDA-graph memory is never released (``srt/environ.py``, default False; read by
  ``model_executor/runner_backend/full_cuda_graph_backend.py``). It needs
  ``cuda_graph_backend_prefill="disabled"`` in the engine arguments: breakable prefill graphs
  raise ``NotImplementedError`` in memory-saver mode (``breakable_cuda_graph_backend.py``);
  :func:`sept_megatron.rollout.sglang_engine.engine_kwargs` passes it. slime sets both.
- ``SGLANG_JIT_DEEPGEMM_PRECOMPILE=false``, ``SGLANG_JIT_DEEPGEMM_FAST_WARMUP=true``
  (``srt/environ.py``, defaults True / False): with FP8 weights DeepGEMM would compile every
  kernel shape at engine start while the other ranks wait in a collective with a timeout;
  kernels are then compiled on first use, and the warm-up takes the fast path. slime does the
  same.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SGLANG_PROCESS_ENV: dict[str, str] = {
    "NCCL_CUMEM_ENABLE": "0",
    "NCCL_NVLS_ENABLE": "0",
    "SGLANG_MEMORY_SAVER_CUDA_GRAPH": "true",
    "SGLANG_JIT_DEEPGEMM_PRECOMPILE": "false",
    "SGLANG_JIT_DEEPGEMM_FAST_WARMUP": "true",
}
"""What :func:`set_sglang_environment` exports (see the module docstring for each reason)."""


def set_sglang_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Export :data:`SGLANG_PROCESS_ENV` into ``environ`` (default ``os.environ``), keeping
    values already set; returns the values now in effect. Call before any communicator."""
    env = os.environ if environ is None else environ
    for name, value in SGLANG_PROCESS_ENV.items():
        env.setdefault(name, value)
    return {name: env[name] for name in SGLANG_PROCESS_ENV}
