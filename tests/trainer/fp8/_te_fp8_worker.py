"""Transformer Engine FP8 training on one GPU, every recipe beside BF16 (test_te_fp8_gpu.py).

    SEPT_DEVICE=cuda torchrun --nproc-per-node=1 tests/trainer/fp8/_te_fp8_worker.py HF_DIR OUT_DIR

For BF16 (TE layers, no FP8) and each FP8 recipe TE supports here: build the model with TE
layers in bf16, load HF_DIR's weights, record the logits of a fixed batch, then run SFT steps
(Megatron's schedule, DDP and optimizer through ``SFTTrainer``) on one fixed mini-batch and
record each step's loss. For each FP8 recipe it also saves a training checkpoint after
``SAVE_AFTER`` steps, takes one more step, and then builds a fresh model and trainer, resumes
from the checkpoint and takes that step again: the losses and the TE modules' ``_extra_state``
(FP8 scaling state) must agree. Results: OUT_DIR/results.json and OUT_DIR/logits-<recipe>.pt.
"""

import json
import sys
from pathlib import Path

RECIPES = ["bf16", "delayed", "tensorwise", "blockwise"]
STEPS = 5
SAVE_AFTER = 3
MINI_BATCH, MICRO_BATCH = 4, 2
PROMPT_LEN, RESPONSE_LEN = 16, 49  # 65 tokens: sequences of 64 positions, 128 tokens per micro-batch


def samples(vocab_size: int, seed: int):
    import torch

    from sept_megatron.trainer.sft import Sample

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (MINI_BATCH, PROMPT_LEN + RESPONSE_LEN), generator=gen)
    return [
        Sample(prompt_ids=row[:PROMPT_LEN].tolist(), response_ids=row[PROMPT_LEN:].tolist()) for row in ids
    ]


def build(hf_dir: str, recipe: str):
    import torch

    from sept_megatron.config import TrainConfig
    from sept_megatron.convert import HFTensorReader, load_hf_into_model
    from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
    from sept_megatron.trainer import model as mdl
    from sept_megatron.trainer.sft import SFTTrainer

    arch = arch_from_hf_config(load_hf_config(hf_dir))
    padded = mdl.padded_vocab_size(arch.vocab_size, 128, 1)
    model = mdl.build_megatron_model(
        arch,
        tensor_parallel=1,
        pipeline_parallel=1,
        params_dtype=torch.bfloat16,
        transformer_impl="transformer_engine",
        fp8=None if recipe == "bf16" else recipe,
        fp8_format="hybrid",
        padded_vocab=padded,
    )
    reader = HFTensorReader(hf_dir)
    load_hf_into_model(model.chunks, reader, arch, padded_vocab=padded, tp_rank=0, tp_size=1)
    reader.close()
    train_cfg = TrainConfig(
        lr=2e-4, warmup_steps=0, micro_batch_size=MICRO_BATCH, mini_batch_size=MINI_BATCH, weight_decay=0.0
    )
    trainer = SFTTrainer(model, train_cfg, total_steps=STEPS, use_distributed_optimizer=False, pad_id=0)
    return model, trainer


def logits_of(model, vocab_size: int):
    import torch

    from sept_megatron.convert.workflows import forward_logits

    tokens = torch.randint(
        0, vocab_size, (2, 64), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0)
    )
    for chunk in model.chunks:
        chunk.eval()
    with torch.no_grad():
        return forward_logits(model, tokens).float().cpu()


def te_extra_states(model) -> dict:
    """Each TE module's serialised FP8 state (``get_extra_state``), as bytes for comparison."""
    import torch
    from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

    states = {}
    for name, module in model.chunks[0].named_modules():
        if isinstance(module, TransformerEngineBaseModule):
            state = module.get_extra_state()
            if isinstance(state, torch.Tensor):
                states[name] = state.detach().cpu().numpy().tobytes().hex()
            else:
                states[name] = repr(state)
    return states


def run_recipe(hf_dir: str, recipe: str, out: Path) -> dict:
    import torch

    from sept_megatron.runtime import distributed
    from sept_megatron.trainer import checkpoint as ckpt_io
    from sept_megatron.trainer.sft import load_trainer_state, trainer_sharded_state_dict

    distributed.initialize(tensor_parallel=1, pipeline_parallel=1, device="cuda")
    try:
        model, trainer = build(hf_dir, recipe)
        vocab = model.arch.vocab_size
        torch.save(logits_of(model, vocab), out / f"logits-{recipe}.pt")
        batches = [samples(vocab, seed=0)] * STEPS  # the same data: a clear downward trajectory
        losses, result = [], {}
        for step, batch in enumerate(batches):
            if recipe != "bf16" and step == SAVE_AFTER:
                ckpt = out / f"ckpt-{recipe}"
                meta = ckpt_io.CheckpointMeta(
                    model.arch,
                    model.padded_vocab,
                    "bfloat16",
                    1,
                    1,
                    {"scheduler": trainer.scheduler.state_dict()},
                )
                ckpt_io.save_checkpoint(str(ckpt), None, trainer_sharded_state_dict(trainer), meta, hf_dir)
                result["extra_state_at_save"] = te_extra_states(model)
            losses.append(trainer.step(batch)["train/loss"])
        result["losses"] = losses
        if recipe != "bf16":
            resumed_model, resumed = build(hf_dir, recipe)
            load_trainer_state(
                resumed,
                str(out / f"ckpt-{recipe}"),
                ckpt_io.read_meta(str(out / f"ckpt-{recipe}")).train_state["scheduler"],
            )
            result["extra_state_after_load"] = te_extra_states(resumed_model)
            result["resumed_loss"] = resumed.step(batches[SAVE_AFTER])["train/loss"]
        return result
    finally:
        distributed.shutdown(keep_process_group=True)


def main(hf_dir: str, out_dir: str) -> None:
    from sept_megatron.runtime import distributed
    from sept_megatron.trainer.fp8 import fp8_unsupported_reason

    out = Path(out_dir)
    results = {}
    for recipe in RECIPES:
        reason = None if recipe == "bf16" else fp8_unsupported_reason(recipe)
        results[recipe] = {"skipped": reason} if reason else run_recipe(hf_dir, recipe, out)
    distributed.initialize(tensor_parallel=1, pipeline_parallel=1, device="cuda")
    distributed.shutdown()
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
