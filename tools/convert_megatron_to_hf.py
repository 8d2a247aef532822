"""Megatron checkpoint -> HF sharded safetensors (+ index, config, tokenizer files).

    python tools/convert_megatron_to_hf.py --ckpt CKPT --out HF_OUT [--max-shard-size-gb 5]

CKPT is a converted checkpoint or a training checkpoint root (its ``latest`` is followed).
Streams one layer at a time: no model is built and no whole model is held in memory.
"""

import argparse
import sys

from sept_megatron.convert import export_megatron_to_hf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--ckpt", required=True, help="sept_megatron checkpoint directory")
    parser.add_argument("--out", required=True, help="output HF directory")
    parser.add_argument("--max-shard-size-gb", type=float, default=5.0)
    args = parser.parse_args(argv)
    export_megatron_to_hf(args.ckpt, args.out, max_shard_bytes=int(args.max_shard_size_gb * 2**30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
