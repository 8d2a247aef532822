"""Weight-sync exactness at TP=2, PP=2 and DP=2 in one 2-process launch (test_weight_sync.py).

    torchrun --nproc-per-node=2 tests/weight_sync/_worker.py HF_ROOT OUT_DIR SMALL_BYTES LARGE_BYTES

For each HF checkpoint under HF_ROOT and each layout: Megatron loads it, its live weights are
perturbed (consistently across ranks: noise is drawn per full tensor from the tensor's name,
then sharded, so replicated norms stay equal on every TP rank and a tied output layer on the
last stage stays equal to the embedding), and ``weight_sync.sync`` pushes them into the
``HFRolloutEngine`` of every rank, each started from the unperturbed checkpoint. Every rank
records its engine's logits (before and after the sync) and the HF tensors it received at two
bucket sizes (and once more with only rank 0 receiving); rank 0 saves the Megatron logits and
all ranks' records in ``OUT_DIR/<model>-<layout>.pt`` and ``OUT_DIR/results.json``. That first
sync streams buckets (``direct=False``); :func:`check_direct` then checks the direct sync.
"""

import json
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from transformers import AutoModelForCausalLM, AutoTokenizer

from sept_megatron.convert import HFTensorReader, load_hf_into_model
from sept_megatron.convert.adapters import Kind, adapter_for, canonical_name, rule_index, tp_shard
from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
from sept_megatron.convert.hf_import import layer_offset
from sept_megatron.convert.workflows import forward_logits
from sept_megatron.rollout.hf import HFRolloutEngine
from sept_megatron.runtime import distributed
from sept_megatron.trainer import model as mdl
from sept_megatron.weight_sync import sync
from sept_megatron.weight_sync.gather import stream_hf_buckets, transports_on

LAYOUTS = [(2, 1), (1, 2), (1, 1)]  # with 2 processes: TP=2, PP=2, DP=2; with 1: (1, 1) only


def perturb_(model, seed: int) -> None:
    """Add noise to every live parameter, identical to what a TP=1 model would get."""
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    index = rule_index(adapter_for(model.arch))
    with torch.no_grad():
        for chunk in model.chunks:
            offset = layer_offset(chunk)
            for live_name, param in chunk.named_parameters():
                name = canonical_name(live_name, offset)
                if name == "output_layer.weight" and model.arch.tie_word_embeddings:
                    name = "embedding.word_embeddings.weight"  # the last stage's tied copy
                kind = index[name][0].kind
                full_shape = list(param.shape)
                if kind is not Kind.REPLICATED:
                    full_shape[1 if kind is Kind.ROW_PARALLEL else 0] *= tp
                generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
                noise = torch.randn(full_shape, generator=generator) * 0.05
                param.add_(tp_shard(kind, noise, tp_rank, tp).to(param.device))


def to_rank0(tensor_or_none):
    """The one non-None value among the ranks (PP: only the last stage has logits)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, None if tensor_or_none is None else tensor_or_none.cpu())
    return next(x for x in everyone if x is not None)


def state_of(engine) -> dict[str, torch.Tensor]:
    return {k: v.cpu().clone() for k, v in engine.model.state_dict().items()}


def streamed(model, size: int) -> dict[str, torch.Tensor]:
    return {
        name: t.cpu().clone()
        for bucket in stream_hf_buckets(model, size, transport="peer")
        for name, t in bucket
    }


def check_direct(model, hf_dir: Path, small: int) -> dict:
    """The direct sync (engine weights in the replica's shared buffer): into a fresh engine on
    every rank; after an in-place update (an optimizer step) and after a parameter is given new
    storage; then with an engine on rank 0 only (rank 1's engine, unbound, must keep the weights
    of the last sync it took part in). Each state is recorded with the streamed reference."""
    rank = dist.get_rank()
    engine = engine_from(hf_dir)
    record = {
        "sent": sync(model, engine, bucket_bytes=small),
        "state": state_of(engine),
        "reference": streamed(model, small),
    }
    perturb_(model, seed=8)  # in place, like an optimizer step
    sync(model, engine, bucket_bytes=small)
    record |= {"state_in_place": state_of(engine), "reference_in_place": streamed(model, small)}
    with torch.no_grad():  # new storage for every parameter: the cached views must follow
        for chunk in model.chunks:
            for param in chunk.parameters():
                param.data = param.data.clone()
    perturb_(model, seed=9)
    sync(model, engine, bucket_bytes=small)
    record |= {"state_moved": state_of(engine), "reference_moved": streamed(model, small)}
    perturb_(model, seed=10)
    sync(model, engine if rank == 0 else None, bucket_bytes=small)
    record |= {"state_rank0_only": state_of(engine), "reference_rank0_only": streamed(model, small)}
    return record


def second_transport() -> str:
    """Shared memory where it exists (CPU ranks), else peer-to-peer again (CUDA)."""
    return "shared" if "shared" in transports_on(distributed.compute_device()) else "peer"


def engine_from(hf_dir: Path) -> HFRolloutEngine:
    """A fresh engine from the (unperturbed) checkpoint, colocated on the compute device."""
    return HFRolloutEngine(
        model=AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True),
        tokenizer=AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True),
        device=distributed.compute_device(),
        progress=False,
    )


def check_layout(hf_dir: Path, tp: int, pp: int, small: int, large: int) -> tuple[dict, dict]:
    """Load, perturb, sync into an engine on every rank; (what rank 0 saves, a JSON summary)."""
    distributed.initialize(tensor_parallel=tp, pipeline_parallel=pp)
    rank = dist.get_rank()
    arch = arch_from_hf_config(load_hf_config(str(hf_dir)))
    padded = mdl.padded_vocab_size(arch.vocab_size, 128, tp)
    model = mdl.build_megatron_model(
        arch, tensor_parallel=tp, pipeline_parallel=pp, padded_vocab=padded, transformer_impl="local"
    )
    reader = HFTensorReader(str(hf_dir))
    load_hf_into_model(
        model.chunks,
        reader,
        arch,
        padded_vocab=padded,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=tp,
    )
    reader.close()
    perturb_(model, seed=7)
    for chunk in model.chunks:
        chunk.eval()

    engine = engine_from(hf_dir)
    tokens = torch.randint(0, arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(distributed.compute_device())
    mine: dict = {}
    with torch.no_grad():
        megatron_logits = to_rank0(forward_logits(model, tokens))
        mine["engine_before"] = engine.model(tokens).logits.cpu()
        mine["buckets_sent"] = sync(model, engine, bucket_bytes=small, direct=False)
        mine["engine_after"] = engine.model(tokens).logits.cpu()
        mine["engine_state"] = state_of(engine)
    # Collective: every rank walks each stream and receives every bucket (the small buckets by
    # point-to-point messages, the large ones through shared memory, the sync above by the
    # automatic choice: shared memory on one CPU host)...
    mine["streams"] = {
        size: [
            [(name, t.cpu().clone()) for name, t in bucket]
            for bucket in stream_hf_buckets(model, size, transport=transport)
        ]
        for size, transport in ((small, "peer"), (large, second_transport()))
    }
    # ... or only rank 0 does (as when only rank 0 has an engine): the others only send.
    mine["stream_rank0_only"] = {
        transport: [
            [(name, t.cpu().clone()) for name, t in bucket]
            for bucket in stream_hf_buckets(model, large, receive=rank == 0, transport=transport)
        ]
        for transport in ("peer", second_transport())
    }
    mine["direct"] = check_direct(model, hf_dir, small)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    distributed.shutdown(keep_process_group=True)
    record = {"megatron": megatron_logits, "ranks": everyone}
    summary = {
        "buckets_sent": [r["buckets_sent"] for r in everyone],
        "bucket_counts": [{str(size): len(b) for size, b in r["streams"].items()} for r in everyone],
    }
    return record, summary


def main(hf_root: str, out_dir: str, small: str, large: str) -> None:
    distributed.initialize(tensor_parallel=1, pipeline_parallel=1)  # the launch's default group
    distributed.shutdown(keep_process_group=True)
    out, summaries = Path(out_dir), {}
    for hf_dir in sorted(d for d in Path(hf_root).iterdir() if d.is_dir()):
        for tp, pp in [l for l in LAYOUTS if l[0] * l[1] <= dist.get_world_size()]:
            record, summary = check_layout(hf_dir, tp, pp, int(small), int(large))
            key = f"{hf_dir.name}-tp{tp}pp{pp}"
            if dist.get_rank() == 0:
                torch.save(record, out / f"{key}.pt")
                summaries[key] = summary
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(summaries, indent=1))
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
