"""Evaluation: grading, pass@k metrics and the temperature sweep.

The sweep (and with it torch, via the rollout interface) is imported on first use, so that
``sept_megatron.eval.grading`` stays cheap to import, e.g. in the spawned grading process.
"""

from __future__ import annotations

from typing import Any

from .grading import extract_last_boxed, is_correct
from .metrics import AVG_KS, KS, avg_score, benchmark_metrics, pass_at_k

_LAZY = {"run_sweep", "evaluate_once", "CellResult"}

__all__ = [
    "AVG_KS",
    "KS",
    "CellResult",
    "avg_score",
    "benchmark_metrics",
    "evaluate_once",
    "extract_last_boxed",
    "is_correct",
    "pass_at_k",
    "run_sweep",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
