"""Grading throughput: one process against a :class:`GradingPool` of ``--workers`` processes.

    python tools/measure_grading.py --benchmarks ../shared/data/benchmarks --workers 2 [--limit N]

Responses are built from every ground truth of the benchmark files: the boxed truth itself, a
perturbed (wrong) truth, and both again inside ``\\left( \\right)`` and with a trailing
``.0``-style rewrite where the truth is a number; all (response, truth) pairs are distinct, so
no cache helps either side. Prints one JSON line: gradings/s in one process and in the pool
(all pairs, the pool's start-up included; and the second half alone, once the workers are up),
the speed-ups, and whether every grade agreed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path


def responses_for(truths: list[str]) -> tuple[list[str], list[str]]:
    responses, targets = [], []
    for truth in truths:
        bare = truth.strip().strip("$").strip().rstrip(".")
        digit = re.search(r"\d", bare)
        wrong = (
            (bare[: digit.start()] + str((int(bare[digit.start()]) + 1) % 10) + bare[digit.start() + 1 :])
            if digit
            else bare + "+1"
        )
        for answer in (bare, wrong, rf"\left({bare}\right)", rf"\left({wrong}\right)"):
            responses.append(f"Working it out step by step, the answer is \\boxed{{{answer}}}.")
            targets.append(truth)
    return responses, targets


def _timed_halves(grader, responses, targets, half):
    grades, times = [], []
    for part in (slice(0, half), slice(half, None)):
        started = time.perf_counter()
        grades += grader.grade(responses[part], targets[part])
        times.append(time.perf_counter() - started)
    return grades, times


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks", type=Path, required=True, help="directory of .parquet files")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="grade only this many responses (spread evenly over all of them)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    import pandas as pd

    from sept_megatron.eval import grading
    from sept_megatron.eval.grading import GradingPool

    truths = []
    for path in sorted(args.benchmarks.glob("*.parquet")):
        truths += [row["ground_truth"] for row in pd.read_parquet(path)["reward_model"]]
    responses, targets = responses_for(truths)
    if args.limit and args.limit < len(responses):
        step = len(responses) / args.limit
        keep = [int(i * step) for i in range(args.limit)]
        responses, targets = [responses[i] for i in keep], [targets[i] for i in keep]
    grading._warm_up_child()  # both sides start with math_verify imported

    half = len(responses) // 2  # the second half is timed once the workers are up
    grading.grade_answer.cache_clear()
    with GradingPool(0) as one:
        single, single_times = _timed_halves(one, responses, targets, half)
    with GradingPool(args.workers) as pool:
        pooled, pool_times = _timed_halves(pool, responses, targets, half)
    count = len(responses)
    print(
        json.dumps(
            {
                "gradings": count,
                "workers": args.workers,
                "agree": pooled == single,
                "disagreements": sum(a != b for a, b in zip(pooled, single)),
                "correct": sum(single),
                "one_process_per_s": count / sum(single_times),
                "pool_per_s_with_startup": count / sum(pool_times),
                "speedup_with_startup": sum(single_times) / sum(pool_times),
                "one_process_warm_per_s": (count - half) / single_times[1],
                "pool_warm_per_s": (count - half) / pool_times[1],
                "speedup_warm": single_times[1] / pool_times[1],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
