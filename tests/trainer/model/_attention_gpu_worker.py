"""SDPAttention on one GPU in bf16 (run by tests/trainer/model/test_attention_gpu.py).

    SEPT_DEVICE=cuda torchrun --nproc-per-node=1 tests/trainer/model/_attention_gpu_worker.py HF_ROOT OUT_JSON

With SEPT_DEVICE=cpu (SEPT_GPU_TEST_DEVICE=cpu pytest -m gpu) the same steps run on the CPU
path at a small shape: that checks the test's logic, not CUDA.

1. For each HF dir under HF_ROOT: the local layer spec with model.attention=sdpa in bf16, max
   |logit error| against transformers in fp32, next to transformers' own bf16 error.
2. Issue 8's shape (random-init Qwen2, hidden 1536, 28 layers, 12 heads / 2 KV heads, head_dim
   128, FFN 8960, tied, vocab 1024; 1.31B parameters): one SFTTrainer step (AdamW, bf16, DDP
   buffers) at micro-batch 16 x 1024, then two timed steps; records the peak GPU memory and
   the training tokens/s (which needs no OOM: the unfused path ran out of memory here).
3. Which SDPA kernel runs for that shape in bf16 (the fused CUDA kernels only: math refused).
"""

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sept_megatron.config import TrainConfig
from sept_megatron.convert import HFTensorReader, load_hf_into_model
from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
from sept_megatron.convert.workflows import forward_logits
from sept_megatron.runtime import distributed
from sept_megatron.trainer import model as mdl
from sept_megatron.trainer.arch import ModelArch
from sept_megatron.trainer.sft import Sample, SFTTrainer

ISSUE8_SHAPE = ModelArch(
    model_type="qwen2",
    vocab_size=1024,
    hidden_size=1536,
    num_layers=28,
    num_attention_heads=12,
    num_query_groups=2,
    head_dim=128,
    ffn_hidden_size=8960,
    norm_eps=1e-6,
    rope_theta=1e6,
    rope_scaling_factor=None,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    qkv_bias=True,
    qk_layernorm=False,
)
MICRO_BATCH, SEQ = 16, 1024
CPU_SHAPE = dataclasses.replace(
    ISSUE8_SHAPE, hidden_size=64, num_layers=2, num_attention_heads=4, head_dim=16, ffn_hidden_size=128
)
CPU_MICRO_BATCH, CPU_SEQ = 2, 64


def bf16_logits(hf_dir: Path) -> dict[str, float]:
    arch = arch_from_hf_config(load_hf_config(str(hf_dir)))
    padded = mdl.padded_vocab_size(arch.vocab_size, 128, 1)
    model = mdl.build_megatron_model(
        arch,
        tensor_parallel=1,
        pipeline_parallel=1,
        params_dtype=torch.bfloat16,
        transformer_impl="local",
        attention="sdpa",
        padded_vocab=padded,
    )
    reader = HFTensorReader(str(hf_dir))
    load_hf_into_model(model.chunks, reader, arch, padded_vocab=padded, tp_rank=0, tp_size=1)
    reader.close()
    model.chunks[0].eval()
    device = distributed.compute_device()
    tokens = torch.randint(
        0, arch.vocab_size, (2, 64), device=device, generator=torch.Generator(device=device).manual_seed(0)
    )
    with torch.no_grad():
        megatron = forward_logits(model, tokens)
        reference = {}
        for dtype in (torch.float32, torch.bfloat16):
            hf = (
                AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, local_files_only=True)
                .to(device)
                .eval()
            )
            reference[dtype] = hf(tokens).logits.float()
    fp32 = reference[torch.float32]
    return {
        "megatron_bf16_vs_fp32": float((megatron - fp32).abs().max()),
        "hf_bf16_vs_fp32": float((reference[torch.bfloat16] - fp32).abs().max()),
    }


def kernel_for_issue8_shape() -> str:
    """The fused kernel SDPA picks for one layer's q/k/v in our [s, b, h, d] layout."""
    from torch.profiler import ProfilerActivity, profile

    from sept_megatron.trainer.attention import _fused_sdpa

    device = distributed.compute_device()
    batch, seq = (MICRO_BATCH, SEQ) if device.type == "cuda" else (CPU_MICRO_BATCH, CPU_SEQ)
    q = torch.randn(seq, batch, 12, 128, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(seq, batch, 2, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _fused_sdpa(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True, enable_gqa=True)
    names = {e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")}
    return ",".join(sorted(names))


def issue8_step() -> dict:
    on_gpu = distributed.compute_device().type == "cuda"
    shape, batch, seq = (ISSUE8_SHAPE, MICRO_BATCH, SEQ) if on_gpu else (CPU_SHAPE, CPU_MICRO_BATCH, CPU_SEQ)
    padded = mdl.padded_vocab_size(shape.vocab_size, 128, 1)
    model = mdl.build_megatron_model(
        shape,
        tensor_parallel=1,
        pipeline_parallel=1,
        params_dtype=torch.bfloat16,
        transformer_impl="local",
        attention="sdpa",
        padded_vocab=padded,
    )
    cfg = TrainConfig(lr=1e-5, warmup_steps=0, micro_batch_size=batch, mini_batch_size=batch)
    trainer = SFTTrainer(model, cfg, total_steps=3, use_distributed_optimizer=False, pad_id=0)
    generator = torch.Generator().manual_seed(0)
    prompt = seq // 4  # prompt + response = seq + 1 tokens: inputs and labels of length seq
    samples = [
        Sample(
            torch.randint(4, 1024, (prompt,), generator=generator).tolist(),
            torch.randint(4, 1024, (seq + 1 - prompt,), generator=generator).tolist(),
        )
        for _ in range(batch)
    ]
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    first = trainer.step(samples)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(2):
        trainer.step(samples)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 2
    result = {
        "loss": first["train/loss"],
        "step_seconds": seconds,
        "tokens_per_s": batch * seq / seconds,
        "peak_gib": None,
        "total_gib": None,
    }
    if on_gpu:
        result.update(
            peak_gib=torch.cuda.max_memory_allocated() / 2**30,
            total_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
        )
    return result


def main(hf_root: str, out_path: str) -> None:
    distributed.initialize(tensor_parallel=1, pipeline_parallel=1)  # SEPT_DEVICE decides
    try:
        results = {
            "logits": {
                d.name: bf16_logits(d)
                for d in sorted(Path(hf_root).iterdir())
                if (d / "config.json").is_file()
            },
            "kernel": kernel_for_issue8_shape(),
            "issue8": issue8_step(),
        }
    finally:
        distributed.shutdown()
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
