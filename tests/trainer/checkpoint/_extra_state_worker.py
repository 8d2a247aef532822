"""Transformer Engine ``_extra_state`` through our checkpoint save/load (test_extra_state.py).

    python tests/trainer/checkpoint/_extra_state_worker.py WORK_DIR

TE layers keep FP8 scaling state in ``_extra_state`` objects; this runs the local layer spec
(no TE on CPU) and adds ShardedObjects exactly where Megatron's TE layers put theirs
(``decoder.layers.self_attention.core_attention._extra_state``, stacked over layers). It checks:
(1) a checkpoint saved with such objects gives them back on load (an FP8 run resumes with its
scaling state); (2) a checkpoint without them (written by the local spec, as the HF converter
does) still loads into a model that asks for them, weights intact; (3) a weight missing from
the checkpoint is still an error naming it. Results: WORK_DIR/results.json.
"""

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO_ROOT / "tests"))


class StubVocab:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

    def __len__(self):
        return 300


def with_te_extra_state(model_sd: dict, num_layers: int, payload=None) -> dict:
    """Add the TE attention's per-layer _extra_state, as Megatron's TE spec shards it."""
    import torch
    from megatron.core.dist_checkpointing import ShardedObject

    key = "decoder.layers.self_attention.core_attention._extra_state"
    for i in range(num_layers):
        data = payload(i) if payload else torch.empty(0, dtype=torch.uint8)
        model_sd["model0"][f"decoder.layers.{i}.self_attention.core_attention._extra_state"] = ShardedObject(
            key, data, (num_layers,), (i,), replica_id=0
        )
    return model_sd


def main(work_dir: str) -> None:
    import torch
    from hf_tiny import tiny_config

    from sept_megatron.convert.hf_config import arch_from_hf_config
    from sept_megatron.runtime import distributed
    from sept_megatron.trainer import checkpoint as ckpt_io
    from sept_megatron.trainer import model as mdl

    work = Path(work_dir)
    arch = arch_from_hf_config(tiny_config("llama", StubVocab()))
    meta = ckpt_io.CheckpointMeta(arch, 384, "float32", 1, 1)
    distributed.initialize(tensor_parallel=1, pipeline_parallel=1)
    results = {}
    try:
        model = mdl.build_megatron_model(
            arch, tensor_parallel=1, pipeline_parallel=1, padded_vocab=384, transformer_impl="local"
        )
        saved = {
            k: v.detach().clone()
            for k, v in model.chunks[0].state_dict().items()
            if isinstance(v, torch.Tensor)
        }

        def payload(i):  # what TE 2.x serialises: a uint8 tensor
            return torch.arange(5, dtype=torch.uint8) + i

        with_state = with_te_extra_state(
            ckpt_io.model_sharded_state_dict(model.chunks), arch.num_layers, payload
        )
        ckpt_io.save_checkpoint(str(work / "with"), None, with_state, meta, str(work))
        ckpt_io.save_checkpoint(
            str(work / "without"), None, ckpt_io.model_sharded_state_dict(model.chunks), meta, str(work)
        )

        # (1) saved extra state comes back
        loaded = ckpt_io.load_sharded(
            str(work / "with"),
            with_te_extra_state(ckpt_io.model_sharded_state_dict(model.chunks), arch.num_layers),
        )["model0"]
        results["extra_state_round_trip"] = all(
            torch.equal(loaded[f"decoder.layers.{i}.self_attention.core_attention._extra_state"], payload(i))
            for i in range(arch.num_layers)
        )

        # (2) a checkpoint without it loads; the weights are the saved ones
        with torch.no_grad():
            for param in model.chunks[0].parameters():
                param.add_(1.0)
        loaded = ckpt_io.load_sharded(
            str(work / "without"),
            with_te_extra_state(ckpt_io.model_sharded_state_dict(model.chunks), arch.num_layers),
        )["model0"]
        results["absent_extra_state_skipped"] = not any("core_attention._extra_state" in k for k in loaded)
        model.chunks[0].load_state_dict(loaded, strict=False)
        results["weights_restored"] = all(
            torch.equal(model.chunks[0].state_dict()[k], v) for k, v in saved.items()
        )

        # (3) a missing weight is still an error
        request = ckpt_io.model_sharded_state_dict(model.chunks)
        request["model0"]["decoder.final_layernorm.weight"].key = "decoder.final_norm.weight"
        try:
            ckpt_io.load_sharded(str(work / "without"), request)
            results["missing_weight_error"] = None
        except ValueError as exc:
            results["missing_weight_error"] = str(exc)
    finally:
        distributed.shutdown()
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
