"""EM-FT and GRPO steps of SFTTrainer for tests/trainer/sft/test_modes_trainer.py, one launch per
world size (as tests/trainer/sft/_worker.py, whose model builder it reuses).

    python tests/trainer/sft/_modes_worker.py HF_DIR SAMPLES_JSON OUT_JSON                         # 1 process
    torchrun --nproc-per-node=2 tests/trainer/sft/_modes_worker.py HF_DIR SAMPLES_JSON OUT_JSON    # TP/PP/DP=2

EM: three entropy steps on the same mini-batch. GRPO: the samples with fixed advantages in
two mini-batches, old log-probs of both taken before the first step, then one step each (the
second step's ratio is not 1, so clipping can act). Rank 0 writes OUT_JSON.
"""

import json
import sys

import torch.distributed as dist
from _worker import LAYOUTS, build

from sept_megatron.config import TrainConfig
from sept_megatron.runtime import distributed
from sept_megatron.trainer.sft import Sample, SFTTrainer

ADVANTAGES = [1.0, -1.0, 0.5, -0.5]
LR = 2e-2


def make_trainer(model, pad_id: int, mode: str) -> SFTTrainer:
    cfg = TrainConfig(
        mode=mode,
        lr=LR,
        warmup_steps=0,
        micro_batch_size=1,
        mini_batch_size=4,
        grad_clip=1.0,
        weight_decay=0.0,
    )
    return SFTTrainer(model, cfg, total_steps=4, use_distributed_optimizer=True, pad_id=pad_id)


def em_run(hf_dir, samples, pad_id, tp, pp) -> dict:
    em = make_trainer(build(hf_dir, tp, pp), pad_id, "em")
    logs = [em.step(samples) for _ in range(3)]
    return {
        "loss": [log["train/loss"] for log in logs],
        "entropy": [log["train/entropy"] for log in logs],
        "eval_after": em.evaluate_loss(samples),
    }


def grpo_run(hf_dir, samples, pad_id, tp, pp) -> dict:
    grpo = make_trainer(build(hf_dir, tp, pp), pad_id, "grpo")
    scored = [Sample(s.prompt_ids, s.response_ids, a) for s, a in zip(samples, ADVANTAGES)]
    mini_batches = [scored, scored[::-1]]
    old = [grpo.log_probs(mb) for mb in mini_batches]
    logs = [grpo.step(mb, o) for mb, o in zip(mini_batches, old)]
    return {
        key: [log[f"train/{key}"] for log in logs]
        for key in ("loss", "clip_fraction", "entropy", "response_tokens")
    }


def main(hf_dir: str, samples_path: str, out_path: str) -> None:
    with open(samples_path) as f:
        data = json.load(f)
    samples = [Sample(s["prompt_ids"], s["response_ids"]) for s in data["samples"]]
    pad_id = data["pad_id"]
    distributed.initialize(tensor_parallel=1, pipeline_parallel=1)  # the launch's default group
    distributed.shutdown(keep_process_group=True)
    layouts = {"single": (1, 1)} if dist.get_world_size() == 1 else LAYOUTS
    results = {}
    for name, (tp, pp) in layouts.items():
        distributed.initialize(tensor_parallel=tp, pipeline_parallel=pp)
        results[name] = {
            "em": em_run(hf_dir, samples, pad_id, tp, pp),
            "grpo": grpo_run(hf_dir, samples, pad_id, tp, pp),
        }
        distributed.shutdown(keep_process_group=True)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
