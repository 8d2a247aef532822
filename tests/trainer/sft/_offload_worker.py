"""Trainer offload (test_offload.py): two identical trainers take the same steps; one parks
its whole state in host memory between the steps.

    python tests/trainer/sft/_offload_worker.py HF_DIR OUT_JSON
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _worker import build, trainer  # noqa: E402

from sept_megatron.runtime import distributed  # noqa: E402
from sept_megatron.trainer.offload import offload, offloaded, onload, trainer_tensors  # noqa: E402
from sept_megatron.trainer.sft import Sample  # noqa: E402


def main(hf_dir: str, out: str) -> None:
    distributed.initialize(tensor_parallel=1, pipeline_parallel=1, device="cpu")
    samples = [
        Sample([1, 2, 3, 4], [5, 6, 7]),
        Sample([2, 3], [4, 5, 6, 7]),
        Sample([3, 4, 5], [6, 7]),
        Sample([4], [5, 6, 7, 8]),
    ]
    plain, parked = (trainer(build(hf_dir, 1, 1), 0, lr=1e-3, warmup_steps=0, steps=4) for _ in range(2))
    record = {"plain": [], "parked": []}
    for step in range(3):
        record["plain"].append(plain.step(samples)["train/loss"])
        before = [t.detach().clone() for t in trainer_tensors(parked)]
        if step == 1:  # check the parked state by hand once
            saved = offload(parked)
            record["bytes_parked"] = sum(host.numel() for _, host in saved)
            record["storages_empty"] = all(s.nbytes() == 0 for s, _ in saved)
            onload(saved)
        else:
            with offloaded(parked, enabled=True):
                pass
        after = trainer_tensors(parked)
        record.setdefault("restored", []).append(all(torch.equal(a, b) for a, b in zip(before, after)))
        record["parked"].append(parked.step(samples)["train/loss"])
    weights = [p.detach() for c in plain.chunks for p in c.parameters()]
    others = [p.detach() for c in parked.chunks for p in c.parameters()]
    record["same_weights"] = all(torch.equal(a, b) for a, b in zip(weights, others))
    Path(out).write_text(json.dumps(record))
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
