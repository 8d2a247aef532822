"""``sept-megatron eval``: the temperature sweep that picks the baseline temperature.

Launch::

    sept-megatron eval --model /ckpts/Qwen2.5-Math-7B --benchmarks /data/benchmarks \\
        --n 32 --out runs/sweep_base   # --temperatures 0.0,0.1,...,1.6 by default
    python -m sept_megatron.eval.cli --model runs/sept/checkpoints --benchmarks a.parquet,b.jsonl ...

``--model`` is a local HF directory or a sept_megatron (Megatron) checkpoint directory, which
is first exported to ``<out>/hf_model``. Every argument is checked, and the benchmark files
loaded, before the model is: a typo fails in a second, not after a model load. Re-running with
the same ``--out`` resumes, skipping the (benchmark, temperature) cells already finished.

On several GPUs (or CPU processes), launch it under torchrun: every rank hosts an engine
(groups of ``--engine-tp`` ranks), the questions are spread over all engines, and rank 0
grades (``--grading-workers`` processes) and writes the files; the results equal a
one-process run's::

    torchrun --nproc-per-node=8 -m sept_megatron.cli eval --model ... --benchmarks ... \\
        --samples 32 --out ...   # --samples: torchrun takes --n for one of its own flags
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import RolloutConfig
from ..data import TEMPLATES, Question, load_questions
from ..rollout.registry import backend_class, backend_names
from .grading import default_grading_workers

logger = logging.getLogger(__name__)

# The reference's grid (base_model_sweep.sh: 0.0 .. 1.6 in steps of 0.1, 17 temperatures): a
# coarser grid can miss the base model's best temperature and so understate the baseline.
DEFAULT_TEMPERATURES = ",".join(f"{i / 10:.1f}" for i in range(17))
MEGATRON_MARKERS = ("sept_megatron_ckpt.json", "latest")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True)
class EvalArgs:
    """The validated command line."""

    model: str
    benchmark_files: list[Path]
    temperatures: list[float]
    n: int
    out: Path
    max_questions: int | None
    max_new_tokens: int
    template: str
    backend: str
    seed: int
    batch_size: int | None
    device: str
    dtype: str
    grading_workers: int
    engine_tp: int
    wandb_mode: str = "disabled"
    wandb_project: str = "sept_megatron"
    wandb_group: str | None = None  # None: the --out directory's name
    wandb_job_type: str = "eval"
    run_name: str | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sept-megatron eval",
        description="Temperature sweep over math benchmarks; the best AVG is the baseline.",
    )
    parser.add_argument(
        "--model", required=True, help="local HF model directory, or a sept_megatron checkpoint directory"
    )
    parser.add_argument(
        "--benchmarks",
        required=True,
        type=_path_list,
        help="comma-separated .parquet/.jsonl files, or a directory of them",
    )
    parser.add_argument(
        "--temperatures",
        default=DEFAULT_TEMPERATURES,
        type=_temperature_list,
        help="comma-separated, >= 0; 0 = greedy (default 0.0,0.1,...,1.6: the reference's 17-point grid)",
    )
    # --samples: torchrun's own argument parser refuses "--n" (a prefix of --nnodes, ...).
    parser.add_argument(
        "--n",
        "--samples",
        dest="n",
        type=int,
        default=32,
        help="samples per question (default 32; --samples under torchrun)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (resumable)")
    parser.add_argument(
        "--max-questions",
        type=int,
        default=None,
        help="evaluate only the first N questions of each benchmark",
    )
    parser.add_argument("--max-new-tokens", type=int, default=3072)
    parser.add_argument(
        "--template",
        default="auto",
        choices=list(TEMPLATES),
        help="prompt format (default: the tokenizer's chat template)",
    )
    parser.add_argument(
        "--backend",
        default="hf",
        choices=backend_names(),
        help="rollout engine (default hf; see sept_megatron.rollout.registry)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences per generation batch (engine default if unset)",
    )
    parser.add_argument(
        "--device", default=None, help="default: cuda if available (or $SEPT_DEVICE), else cpu"
    )
    parser.add_argument(
        "--dtype", default=None, choices=DTYPES, help="default: bfloat16 on cuda, float32 on cpu"
    )
    parser.add_argument(
        "--grading-workers",
        type=int,
        default=None,
        help="grading processes on rank 0; 0 grades in-process (default: one per core, at most 8)",
    )
    parser.add_argument(
        "--engine-tp",
        type=int,
        default=1,
        help="ranks per engine under torchrun (the backend's own check says which sizes it runs)",
    )
    wandb = parser.add_argument_group("W&B (rank 0 logs the finished sweep: table, charts, PNG)")
    wandb.add_argument("--wandb-mode", default="disabled", choices=("online", "offline", "disabled"))
    wandb.add_argument("--wandb-project", default="sept_megatron")
    wandb.add_argument(
        "--wandb-group",
        default=None,
        help="the experiment's group: the training run's logging.wandb_group "
        "(default: its run directory's name); default here: --out's name",
    )
    wandb.add_argument(
        "--wandb-job-type",
        default="eval",
        help="e.g. eval-base for the base sweep, eval-final after training",
    )
    wandb.add_argument("--run-name", default=None, help="W&B run name (default: W&B's)")
    return parser


def _temperature_list(text: str) -> list[float]:
    temperatures = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item.strip()!r} is not a number; give comma-separated temperatures >= 0, e.g. 0,0.6,1.0"
            ) from None
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(
                f"temperature {item.strip()} is invalid; temperatures must be finite and >= 0 (0 = greedy)"
            )
        temperatures.append(value)
    if len(set(temperatures)) != len(temperatures):
        raise argparse.ArgumentTypeError(f"temperatures repeat: {text}")
    return temperatures


def _path_list(text: str) -> list[Path]:
    """Files named in a comma list, or the .parquet/.jsonl files of one directory."""
    if Path(text).is_dir():
        files = sorted(p for p in Path(text).iterdir() if p.suffix in (".parquet", ".jsonl"))
        if not files:
            raise argparse.ArgumentTypeError(f"directory {text} has no .parquet or .jsonl files")
        return files
    files = [Path(item.strip()) for item in text.split(",") if item.strip()]
    for path in files:
        if not path.is_file():
            raise argparse.ArgumentTypeError(
                f"no such file: {path} (give existing .parquet/.jsonl files or a directory)"
            )
    return files


def parse_args(argv: Sequence[str] | None = None) -> EvalArgs:
    """Parse and validate; errors exit with a message naming the flag and the fix."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.n < 1:
        parser.error(f"argument --n: must be >= 1, got {ns.n}")
    if ns.max_new_tokens < 1:
        parser.error(f"argument --max-new-tokens: must be >= 1, got {ns.max_new_tokens}")
    if ns.max_questions is not None and ns.max_questions < 1:
        parser.error(f"argument --max-questions: must be >= 1 (omit it for all), got {ns.max_questions}")
    if ns.batch_size is not None and ns.batch_size < 1:
        parser.error(f"argument --batch-size: must be >= 1, got {ns.batch_size}")
    if ns.grading_workers is not None and ns.grading_workers < 0:
        parser.error(
            f"argument --grading-workers: must be >= 0 (0 grades in-process), got {ns.grading_workers}"
        )
    if ns.engine_tp < 1:
        parser.error(f"argument --engine-tp: must be >= 1, got {ns.engine_tp}")
    for problem in backend_class(ns.backend).check_config(_rollout_section(ns)):
        parser.error(f"argument --backend/--engine-tp: {problem}")
    if not Path(ns.model).is_dir() and not _looks_like_hub_id(ns.model):
        parser.error(
            f"argument --model: no such directory: {ns.model} "
            "(give a local HF model directory or a sept_megatron checkpoint)"
        )
    if ns.out.exists() and not ns.out.is_dir():
        parser.error(f"argument --out: {ns.out} exists and is not a directory")
    for flag, value in (("--wandb-group", ns.wandb_group), ("--wandb-job-type", ns.wandb_job_type)):
        if value is not None and not 0 < len(value) <= 128:
            parser.error(f"argument {flag}: must be 1 to 128 characters, got {len(value)}")
    device = ns.device or _default_device()
    return EvalArgs(
        model=ns.model,
        benchmark_files=ns.benchmarks,
        temperatures=ns.temperatures,
        n=ns.n,
        out=ns.out,
        max_questions=ns.max_questions,
        max_new_tokens=ns.max_new_tokens,
        template=ns.template,
        backend=ns.backend,
        seed=ns.seed,
        batch_size=ns.batch_size,
        device=device,
        dtype=ns.dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
        grading_workers=(default_grading_workers() if ns.grading_workers is None else ns.grading_workers),
        engine_tp=ns.engine_tp,
        wandb_mode=ns.wandb_mode,
        wandb_project=ns.wandb_project,
        wandb_group=ns.wandb_group,
        wandb_job_type=ns.wandb_job_type,
        run_name=ns.run_name,
    )


def _rollout_section(ns) -> RolloutConfig:
    """The command line as the ``rollout`` config section its backend reads."""
    section = RolloutConfig(backend=ns.backend, engine_tp=ns.engine_tp)
    if ns.batch_size is not None:
        section.batch_size = ns.batch_size
    return section


def _looks_like_hub_id(model: str) -> bool:
    """``org/name`` with no local meaning: left for a backend that can download (SGLang)."""
    parts = model.split("/")
    local_looking = model.startswith((".", "~")) or Path(parts[0]).exists()
    return len(parts) == 2 and all(parts) and not local_looking


def _default_device() -> str:
    from sept_megatron.runtime.distributed import resolve_device

    return resolve_device("auto")  # honours SEPT_DEVICE (tests keep the CPU path on GPU machines)


def load_benchmarks(files: Sequence[Path], max_questions: int | None) -> dict[str, list[Question]]:
    """Benchmark name (``data_source`` or file stem) -> its first ``max_questions`` questions."""
    benchmarks: dict[str, list[Question]] = {}
    for path in files:
        questions = load_questions(path)
        name = questions[0].source
        if name in benchmarks:
            raise ValueError(f"--benchmarks: two files are both benchmark {name!r} (second: {path})")
        benchmarks[name] = questions[:max_questions]
    return benchmarks


def is_megatron_checkpoint(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in MEGATRON_MARKERS)


def resolve_model(args: EvalArgs) -> str:
    """An HF directory to load: the model itself, or its export under ``<out>/hf_model``."""
    source = Path(args.model)
    if not is_megatron_checkpoint(source):
        return args.model
    hf_dir = args.out / "hf_model"
    if (hf_dir / "config.json").is_file():
        logger.info("reusing the HF export in %s", hf_dir)
        return str(hf_dir)
    from sept_megatron.convert import export_megatron_to_hf

    logger.info("exporting Megatron checkpoint %s to %s", source, hf_dir)
    export_megatron_to_hf(str(source), str(hf_dir))
    return str(hf_dir)


def _check_same_run(args: EvalArgs) -> None:
    """Refuse to resume an ``--out`` directory that evaluated a different model."""
    record = args.out / "eval_args.json"
    identity = {"model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model}
    latest = Path(args.model) / "latest"
    if latest.is_file():
        identity["latest"] = latest.read_text().strip()
    if record.is_file():
        previous = json.loads(record.read_text()).get("identity")
        if previous != identity:
            raise SystemExit(
                f"sept-megatron eval: --out {args.out} holds a sweep of {previous}, not {identity}; "
                "use a fresh --out directory"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"identity": identity, "args": {k: str(v) for k, v in asdict(args).items()}}
    record.write_text(json.dumps(payload, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; prints where the results are and the baseline temperature."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        benchmarks = load_benchmarks(args.benchmark_files, args.max_questions)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"sept-megatron eval: argument --benchmarks: {error}") from None
    rank, device = _start_world(args.device)
    _on_rank0_then_share(lambda: _check_same_run(args))

    import torch

    from sept_megatron.rollout import backend_kwargs, build_engine
    from sept_megatron.rollout.orchestration import DataParallelEngines
    from sept_megatron.rollout.placement import build_placement

    from .sweep import run_sweep

    model_dir = _on_rank0_then_share(lambda: resolve_model(args))
    placement = build_placement(args.engine_tp)
    section = RolloutConfig(backend=args.backend, engine_tp=args.engine_tp)
    if args.batch_size is not None:
        section.batch_size = args.batch_size
    engine = build_engine(
        args.backend,
        model_dir,
        **backend_kwargs(
            section,
            tokenizer=None,
            seed=args.seed,
            device=device,
            dtype=getattr(torch, args.dtype),
            progress=rank == 0,
            placement=placement if placement.world_size > 1 else None,
        ),
    )
    summary = run_sweep(
        DataParallelEngines(placement, engine),
        engine.tokenizer,
        benchmarks,
        args.temperatures,
        args.n,
        args.out,
        max_new_tokens=args.max_new_tokens,
        template=args.template,
        seed=args.seed,
        progress=rank == 0,
        grading_workers=args.grading_workers,
    )
    if rank == 0:
        log_to_wandb(args, summary)
        print(
            f"best temperature (baseline): {summary['best_temperature']:g}  "
            f"AVG = {summary['best_avg']:.4f}\nresults: {args.out / 'results.md'}"
        )
    _end_world()
    return 0


def log_to_wandb(args: EvalArgs, summary: dict) -> None:
    """The finished sweep as one W&B run (``--wandb-mode``), in the experiment's group."""
    from sept_megatron.config import LoggingConfig
    from sept_megatron.logging import RunLogger

    from .dashboard import log_sweep

    if args.wandb_mode == "disabled":
        return
    cfg = LoggingConfig(
        run_dir=str(args.out),
        wandb_mode=args.wandb_mode,
        wandb_project=args.wandb_project,
        run_name=args.run_name,
        wandb_group=args.wandb_group or args.out.resolve().name,
        wandb_job_type=args.wandb_job_type,
        save_samples=False,
        progress=False,
    )
    logger = RunLogger(cfg, {k: str(v) for k, v in asdict(args).items()}, config_file=False)
    try:
        logger.set_summary({"eval/model": args.model, "eval/n": args.n})
        log_sweep(logger, summary, args.out / "sweep.png")
    finally:
        logger.finish()


def _start_world(device: str) -> tuple[int, str]:
    """Under torchrun: the default process group, and ``cuda:<local rank>`` for ``cuda``."""
    from sept_megatron.runtime import distributed

    env = distributed.launch_env()
    if env.world_size == 1:
        return 0, device
    on_gpu = device.startswith("cuda")
    distributed.init_world(on_gpu)
    return env.rank, (f"cuda:{env.local_rank}" if device == "cuda" else device)


def _end_world() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _on_rank0_then_share(step):
    """Run ``step`` on rank 0 only (it writes files); every rank gets its value, or the same
    ``SystemExit`` (a refusal must stop every rank, not leave them waiting)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return step()
    outcome = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [("ok", step())]
        except SystemExit as stop:
            outcome = [("exit", str(stop))]
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "exit":
        raise SystemExit(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
