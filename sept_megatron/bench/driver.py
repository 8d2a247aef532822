"""Runs the selected benchmarks and prints one JSON line each (``main``)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable

from sept_megatron.bench.checkpoint import bench_checkpoint
from sept_megatron.bench.common import Inputs, prepare_inputs
from sept_megatron.bench.engine import bench_engine
from sept_megatron.bench.options import BenchError, BenchOptions, parse_options
from sept_megatron.bench.rounds import bench_round
from sept_megatron.bench.sync import bench_sync, run_sync_worker
from sept_megatron.bench.train import bench_train

NEEDS_PROCESS_GROUP = ("train", "checkpoint")

RUNNERS: dict[str, Callable[[BenchOptions, Inputs], dict]] = {
    "train": bench_train,
    "engine": bench_engine,
    "sync": bench_sync,
    "checkpoint": bench_checkpoint,
    "round": bench_round,
}


# --- driver ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _work_dir(opts: BenchOptions):
    if opts.work_dir:
        os.makedirs(opts.work_dir, exist_ok=True)
        yield os.path.abspath(opts.work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="sept-bench-") as tmp:
        yield tmp


def run_benchmarks(opts: BenchOptions, emit: Callable[[dict], None]) -> None:
    """Run the selected benchmarks in order, emitting each result as soon as it is known."""
    from sept_megatron.runtime import distributed

    with _work_dir(opts) as work_dir:
        inputs = prepare_inputs(opts, work_dir)
        if any(name in opts.only for name in NEEDS_PROCESS_GROUP):
            # A world of one, as `sept-megatron train` on one device; `round` (last) reuses it.
            distributed.initialize(tensor_parallel=1, pipeline_parallel=1, device=opts.device)
        try:
            for name in opts.only:
                started = time.perf_counter()
                result = RUNNERS[name](opts, inputs)
                result["bench_wall_s"] = time.perf_counter() - started
                emit(result)
        finally:
            distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts, args = parse_options(argv)
        if args.sync_worker is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise BenchError(
                "run `sept-megatron bench` as one plain process: it launches "
                "torchrun itself for the TP sync benchmark (--sync-tp)"
            )
    except BenchError as exc:
        print(f"sept-megatron bench: error: {exc}", file=sys.stderr)
        return 2
    if args.sync_worker is not None:
        from sept_megatron.runtime import distributed

        run_sync_worker(opts, *args.sync_worker)
        distributed.shutdown()
        return 0
    stdout = sys.stdout

    def emit(result: dict) -> None:
        stdout.write(json.dumps(result) + "\n")
        stdout.flush()

    # Libraries print to stdout; only the JSON lines belong there.
    with contextlib.redirect_stdout(sys.stderr):
        run_benchmarks(opts, emit)
    return 0
