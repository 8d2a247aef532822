"""HF checkpoint -> Megatron distributed checkpoint (dist_checkpointing, torch_dist format).

    torchrun --nproc-per-node=N tools/convert_hf_to_megatron.py --hf-dir HF --out CKPT --tp T --pp P

N must equal T x P. Each rank builds only its own model stage, reads only the HF tensors that
stage needs (tensor by tensor), and writes its shards. The result loads at any TP/PP.
"""

import argparse
import sys

from sept_megatron.convert.workflows import convert_hf_to_megatron


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--hf-dir", required=True, help="local HF checkpoint directory")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument(
        "--dtype", default="auto", help="params dtype: auto (config.json's dtype), float32, bfloat16, float16"
    )
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    convert_hf_to_megatron(
        args.hf_dir,
        args.out,
        tp=args.tp,
        pp=args.pp,
        dtype=args.dtype,
        vocab_divisible_by=args.make_vocab_size_divisible_by,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
