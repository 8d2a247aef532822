"""One SFT step with each ``train.recompute`` mode (run by tests/trainer/sft/test_recompute.py).

    python tests/trainer/sft/_recompute_worker.py HF_DIR SAMPLES_JSON OUT_JSON

A world of one (TP=PP=1, gloo, the CPU compatibility layer). For each (attention, recompute,
dropout) run: the same HF weights and the same seed, one ``SFTTrainer.step`` (two micro-batches,
no gradient clipping, so the gradients are the raw ones); recorded: the loss, the grad norm, and
the largest difference of every gradient and every updated weight against the run without
recomputation at the same attention and dropout. With dropout 0.1 the recomputed forward only
reproduces the first one if Megatron's checkpoint restores the RNG states (compat's job on CPU).
"""

import json
import sys

from sept_megatron.config import TrainConfig
from sept_megatron.convert import HFTensorReader, load_hf_into_model
from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
from sept_megatron.runtime import distributed
from sept_megatron.trainer import model as mdl
from sept_megatron.trainer.sft import Sample, SFTTrainer

SEED = 1234
RUNS = [
    (attention, recompute, dropout)
    for attention, modes in (("sdpa", ("none", "selective", "full")), ("unfused", ("none", "selective")))
    for dropout in (0.0, 0.1)
    for recompute in modes
]


def build(hf_dir: str, attention: str, recompute: str, dropout: float) -> mdl.MegatronModel:
    """build_megatron_model's steps, with dropout switched on in the config before the layers
    read it (the project's models train without dropout)."""
    arch = arch_from_hf_config(load_hf_config(hf_dir))
    padded = mdl.padded_vocab_size(arch.vocab_size, 128, 1)
    config = mdl.transformer_config(arch, recompute=recompute)
    config.hidden_dropout = config.attention_dropout = dropout
    chunks = mdl.build_model_stages(
        arch, config, padded_vocab=padded, transformer_engine=False, attention=attention
    )
    model = mdl.MegatronModel(chunks, arch, config, padded)
    reader = HFTensorReader(hf_dir)
    load_hf_into_model(model.chunks, reader, arch, padded_vocab=padded, tp_rank=0, tp_size=1)
    reader.close()
    return model


def one_step(hf_dir: str, samples: list[Sample], pad_id: int, run) -> dict:
    distributed.set_seed(SEED)  # same RNG streams (CPU generator and Megatron's tracker)
    model = build(hf_dir, *run)
    cfg = TrainConfig(
        lr=1e-2,
        warmup_steps=0,
        micro_batch_size=2,
        mini_batch_size=4,
        grad_clip=0.0,
        weight_decay=0.0,
        recompute=run[1],
    )
    trainer = SFTTrainer(model, cfg, total_steps=1, use_distributed_optimizer=False, pad_id=pad_id)
    log = trainer.step(samples)
    chunk = trainer.chunks[0]
    return {
        "loss": log["train/loss"],
        "grad_norm": log["train/grad_norm"],
        "granularity": model.config.recompute_granularity,
        "grads": {name: p.main_grad.detach().clone() for name, p in chunk.named_parameters()},
        "weights": {name: p.detach().clone() for name, p in chunk.named_parameters()},
    }


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main(hf_dir: str, samples_path: str, out_path: str) -> None:
    with open(samples_path) as f:
        data = json.load(f)
    samples = [Sample(s["prompt_ids"], s["response_ids"]) for s in data["samples"]]
    distributed.initialize(tensor_parallel=1, pipeline_parallel=1, seed=SEED)
    try:
        runs = {run: one_step(hf_dir, samples, data["pad_id"], run) for run in RUNS}
    finally:
        distributed.shutdown()
    results = {}
    for (attention, recompute, dropout), result in runs.items():
        reference = runs[(attention, "none", dropout)]
        results[f"{attention}/{recompute}/dropout{dropout}"] = {
            "loss": result["loss"],
            "grad_norm": result["grad_norm"],
            "granularity": result["granularity"],
            "grad_diff": max_diff(result["grads"], reference["grads"]),
            "weight_diff": max_diff(result["weights"], reference["weights"]),
            "grad_max": max(float(g.abs().max()) for g in result["grads"].values()),
        }
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
