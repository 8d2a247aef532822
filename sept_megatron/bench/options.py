"""The bench's command line: shapes, flags, and their checks before anything is built."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import torch

BENCHMARKS = ("train", "engine", "sync", "checkpoint", "round")


class BenchError(ValueError):
    """A bad flag: the message names it and the fix."""


@dataclass(frozen=True)
class Shape:
    """A Qwen2 architecture plus the bench defaults that suit it."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int | None  # None: the demo tokenizer's own size
    max_positions: int
    seq_len: int
    micro_batch: int
    gen_batch: int
    gen_new_tokens: int
    round_prompts: int
    needs_gpu: bool


TINY = Shape(
    hidden=128,
    layers=4,
    heads=4,
    kv_heads=2,
    ffn=512,
    vocab=None,
    max_positions=1024,
    seq_len=128,
    micro_batch=4,
    gen_batch=16,
    gen_new_tokens=32,
    round_prompts=16,
    needs_gpu=False,
)

SHAPES = {
    "tiny": TINY,
    # CPU, 124 MB of fp32 weights: big enough that a sync moves bytes rather than waits on
    # per-tensor and per-collective latency (tools/measure_sync.py's default shape); the
    # workload (sequence, batches, rounds) is the tiny one's.
    "small": replace(TINY, hidden=512, layers=8, heads=8, ffn=2048),
    # The shape of issue 8 (a Qwen2.5-1.5B-like model with a 1024-piece vocabulary).
    "1.5b": Shape(
        hidden=1536,
        layers=28,
        heads=12,
        kv_heads=2,
        ffn=8960,
        vocab=1024,
        max_positions=4096,
        seq_len=1024,
        micro_batch=16,
        gen_batch=64,
        gen_new_tokens=256,
        round_prompts=64,
        needs_gpu=True,
    ),
}


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """The validated command line (defaults filled in from the shape)."""

    shape: str
    only: tuple[str, ...]
    device: str  # "cpu" or "cuda", resolved
    seq_len: int
    micro_batch: int
    steps: int
    warmup: int
    repeats: int
    sync_tp: int
    rounds: int
    gen_batch: int
    gen_new_tokens: int
    round_prompts: int
    async_checkpoint: bool
    find_max_micro_batch: bool
    work_dir: str | None
    wandb_mode: str = "disabled"  # the round benchmark's logging.wandb_mode


# --- flags ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sept-megatron bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", choices=tuple(SHAPES), help="model shape (default tiny)")
    p.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}"
    )
    p.add_argument("--device", default="auto", help="auto (SEPT_DEVICE, then the GPU), cpu, cuda")
    p.add_argument("--seq-len", type=int, help="training sequence length (tiny and small 128, 1.5b 1024)")
    p.add_argument("--micro-batch", type=int, help="training micro-batch (tiny and small 4, 1.5b 16)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of generate/sync/save")
    p.add_argument(
        "--sync-tp",
        type=int,
        help="tensor parallel size of the sync benchmark (CPU default 2, GPU default min(2, visible GPUs))",
    )
    p.add_argument("--rounds", type=int, default=3, help="SePT rounds of the round benchmark")
    p.add_argument("--gen-batch", type=int, help="prompts per generate call (engine, round)")
    p.add_argument("--gen-new-tokens", type=int, help="new tokens per answer (engine, round)")
    p.add_argument("--round-prompts", type=int, help="prompts per SePT round")
    p.add_argument(
        "--async-checkpoint",
        default="false",
        help="checkpoint.async_save in the round benchmark: true or false "
        "(default false, the config's default)",
    )
    p.add_argument(
        "--wandb-mode",
        default="disabled",
        choices=("disabled", "offline"),
        help="logging.wandb_mode of the round benchmark (default disabled); offline "
        "logs the whole dashboard as configured by default (a samples table every "
        "10 rounds): its cost is the difference",
    )
    p.add_argument(
        "--no-max-micro-batch",
        action="store_true",
        help="skip the GPU search for the largest micro-batch that fits",
    )
    p.add_argument(
        "--work-dir",
        help="keep the generated model, data and runs here "
        "(default: a temporary directory, removed at the end)",
    )
    # Internal: one rank of the torchrun launch of the sync benchmark.
    p.add_argument("--sync-worker", nargs=2, metavar=("HF_DIR", "RESULT_JSON"), help=argparse.SUPPRESS)
    return p


def parse_options(argv: list[str]) -> tuple[BenchOptions, argparse.Namespace]:
    """Parse and check every flag; raises :class:`BenchError` before anything is built."""
    args = build_parser().parse_args(argv)  # argparse refuses an unknown --shape (exit 2)
    shape = SHAPES[args.shape]
    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = [name for name in only if name not in BENCHMARKS]
    if unknown or not only:
        raise BenchError(
            f"--only {args.only!r}: {', '.join(unknown) or 'empty'} is not a "
            f"benchmark; choose from {','.join(BENCHMARKS)}"
        )
    device = _resolve_device(args.device)
    if shape.needs_gpu and device != "cuda":
        raise BenchError(
            f"--shape {args.shape} needs a GPU (device resolved to {device}); use "
            "--shape tiny or small on a CPU"
        )
    opts = BenchOptions(
        shape=args.shape,
        only=tuple(b for b in BENCHMARKS if b in only),
        device=device,
        seq_len=_or(args.seq_len, shape.seq_len),
        micro_batch=_or(args.micro_batch, shape.micro_batch),
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        sync_tp=_or(args.sync_tp, _default_sync_tp(device)),
        rounds=args.rounds,
        gen_batch=_or(args.gen_batch, shape.gen_batch),
        gen_new_tokens=_or(args.gen_new_tokens, shape.gen_new_tokens),
        round_prompts=_or(args.round_prompts, shape.round_prompts),
        async_checkpoint=_parse_bool("--async-checkpoint", args.async_checkpoint),
        find_max_micro_batch=not args.no_max_micro_batch,
        work_dir=args.work_dir,
        wandb_mode=args.wandb_mode,
    )
    _check_numbers(opts, shape)
    return opts, args


def _or(value, default):
    return default if value is None else value


def _resolve_device(setting: str) -> str:
    from sept_megatron.runtime.distributed import resolve_device

    try:
        return resolve_device(setting)
    except ValueError as exc:
        raise BenchError(f"--device {setting!r}: {exc}") from None


def _default_sync_tp(device: str) -> int:
    return 2 if device == "cpu" else max(1, min(2, torch.cuda.device_count()))


def _parse_bool(flag: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise BenchError(f"{flag} {value!r}: expected true or false")


def _check_numbers(opts: BenchOptions, shape: Shape) -> None:
    errors = []
    for flag, value, low in (
        ("--micro-batch", opts.micro_batch, 1),
        ("--steps", opts.steps, 1),
        ("--warmup", opts.warmup, 0),
        ("--repeats", opts.repeats, 1),
        ("--sync-tp", opts.sync_tp, 1),
        ("--rounds", opts.rounds, 2),
        ("--gen-batch", opts.gen_batch, 1),
        ("--gen-new-tokens", opts.gen_new_tokens, 1),
        ("--round-prompts", opts.round_prompts, 2),
    ):
        if value < low:
            errors.append(
                f"{flag} {value}: must be >= {low}"
                + (" (round 1 is warm-up and not counted)" if flag == "--rounds" else "")
            )
    if opts.seq_len < 16 or opts.seq_len % 16 or opts.seq_len > shape.max_positions:
        errors.append(
            f"--seq-len {opts.seq_len}: must be a multiple of 16 in [16, "
            f"{shape.max_positions}] (the trainer pads to multiples of 8, 16 for FP8)"
        )
    if shape.heads % opts.sync_tp or shape.kv_heads % opts.sync_tp:
        errors.append(
            f"--sync-tp {opts.sync_tp}: must divide the {opts.shape} shape's "
            f"{shape.heads} heads and {shape.kv_heads} KV heads"
        )
    if opts.device == "cuda" and opts.sync_tp > torch.cuda.device_count() and "sync" in opts.only:
        errors.append(
            f"--sync-tp {opts.sync_tp}: only {torch.cuda.device_count()} GPU(s) visible; use --sync-tp 1"
        )
    if opts.round_prompts % 2:
        errors.append(f"--round-prompts {opts.round_prompts}: must be even (two optimizer steps per round)")
    if opts.gen_new_tokens + 64 > shape.max_positions:
        errors.append(
            f"--gen-new-tokens {opts.gen_new_tokens}: prompt + answer must fit the "
            f"shape's {shape.max_positions} positions"
        )
    if errors:
        raise BenchError("\n  ".join(errors))
