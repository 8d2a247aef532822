"""GPU check of the Transformer Engine layer spec in bf16 (run by tests/trainer/model/test_model.py).

    torchrun --nproc-per-node=1 tests/trainer/model/_gpu_worker.py HF_ROOT OUT_JSON

For each HF dir under HF_ROOT: build the Megatron model with TE layers in bf16, load the HF
weights, and record the max |logit error| against transformers in fp32, next to transformers'
own bf16 error against the same fp32 reference.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sept_megatron.convert import HFTensorReader, load_hf_into_model
from sept_megatron.convert.hf_config import arch_from_hf_config, load_hf_config
from sept_megatron.convert.workflows import forward_logits
from sept_megatron.runtime import distributed
from sept_megatron.trainer import model as mdl


def check_family(hf_dir: Path) -> dict[str, float]:
    arch = arch_from_hf_config(load_hf_config(str(hf_dir)))
    padded = mdl.padded_vocab_size(arch.vocab_size, 128, 1)
    model = mdl.build_megatron_model(
        arch,
        tensor_parallel=1,
        pipeline_parallel=1,
        params_dtype=torch.bfloat16,
        transformer_impl="transformer_engine",
        padded_vocab=padded,
    )
    reader = HFTensorReader(str(hf_dir))
    load_hf_into_model(model.chunks, reader, arch, padded_vocab=padded, tp_rank=0, tp_size=1)
    reader.close()
    for chunk in model.chunks:
        chunk.eval()
    tokens = torch.randint(
        0, arch.vocab_size, (2, 32), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0)
    )
    with torch.no_grad():
        megatron = forward_logits(model, tokens)
        reference = {}
        for dtype in (torch.float32, torch.bfloat16):
            hf = (
                AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, local_files_only=True)
                .cuda()
                .eval()
            )
            reference[dtype] = hf(tokens).logits.float()
    fp32 = reference[torch.float32]
    return {
        "megatron_bf16_vs_fp32": float((megatron - fp32).abs().max()),
        "hf_bf16_vs_fp32": float((reference[torch.bfloat16] - fp32).abs().max()),
    }


def main(hf_root: str, out_path: str) -> None:
    distributed.initialize(tensor_parallel=1, pipeline_parallel=1)
    try:
        results = {
            d.name: check_family(d) for d in sorted(Path(hf_root).iterdir()) if (d / "config.json").is_file()
        }
    finally:
        distributed.shutdown()
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
