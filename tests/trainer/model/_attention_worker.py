"""SDPAttention against Megatron's DotProductAttention on CPU (run by tests/trainer/model/test_attention.py).

    torchrun --nproc-per-node=2 tests/trainer/model/_attention_worker.py parity HF_ROOT OUT_JSON
    python tests/trainer/model/_attention_worker.py memory OUT_JSON

``parity`` (world of 2, fp32): module level at TP=1 (a one-rank TP group passed as Megatron's
process-group collection) and TP=2 (Megatron's own groups): outputs and q/k/v gradients of both
core-attention modules for MHA, GQA and MQA heads, causal and with a padding mask; whole model
at TP=2 for each HF dir under HF_ROOT: logits of both attention choices and of transformers.
``memory`` (world of 1): peak CPU allocation of one forward + backward at sequence 1024, SDPA
vs unfused, with and without recomputation, from torch.profiler's memory events (also the
figures of the README's attention section). Rank 0 writes OUT_JSON.
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
from sept_megatron.runtime import compat, distributed
from sept_megatron.trainer import model as mdl
from sept_megatron.trainer.attention import core_attention_class

HEAD_DIM = 16
HEAD_CASES = {"mha": (4, 4), "gqa": (8, 2), "mqa": (4, 1)}  # (query heads, K/V heads)


def attention_config(heads: int, groups: int, tp: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    # With fewer K/V heads than TP ranks, Megatron's Attention hands its core attention a
    # config with one group per rank (attention.py, "num_query_groups < world_size").
    return TransformerConfig(
        num_layers=1,
        hidden_size=heads * HEAD_DIM,
        kv_channels=HEAD_DIM,
        num_attention_heads=heads,
        num_query_groups=max(groups, tp),
        tensor_model_parallel_size=tp,
        attention_dropout=0.0,
        masked_softmax_fusion=False,
        use_cpu_initialization=True,
    )


def padding_mask(batch: int, seq: int, generator) -> torch.Tensor:
    """Megatron's convention (True = masked out); every query keeps at least its own key."""
    device = generator.device
    mask = torch.rand(batch, 1, seq, seq, generator=generator, device=device) < 0.3
    return mask & ~torch.eye(seq, dtype=torch.bool, device=device)


def module_case(heads: int, groups: int, pg_collection, tp: int, mask_type) -> dict:
    """Max |difference| SDPA vs DotProductAttention: output and the gradients of q, k, v."""
    from megatron.core.transformer.enums import AttnMaskType

    config = attention_config(heads, groups, tp)
    seq, batch = 37, 3
    heads_here, groups_here = heads // tp, max(groups, tp) // tp
    device = distributed.compute_device()
    generator = torch.Generator(device=device).manual_seed(1000 + dist.get_rank())
    inputs = [
        torch.randn(seq, batch, n, HEAD_DIM, generator=generator, device=device)
        for n in (heads_here, groups_here, groups_here)
    ]
    weight = torch.randn(seq, batch, heads_here * HEAD_DIM, generator=generator, device=device)
    mask = (
        mdl.causal_mask(seq, device=device)
        if mask_type == AttnMaskType.causal
        else padding_mask(batch, seq, generator)
    )
    results = {}
    for name in ("sdpa", "unfused"):
        module = core_attention_class(name)(
            config=config,
            layer_number=1,
            attn_mask_type=mask_type,
            attention_type="self",
            attention_dropout=None,
            softmax_scale=None,
            cp_comm_type=None,
            pg_collection=pg_collection,
        )
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out = module(q, k, v, mask, attn_mask_type=mask_type, attention_bias=None, packed_seq_params=None)
        (out * weight).sum().backward()
        results[name] = [out.detach(), q.grad, k.grad, v.grad]
    assert results["sdpa"][0].shape == (seq, batch, heads_here * HEAD_DIM)
    diffs = [float((a - b).abs().max()) for a, b in zip(results["sdpa"], results["unfused"])]
    return dict(zip(("output", "grad_q", "grad_k", "grad_v"), diffs))


def module_parity() -> dict:
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType

    # Every rank creates every one-rank group (new_group is collective) and keeps its own.
    singles = [dist.new_group([rank]) for rank in range(dist.get_world_size())]
    layouts = {"tp1": (ProcessGroupCollection(tp=singles[dist.get_rank()]), 1), "tp2": (None, 2)}
    results = {}
    for layout, (pg_collection, tp) in layouts.items():
        for case, (heads, groups) in HEAD_CASES.items():
            for mask_type in (AttnMaskType.causal, AttnMaskType.padding):
                key = f"{layout}/{case}/{mask_type.name}"
                results[key] = module_case(heads, groups, pg_collection, tp, mask_type)
    return results


def model_logits(hf_dir: Path, attention: str, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    from sept_megatron.convert import HFTensorReader, load_hf_into_model
    from sept_megatron.convert.workflows import forward_logits

    arch = arch_from_hf_config(load_hf_config(str(hf_dir)))
    padded = mdl.padded_vocab_size(arch.vocab_size, 128, 2)
    model = mdl.build_megatron_model(
        arch, tensor_parallel=2, pipeline_parallel=1, padded_vocab=padded, attention=attention
    )
    reader = HFTensorReader(str(hf_dir))
    load_hf_into_model(
        model.chunks,
        reader,
        arch,
        padded_vocab=padded,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=2,
    )
    reader.close()
    model.chunks[0].eval()
    with torch.no_grad():
        return forward_logits(model, tokens)


def model_parity(hf_root: Path) -> dict:
    from transformers import AutoModelForCausalLM

    results = {}
    for hf_dir in sorted(d for d in hf_root.iterdir() if (d / "config.json").is_file()):
        vocab = load_hf_config(str(hf_dir)).vocab_size
        device = distributed.compute_device()
        tokens = torch.randint(
            0, vocab, (2, 48), device=device, generator=torch.Generator(device=device).manual_seed(0)
        )
        logits = {name: model_logits(hf_dir, name, tokens) for name in ("sdpa", "unfused")}
        with compat.suspended(), torch.no_grad():
            hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True)
            reference = hf.to(device).eval()(tokens).logits.float()
        results[hf_dir.name] = {
            "sdpa_vs_transformers": float((logits["sdpa"] - reference).abs().max()),
            "unfused_vs_transformers": float((logits["unfused"] - reference).abs().max()),
            "sdpa_vs_unfused": float((logits["sdpa"] - logits["unfused"]).abs().max()),
        }
    return results


def peak_allocated_bytes(step) -> int:
    """Peak of the bytes allocated (and not yet freed) while ``step`` runs, from the CPU
    allocator's profiler events (each carries +bytes on allocation, -bytes on free)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


MEMORY_RUNS = [
    ("unfused", "none"),
    ("unfused", "selective"),
    ("sdpa", "none"),
    ("sdpa", "selective"),
    ("sdpa", "full"),
]


def memory(batch: int = 1, seq: int = 1024) -> dict:
    """One forward + backward of a small model at ``seq`` for each (attention, recompute), after
    one warm-up step (Megatron's unfused path allocates a persistent score buffer on first use);
    the median of three timed steps next to the peak."""
    from hf_tiny import tiny_config

    class Vocab:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

        def __len__(self):
            return 512

    arch = arch_from_hf_config(tiny_config("qwen2", Vocab(), max_position_embeddings=seq))
    device = distributed.compute_device()
    tokens = torch.randint(
        0, 512, (batch, seq), device=device, generator=torch.Generator(device=device).manual_seed(0)
    )
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)
    mask = mdl.causal_mask(seq, device=device)
    results = {
        "batch": batch,
        "seq": seq,
        "layers": arch.num_layers,
        "heads": arch.num_attention_heads,
        "hidden": arch.hidden_size,
    }
    for attention, recompute in MEMORY_RUNS:
        distributed.set_seed(0)
        model = mdl.build_megatron_model(
            arch,
            tensor_parallel=1,
            pipeline_parallel=1,
            padded_vocab=512,
            attention=attention,
            recompute=recompute,
        )
        chunk = model.chunks[0].train()

        def step(chunk=chunk):
            chunk(tokens, positions, mask).float().square().mean().backward()
            chunk.zero_grad(set_to_none=True)

        step()
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
        results[f"{attention}/{recompute}"] = {
            "peak_bytes": peak_allocated_bytes(step),
            "seconds_median": sorted(seconds)[1],
        }
    return results


def main(mode: str, *args: str) -> None:
    if mode == "parity":
        distributed.initialize(tensor_parallel=2, pipeline_parallel=1)
        results = {"module": module_parity(), "model": model_parity(Path(args[0]))}
    elif mode == "memory":
        distributed.initialize(tensor_parallel=1, pipeline_parallel=1)
        results = memory()
    else:
        raise SystemExit(f"unknown mode {mode!r}: parity or memory")
    try:
        if distributed.is_rank0():
            Path(args[-1]).write_text(json.dumps(results, indent=1))
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ for hf_tiny
    main(*sys.argv[1:])
