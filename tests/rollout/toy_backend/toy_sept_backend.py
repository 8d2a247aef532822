"""A rollout backend defined outside the package (tests/rollout/test_backend_registry.py).

Registered the way a plugin is, by an entry point in the ``sept_megatron.rollout_backends``
group (the ``*.dist-info`` beside this file), and used as ``rollout.backend=toy``. It answers
every prompt with the prompt's last token then EOS, takes weights bucket by bucket, and appends
each call to the file named by ``SEPT_TOY_CALLS`` so the test can see what the loop did.
"""

import json
import os


class ToyMemory:
    """Implements EngineMemoryModel: the toy engine keeps one bf16 copy of the model per GPU
    and nothing else, and refuses nothing."""

    def engine_tps(self, arch, *, gpus_per_node, world):
        return [1]

    def settings(self, rollout):
        return {}

    def estimate(self, gpu):
        from sept_megatron.rollout.memory_model import EngineMemory, MemoryLine

        return EngineMemory(generating=[MemoryLine("toy engine: one bf16 copy", gpu.weights_gib)])

    def tuned(self, gpu):
        return {}


class ToyEngine:
    """Implements RolloutBackend (the class methods) and BucketWeightEngine."""

    shard_sequences = 1

    def __init__(self, model_path=None, *, tokenizer=None, answers_end=None):
        self.tokenizer = tokenizer
        self.eos = answers_end
        self.loaded = 0
        self._note("init", model_path=model_path)

    @classmethod
    def check_config(cls, rollout, *, arch=None):
        if rollout.engine_tp != 1:
            return [
                f"rollout.engine_tp={rollout.engine_tp}: the toy backend runs one engine per "
                "rank; set rollout.engine_tp=1"
            ]
        return []

    @classmethod
    def prepare_process(cls, rollout):
        pass

    @classmethod
    def config_kwargs(
        cls, rollout, *, tokenizer, seed, device, dtype, progress, placement=None, run_dir=None
    ):
        return {"tokenizer": tokenizer, "answers_end": tokenizer.eos_token_id}

    @classmethod
    def build(cls, model_path=None, **kwargs):
        return cls(model_path, **kwargs)

    @classmethod
    def memory_model(cls):
        return ToyMemory()

    def generate(self, prompts, sampling):
        from sept_megatron.rollout.base import Generation

        self._note("generate", prompts=len(prompts), temperature=sampling.temperature)
        return [
            [
                Generation(token_ids=[int(p[-1]), self.eos], text="", finish_reason="stop")
                for _ in range(sampling.n)
            ]
            for p in prompts
        ]

    def update_weights(self, buckets):
        count = sum(len(bucket) for bucket in buckets)
        self.loaded += count
        self._note("update_weights", tensors=count)
        return count

    def release_memory(self):
        self._note("release_memory")

    def resume_memory(self):
        self._note("resume_memory")

    def _note(self, call, **details):
        path = os.environ.get("SEPT_TOY_CALLS")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"call": call, **details}) + "\n")
