"""Megatron checkpoint -> HF sharded safetensors (+ index, config, tokenizer files).

    python tools/convert_megatron_to_hf.py --ckpt CKPT --out HF_OUT [--max-shard-size-gb 5]
    python tools/convert_megatron_to_hf.py --ckpt CKPT --out HF_FP8_OUT --fp8 blockwise

CKPT is a converted checkpoint or a training checkpoint root (its ``latest`` is followed).
Streams one layer at a time: no model is built and no whole model is held in memory.
``--fp8 blockwise`` writes attention/MLP linear weights as 128x128 blockwise e4m3 with fp32
``weight_scale_inv`` and a ``quantization_config`` (the DeepSeek-V3 / Qwen3-FP8 format SGLang,
vLLM and transformers load); norms, embeddings and the LM head keep the checkpoint's dtype.
"""

import argparse
import sys

from sept_megatron.convert import export_megatron_to_hf
from sept_megatron.convert.fp8 import EXPORT_RECIPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--ckpt", required=True, help="sept_megatron checkpoint directory")
    parser.add_argument("--out", required=True, help="output HF directory")
    parser.add_argument("--max-shard-size-gb", type=float, default=5.0)
    parser.add_argument(
        "--fp8",
        choices=EXPORT_RECIPES,
        default=None,
        help="write linear weights as FP8 (blockwise: 128x128 blocks, e4m3)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    export_megatron_to_hf(
        args.ckpt, args.out, max_shard_bytes=int(args.max_shard_size_gb * 2**30), fp8=args.fp8
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
