"""``sept-megatron demo``: the embedded SePT experiment on this CPU, or the schedule search.

    sept-megatron demo [--out DIR] [--seed S | --seeds 0,1,2] [--ablations]
    sept-megatron demo --search [--out DIR] [--jobs 2]

The experiment is :mod:`sept_megatron.demo.run`, the search :mod:`sept_megatron.demo.search`;
this module only reads the command line and hands it to one of them.
"""

from __future__ import annotations

import argparse

from sept_megatron.demo.run import run_demo, run_seeds
from sept_megatron.demo.search import run_search


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds={text!r}: expected integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds={text!r}: give distinct integers, e.g. 0,1,2")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sept-megatron demo",
        description="The embedded SePT experiment on this CPU (base model, baseline sweep, SePT, report), or the schedule search.",
    )
    parser.add_argument(
        "--out", default=None, help="output directory (default runs/demo, or runs/demo-search with --search)"
    )
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="one seed (default 0), written to --out")
    seeds.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        help="several seeds, e.g. 0,1,2: --out/seed-S each, plus summary.{md,json,png}",
    )
    parser.add_argument("--ablations", action="store_true", help="also run offline, coupled, EM-FT and GRPO")
    parser.add_argument(
        "--search",
        action="store_true",
        help="search the SePT schedule on the validation split instead (see "
        "sept_megatron/demo/search.py); writes search.{md,csv,json}",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="--search only: schedules run side by side, one process each (the table does not depend on it)",
    )
    parser.add_argument("--cache-dir", default=None, help="base-model cache (default ~/.cache/sept_megatron)")
    parser.add_argument("--wandb", default="offline", choices=("online", "offline", "disabled"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.search:
        if args.seed is not None or args.seeds is not None or args.ablations:
            parser.error(
                "--search takes no --seed/--seeds/--ablations: its seeds are part of "
                "SearchBudget, so the same command gives the same table"
            )
        run_search(args.out or "runs/demo-search", cache_dir=args.cache_dir, jobs=args.jobs)
    elif args.seeds is not None and len(args.seeds) > 1:
        run_seeds(
            args.out or "runs/demo",
            args.seeds,
            args.ablations,
            cache_dir=args.cache_dir,
            wandb_mode=args.wandb,
        )
    else:
        seed = args.seeds[0] if args.seeds else (args.seed or 0)
        run_demo(
            args.out or "runs/demo", seed, args.ablations, cache_dir=args.cache_dir, wandb_mode=args.wandb
        )
    return 0
