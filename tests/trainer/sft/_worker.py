"""SFTTrainer runs for tests/trainer/sft/test_sft_trainer.py: one launch per world size.

    python tests/trainer/sft/_worker.py HF_DIR SAMPLES_JSON OUT_JSON                          # 1 process
    torchrun --nproc-per-node=2 tests/trainer/sft/_worker.py HF_DIR SAMPLES_JSON OUT_JSON     # TP/PP/DP=2

Every run starts from the HF checkpoint with the vocab-padding rows of the (tied) output layer
set to 1.0, so a loss that let padding into the softmax would be visibly wrong. With one
process: the evaluation loss at tau_t = 1 and 2, a reference run, a large-lr run and a warmup
run. With two processes: the evaluation loss and the reference run at TP=2, PP=2 and DP=2.
Rank 0 writes OUT_JSON.
"""

import json
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from sept_megatron.config import TrainConfig
from sept_megatron.convert import HFTensorReader, load_hf_into_model
from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
from sept_megatron.runtime import distributed
from sept_megatron.trainer import model as mdl
from sept_megatron.trainer.sft import Sample, SFTTrainer

PAD_ROW_VALUE = 1.0
REFERENCE = dict(lr=1e-3, warmup_steps=0, steps=3)
LARGE_LR = dict(lr=1e-2, warmup_steps=0, steps=5)
WARMUP = dict(lr=1e-3, warmup_steps=3, steps=5)
# The reference's schedule: the LR scheduler steps once per round (here of 2 optimizer steps).
ROUNDS = dict(lr=1e-3, warmup_steps=2, steps=6, lr_schedule_interval="round", steps_per_round=2)
# The reference's loss: each micro-batch's (one sample's) token mean, averaged.
MICROBATCH_MEAN = dict(lr=1e-3, warmup_steps=0, steps=1, loss_aggregation="microbatch_mean")
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}


def build(hf_dir: str, tp: int, pp: int):
    """This rank's stage of the checkpoint, padded vocab rows of the output layer set."""
    arch = arch_from_hf_config(load_hf_config(hf_dir))
    padded = mdl.padded_vocab_size(arch.vocab_size, 128, tp)
    model = mdl.build_megatron_model(
        arch, tensor_parallel=tp, pipeline_parallel=pp, padded_vocab=padded, transformer_impl="local"
    )
    reader = HFTensorReader(hf_dir)
    load_hf_into_model(
        model.chunks,
        reader,
        arch,
        padded_vocab=padded,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=tp,
    )
    reader.close()
    rows_per_rank = padded // tp
    first_row = ps.get_tensor_model_parallel_rank() * rows_per_rank
    with torch.no_grad():
        for chunk in model.chunks:
            for name, param in chunk.named_parameters():
                if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                    global_rows = torch.arange(first_row, first_row + rows_per_rank)
                    param[global_rows >= arch.vocab_size] = PAD_ROW_VALUE
    return model


def trainer(
    model,
    pad_id: int,
    *,
    lr: float,
    warmup_steps: int,
    steps: int,
    tau_train=1.0,
    steps_per_round: int = 1,
    **train_fields,
):
    cfg = TrainConfig(
        lr=lr,
        warmup_steps=warmup_steps,
        micro_batch_size=1,
        mini_batch_size=4,
        grad_clip=1.0,
        weight_decay=0.01,
        tau_train=tau_train,
        **train_fields,
    )
    return SFTTrainer(
        model,
        cfg,
        total_steps=steps,
        use_distributed_optimizer=True,
        pad_id=pad_id,
        total_rounds=steps // steps_per_round,
    )


def train_run(hf_dir, samples, pad_id, tp, pp, settings) -> dict:
    model = build(hf_dir, tp, pp)
    sft = trainer(model, pad_id, **settings)
    logs, lr_used = [], []
    for step in range(settings["steps"]):
        lr_used.append(sft.optimizer.param_groups[0]["lr"])  # the LR this step runs at
        logs.append(sft.step(samples))
        if (step + 1) % settings.get("steps_per_round", 1) == 0:
            sft.end_round()
    return {
        "lr_used": lr_used,
        "loss": [log["train/loss"] for log in logs],
        "grad_norm": [log["train/grad_norm"] for log in logs],
        "lr": [log["train/lr"] for log in logs],
        "tokens": [log["train/response_tokens"] for log in logs],
        "skipped": [log["train/update_skipped"] for log in logs],
        "eval_after": sft.evaluate_loss(samples),
    }


def eval_loss(hf_dir, samples, pad_id, tp, pp, tau_train) -> float:
    model = build(hf_dir, tp, pp)
    return trainer(model, pad_id, lr=1e-3, warmup_steps=0, steps=1, tau_train=tau_train).evaluate_loss(
        samples
    )


def main(hf_dir: str, samples_path: str, out_path: str) -> None:
    with open(samples_path) as f:
        data = json.load(f)
    samples = [Sample(s["prompt_ids"], s["response_ids"]) for s in data["samples"]]
    pad_id = data["pad_id"]
    distributed.initialize(tensor_parallel=1, pipeline_parallel=1)  # the launch's default group
    distributed.shutdown(keep_process_group=True)
    world = dist.get_world_size()
    layouts = {"single": (1, 1)} if world == 1 else LAYOUTS
    results = {}
    for name, (tp, pp) in layouts.items():
        distributed.initialize(tensor_parallel=tp, pipeline_parallel=pp)
        result = {
            "eval_tau1": eval_loss(hf_dir, samples, pad_id, tp, pp, 1.0),
            "reference": train_run(hf_dir, samples, pad_id, tp, pp, REFERENCE),
        }
        if world == 1:
            result["eval_tau2"] = eval_loss(hf_dir, samples, pad_id, tp, pp, 2.0)
            result["large_lr"] = train_run(hf_dir, samples, pad_id, tp, pp, LARGE_LR)
            result["warmup"] = train_run(hf_dir, samples, pad_id, tp, pp, WARMUP)
            result["rounds"] = train_run(hf_dir, samples, pad_id, tp, pp, ROUNDS)
            result["microbatch_mean"] = train_run(hf_dir, samples, pad_id, tp, pp, MICROBATCH_MEAN)
        distributed.shutdown(keep_process_group=True)
        results[name] = result
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
