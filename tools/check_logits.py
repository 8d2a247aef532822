"""Compare logits of an HF checkpoint (transformers) and a Megatron checkpoint at its layout.

    torchrun --nproc-per-node=N tools/check_logits.py --hf-dir HF --ckpt CKPT [--tp T --pp P]

Token ids come from the tokenizer's encoding of a few prompts when the checkpoint has one,
random ids otherwise. Prints the max absolute logit difference; exits 1 above --tolerance.
"""

import argparse
import sys

from sept_megatron.convert.workflows import check_logits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--tp", type=int, default=None, help="default: the checkpoint's TP")
    parser.add_argument("--pp", type=int, default=None, help="default: the checkpoint's PP")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--seq-len", type=int, default=32)
    args = parser.parse_args(argv)
    diff = check_logits(args.hf_dir, args.ckpt, tp=args.tp, pp=args.pp, seq_len=args.seq_len)
    if diff is None:  # not rank 0
        return 0
    print(f"max |logit difference| = {diff:.3e} (tolerance {args.tolerance:.1e})")
    return 0 if diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
