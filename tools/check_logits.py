"""Compare logits of an HF checkpoint (transformers) and a Megatron checkpoint at its layout.

    torchrun --nproc-per-node=N tools/check_logits.py --hf-dir HF --ckpt CKPT [--tp T --pp P]

Token ids come from the tokenizer's encoding of a few prompts when the checkpoint has one,
random ids otherwise. Both models run on the compute device (the GPU of each rank under
torchrun on a GPU machine). Prints the max absolute logit difference; exits 1 above the
tolerance (1e-4 for fp32 checkpoints, 3e-2 of the largest |logit| for bf16/fp16).
"""

import argparse
import sys

from sept_megatron.convert.workflows import check_logits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--tp", type=int, default=None, help="default: the checkpoint's TP")
    parser.add_argument("--pp", type=int, default=None, help="default: the checkpoint's PP")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max absolute logit difference allowed (default: 1e-4 for a fp32 "
        "checkpoint; 3e-2 of the largest |logit| for bf16/fp16)",
    )
    parser.add_argument("--seq-len", type=int, default=32)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check = check_logits(args.hf_dir, args.ckpt, tp=args.tp, pp=args.pp, seq_len=args.seq_len)
    if check is None:  # not rank 0
        return 0
    kind, bar = ("absolute", args.tolerance) if args.tolerance is not None else check.default_tolerance()
    print(
        f"max |logit difference| = {check.max_abs_diff:.3e} "
        f"({check.relative_diff:.2e} of the largest |logit| {check.max_abs_logit:.3g}; "
        f"{str(check.dtype).removeprefix('torch.')}; {kind} tolerance {bar:.1e})"
    )
    return 0 if check.passes(args.tolerance) else 1


if __name__ == "__main__":
    sys.exit(main())
