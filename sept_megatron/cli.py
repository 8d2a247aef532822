"""``sept-megatron``: the command line.

    sept-megatron train --config X.yaml [key=value ...]     # under torchrun / srun for N > 1
    sept-megatron eval --model HF_OR_CKPT --benchmarks ... --out DIR
    sept-megatron demo [--out DIR] [--seed S] [--ablations]
    sept-megatron bench [--shape tiny|small|1.5b] [--only train,engine,sync,checkpoint,round] ...
    sept-megatron config [--config X.yaml] [--world-size N] [--hf-config PATH] [key=value ...]
        # train's start-up checks: every problem at once (exit 2), else the resolved tree
    sept-megatron plan --config X.yaml --nodes N --gpus-per-node G --gpu-mem-gb M [--hf-config PATH]
    sept-megatron paper-table BASE_SWEEP [NAME=]SWEEP ...  # the paper's Table 1/4/5 layout
    sept-megatron eval-general --model HF_DIR --out DIR    # IFEval/BBH/GPQA/MuSR/MMLU-Pro (lm-eval)
    sept-megatron checkpoint verify DIR                     # one checkpoint or a run's; 1 on damage

Errors in the config or the data are printed as one clear message (exit code 2) before any
process group, model or accelerator is touched. A fault during training that stops the run
(a failed save, a damaged checkpoint, non-finite training, a dead engine) is one message, exit
code 1.
"""

from __future__ import annotations

import argparse
import sys

import yaml


def _train(argv: list[str]) -> int:
    from sept_megatron.runtime import preemption

    preemption.install()  # first: a SIGUSR1 during the slow imports must not end the rank
    from sept_megatron.config import load_config
    from sept_megatron.loop.driver import run

    args = build_train_parser().parse_args(argv)
    try:
        run(load_config(args.config, args.overrides))
    except preemption.Preempted as stopped:
        print(f"sept-megatron train: {stopped}", file=sys.stderr)
        return preemption.EXIT_PREEMPTED
    except _run_faults() as fault:
        print(f"sept-megatron train: error: {fault}", file=sys.stderr)
        return 1
    return 0


def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sept-megatron train", description="Run SePT rounds (launch with torchrun for N > 1)."
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=2e-7")
    return parser


def build_config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sept-megatron config",
        description="Print the resolved config tree after train's start-up checks (exit 2 with "
        "every problem listed when any fails).",
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks the job will run on (default: tensor_parallel x pipeline_parallel, i.e. DP = 1)",
    )
    parser.add_argument(
        "--hf-config",
        help="config.json (or its dir) to check the model's shapes against instead of model.hf_path's",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=2e-7")
    return parser


def build_subcommand_parser(name: str) -> argparse.ArgumentParser:
    """A subcommand's argument parser, built without running anything (the docs test checks
    every documented command against these)."""
    import importlib

    own = {"train": build_train_parser, "config": build_config_parser}
    if name in own:
        return own[name]()
    modules = {
        "eval": "sept_megatron.eval.cli",
        "demo": "sept_megatron.demo.cli",
        "bench": "sept_megatron.bench.options",
        "plan": "sept_megatron.plan.planner",
        "paper-table": "sept_megatron.eval.paper_table",
        "eval-general": "sept_megatron.eval.general",
        "checkpoint": "sept_megatron.trainer.integrity",
    }
    return importlib.import_module(modules[name]).build_parser()


def _run_faults() -> tuple[type[BaseException], ...]:
    """Faults that stop a run with their own clear message (no traceback)."""
    from sept_megatron.rollout.watchdog import EngineDied
    from sept_megatron.trainer.integrity import CheckpointDamaged, CheckpointSaveFailed
    from sept_megatron.trainer.sft import NonFiniteTraining

    return CheckpointDamaged, CheckpointSaveFailed, NonFiniteTraining, EngineDied


def _checkpoint(argv: list[str]) -> int:
    if not argv or argv[0] != "verify":
        print("usage: sept-megatron checkpoint verify DIR", file=sys.stderr)
        return 2
    from sept_megatron.trainer.integrity import verify_main

    return verify_main(argv[1:])


def _show_config(argv: list[str]) -> int:
    from sept_megatron.config import load_config
    from sept_megatron.loop.startup import check_run

    args = build_config_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    world = max(1, args.world_size or cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)
    check_run(cfg, world, args.hf_config)  # exactly train's checks before start-up
    print(f"# validated at world size {world}")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def _eval(argv: list[str]) -> int:
    from sept_megatron.eval.cli import main as eval_main

    return eval_main(argv)


def _demo(argv: list[str]) -> int:
    from sept_megatron.demo.cli import main as demo_main

    return demo_main(argv)


def _bench(argv: list[str]) -> int:
    from sept_megatron.bench import main as bench_main

    return bench_main(argv)


def _plan(argv: list[str]) -> int:
    from sept_megatron.plan.planner import main as plan_main

    return plan_main(argv)


def _paper_table(argv: list[str]) -> int:
    from sept_megatron.eval.paper_table import main as table_main

    return table_main(argv)


def _eval_general(argv: list[str]) -> int:
    from sept_megatron.eval.general import main as general_main

    return general_main(argv)


COMMANDS = {
    "train": _train,
    "eval": _eval,
    "demo": _demo,
    "bench": _bench,
    "config": _show_config,
    "plan": _plan,
    "paper-table": _paper_table,
    "eval-general": _eval_general,
    "checkpoint": _checkpoint,
}


def main(argv: list[str] | None = None) -> int:
    from sept_megatron.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, FileNotFoundError) as exc:
        print(f"sept-megatron {argv[0]}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
