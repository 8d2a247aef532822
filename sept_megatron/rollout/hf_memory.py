"""How the hf engine (:mod:`sept_megatron.rollout.hf`) spends a GPU's memory, as the planner
asks it (:mod:`sept_megatron.rollout.memory_model`; pure arithmetic, GiB).

One engine per GPU (no engine TP): a full bf16 copy of the model, the KV cache of the
``rollout.batch_size`` sequences it generates at a time, and transformers' prefill of that
whole batch at once. Released, it keeps nothing on the GPU.
"""

from __future__ import annotations

from sept_megatron.rollout.memory_model import GIB, EngineGPU, EngineMemory, MemoryLine


class HFMemory:
    """:class:`~sept_megatron.rollout.memory_model.EngineMemoryModel` of the hf engine."""

    def engine_tps(self, arch, *, gpus_per_node: int, world: int) -> list[int]:
        return [1]

    def settings(self, rollout) -> dict:
        return {}

    def estimate(self, gpu: EngineGPU) -> EngineMemory:
        sequences = min(gpu.share, gpu.rollout.batch_size)
        memory = EngineMemory(
            generating=[
                MemoryLine("engine weights (bf16, a full copy)", gpu.weights_gib),
                MemoryLine(
                    f"KV cache: {sequences} sequences x {gpu.sequence_tokens} tokens", gpu.kv_gib(sequences)
                ),
                MemoryLine(
                    "prefill working set (hf: whole batch at once)", self._prefill_gib(gpu, sequences)
                ),
            ]
        )
        if gpu.weights_gib + gpu.reserve_gib > gpu.gpu_mem_gib:
            memory.problems.append(
                f"rollout engine: the hf backend holds one full bf16 copy of the model "
                f"({gpu.weights_gib:.1f} GiB) on one GPU of {gpu.gpu_mem_gib:g} GiB; use "
                "rollout.backend=sglang with rollout.engine_tp > 1"
            )
        return memory

    def tuned(self, gpu: EngineGPU) -> dict:
        return {}

    @staticmethod
    def _prefill_gib(gpu: EngineGPU, sequences: int) -> float:
        """transformers prefills the whole batch at once: one layer's hidden states, QKV and
        the three MLP tensors of every prompt token are alive together (bf16)."""
        a = gpu.arch
        per_token = 3 * a.hidden_size + a.num_attention_heads * a.head_dim + 4 * a.ffn_hidden_size
        return sequences * gpu.prompt_tokens * per_token * 2 / GIB
