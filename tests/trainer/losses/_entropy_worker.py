"""Vocab-parallel entropy at TP=2 against the unsharded one (tests/trainer/losses/test_losses.py).

    torchrun --nproc-per-node=2 tests/trainer/losses/_entropy_worker.py OUT_JSON

Both ranks hold the same seeded [b, s, padded_vocab] logits and take their half of the vocab;
the last padded rows are not tokens. Rank 0 writes the sharded entropy and its gradient,
gathered back to the full vocab, beside the unsharded reference computed on one rank.
"""

import json
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from sept_megatron.runtime import distributed
from sept_megatron.trainer.losses import vocab_parallel_entropy

VOCAB, PADDED, TAU = 13, 16, 0.7


def main(out: str) -> None:
    distributed.initialize(tensor_parallel=2, pipeline_parallel=1, device="cpu", backend="gloo")
    torch.manual_seed(0)
    full = (torch.randn(2, 3, PADDED, dtype=torch.float64) * 3).to(distributed.compute_device())
    rank, width = ps.get_tensor_model_parallel_rank(), PADDED // 2
    shard = full[..., rank * width : (rank + 1) * width].clone().requires_grad_(True)
    entropy = vocab_parallel_entropy(shard, VOCAB, TAU)
    entropy.sum().backward()
    pieces = [torch.zeros_like(shard.grad) for _ in range(2)]
    dist.all_gather(pieces, shard.grad.contiguous(), group=ps.get_tensor_model_parallel_group())
    if dist.get_rank() == 0:
        reference = full[..., :VOCAB].clone().requires_grad_(True)  # the unsharded one
        probs = torch.softmax(reference / TAU, dim=-1)
        ref_entropy = -(probs * torch.log_softmax(reference / TAU, dim=-1)).sum(-1)
        ref_entropy.sum().backward()
        grad = torch.cat(pieces, dim=-1)
        with open(out, "w") as f:
            json.dump(
                {
                    "entropy": entropy.tolist(),
                    "reference": ref_entropy.tolist(),
                    "grad": grad[..., :VOCAB].tolist(),
                    "ref_grad": reference.grad.tolist(),
                    "pad_grad": grad[..., VOCAB:].abs().max().item(),
                },
                f,
            )
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
