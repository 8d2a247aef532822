"""``sept-megatron eval-general``: general ability after SePT, with lm-eval-harness.

    sept-megatron eval-general --model runs/q7b-sept/hf_final --out eval/q7b-sept-general
    sept-megatron eval-general --model /models/Qwen2.5-Math-7B --out eval/base-general --chat-template

The paper checks that self-training on math keeps general ability with the Open LLM
Leaderboard v2 tasks of lm-eval-harness: IFEval, BBH, GPQA, MuSR and MMLU-Pro (lm-eval's
``leaderboard_*`` tasks). This runs them on an HF checkpoint (``hf_final`` of a run, or
``tools/convert_megatron_to_hf.py``'s output) through ``lm_eval.simple_evaluate`` and writes
``OUT/general.json`` (lm-eval's per-task results). lm-eval is an optional dependency: without
it the command stops at once, naming the install command.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

PAPER_TASKS = (
    "leaderboard_ifeval",
    "leaderboard_bbh",
    "leaderboard_gpqa",
    "leaderboard_musr",
    "leaderboard_mmlu_pro",
)
INSTALL = "pip install lm-eval"


def import_lm_eval():
    """lm-eval's module, or a clear error naming the install command."""
    try:
        import lm_eval
    except ImportError:
        raise SystemExit(
            "sept-megatron eval-general: lm-eval-harness is not installed; "
            f"install it with `{INSTALL}` (then rerun)"
        ) from None
    return lm_eval


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sept-megatron eval-general", description="IFEval, BBH, GPQA, MuSR, MMLU-Pro with lm-eval."
    )
    parser.add_argument("--model", required=True, type=Path, help="local HF model directory")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--tasks",
        default=",".join(PAPER_TASKS),
        help="comma-separated lm-eval tasks (default: the paper's five)",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--batch-size", default="auto", help="lm-eval batch size (default auto)")
    parser.add_argument("--device", default=None, help="default: lm-eval's (cuda when present)")
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="apply the tokenizer's chat template, few-shot as multi-turn "
        "(the leaderboard's setting for chat models)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="first N examples per task (a smoke test; not comparable)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.model / "config.json").is_file():
        raise SystemExit(
            f"sept-megatron eval-general: --model {args.model}: no config.json; "
            "give a local HF checkpoint (a run's hf_final, or "
            "tools/convert_megatron_to_hf.py's output)"
        )
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise SystemExit("sept-megatron eval-general: --tasks is empty")
    lm_eval = import_lm_eval()  # after the cheap checks, before any model is loaded
    kwargs = {
        "model": "hf",
        "model_args": f"pretrained={args.model},dtype={args.dtype}",
        "tasks": tasks,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "apply_chat_template": args.chat_template,
        "fewshot_as_multiturn": args.chat_template,
    }
    if args.device:
        kwargs["device"] = args.device
    results = lm_eval.simple_evaluate(**kwargs)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"model": str(args.model), "tasks": tasks, "results": results["results"]}
    (args.out / "general.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"results: {args.out / 'general.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
