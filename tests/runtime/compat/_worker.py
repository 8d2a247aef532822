"""Strict compat mode, probed in a real 2-process gloo world (run by test_strict_mode.py).

    torchrun --nproc-per-node=2 tests/runtime/compat/_worker.py HF_DIR OUT_JSON

Each probe records whether the call was refused with HostTensorError; rank 0 writes the record.
"""

import json
import sys

import torch
import torch.distributed as dist


def refused(call) -> bool:
    from sept_megatron.runtime.compat import HostTensorError

    try:
        call()
    except HostTensorError:
        return True
    return False


def probes(hf_dir: str) -> dict[str, bool]:
    from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
    from sept_megatron.runtime.distributed import compute_device
    from sept_megatron.trainer import model as mdl

    device = compute_device()
    placed = torch.ones(3, device=device)
    other = 1 - dist.get_rank()
    gloo = dist.new_group(ranks=[0, 1], backend="gloo")
    record = {
        "all_reduce_factory_without_device": refused(lambda: dist.all_reduce(torch.zeros(2))),
        "all_reduce_on_compute_device": refused(lambda: dist.all_reduce(torch.zeros(2, device=device))),
        "all_reduce_after_cpu": refused(lambda: dist.all_reduce(placed.cpu())),
        "all_reduce_result_of_host_math": refused(lambda: dist.all_reduce(torch.tensor([1.0, 2.0]) * 2)),
        "all_reduce_host_moved_to_device": refused(lambda: dist.all_reduce(torch.tensor([1.0]).to(device))),
        "all_reduce_mixed_math": refused(lambda: dist.all_reduce(placed + torch.ones(3))),
        "all_reduce_on_explicit_gloo_group": refused(lambda: dist.all_reduce(torch.zeros(2), group=gloo)),
        "broadcast_host": refused(lambda: dist.broadcast(torch.zeros(2), src=0)),
        "all_gather_host": refused(
            lambda: dist.all_gather([torch.zeros(1) for _ in range(2)], torch.zeros(1))
        ),
        "batch_isend_irecv_host": refused(
            lambda: dist.batch_isend_irecv(
                [dist.P2POp(dist.isend if dist.get_rank() == 0 else dist.irecv, torch.zeros(2), other)]
            )
        ),
        "batch_isend_irecv_placed": refused(
            lambda: [
                w.wait()
                for w in dist.batch_isend_irecv(
                    [
                        dist.P2POp(
                            dist.isend if dist.get_rank() == 0 else dist.irecv,
                            torch.zeros(2, device=device),
                            other,
                        )
                    ]
                )
            ]
        ),
        "all_gather_object_host": refused(lambda: dist.all_gather_object([None, None], torch.zeros(1))),
        "the_original_is_untouched_by_cuda": (
            lambda t: (t.cuda(), refused(lambda: dist.broadcast(t, src=0)))[1]
        )(torch.zeros(1)),
    }
    arch = arch_from_hf_config(load_hf_config(hf_dir))
    model = mdl.build_megatron_model(
        arch,
        tensor_parallel=2,
        pipeline_parallel=1,
        padded_vocab=mdl.padded_vocab_size(arch.vocab_size, 128, 2),
        transformer_impl="local",
    )
    chunk = model.chunks[0]
    tokens = torch.randint(0, arch.vocab_size, (1, 8))

    def forward(ids):
        positions = torch.arange(8, device=device).unsqueeze(0)
        with torch.no_grad():
            chunk(ids, positions, mdl.causal_mask(8, device=device))

    record["model_forward_host_tokens"] = refused(lambda: forward(tokens))
    record["model_forward_placed_tokens"] = refused(lambda: forward(tokens.to(device)))
    return record


def main(hf_dir: str, out_path: str) -> None:
    from sept_megatron.runtime import compat, distributed

    distributed.initialize(tensor_parallel=2, pipeline_parallel=1)
    try:
        record = {"strict": compat.strict_enabled(), **probes(hf_dir)}
    finally:
        distributed.shutdown()
    if int(torch.distributed.get_rank() if dist.is_initialized() else 0) == 0:
        with open(out_path, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
