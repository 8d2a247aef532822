"""A finished temperature sweep on the W&B dashboard, through the run logger.

What a reader sees (every panel built from the sweep's ``results.json`` summary, so the
dashboard and the files cannot disagree):

- ``eval/pass_at_k``: a table, one row per benchmark x temperature, with every pass@k the
  cell has, its mean response length and its truncated fraction;
- ``eval/curves``: W&B line chart of the benchmark-mean pass@1, pass@8, pass@32 and AVG
  against temperature (the paper's main figure), and ``eval/pass@<k>_by_benchmark``: pass@k
  against temperature, one line per benchmark;
- ``eval/sweep``: the PNG the sweep draws (``sweep.png``);
- summary values ``eval/best_temperature`` and ``eval/best_avg`` (the baseline), and
  ``eval/avg_at_T<label>`` for every temperature, to compare runs of one group side by side.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .metrics import AVG_KS, KS
from .sweep import temperature_label

TABLE_TAIL = ("mean_response_tokens", "truncated_fraction")


def sweep_table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the benchmark x temperature x pass@k table (None: no such k)."""
    ks = [
        k
        for k in KS
        if any(f"pass@{k}" in cell for cells in summary["cells"].values() for cell in cells.values())
    ]
    columns = ["benchmark", "temperature", *(f"pass@{k}" for k in ks), *TABLE_TAIL]
    rows = []
    for benchmark in summary["benchmarks"]:
        for temperature in summary["temperatures"]:
            cell = summary["cells"][benchmark][temperature_label(temperature)]
            rows.append(
                [
                    benchmark,
                    float(temperature),
                    *(cell.get(f"pass@{k}") for k in ks),
                    *(cell[name] for name in TABLE_TAIL),
                ]
            )
    return columns, rows


def sweep_curves(summary: Mapping[str, Any]) -> dict[str, list[float | None]]:
    """Benchmark-mean pass@1/8/32 and AVG per temperature (None where a k is missing)."""
    labels = [temperature_label(t) for t in summary["temperatures"]]
    curves = {f"mean pass@{k}": [summary["mean"][label].get(f"pass@{k}") for label in labels] for k in AVG_KS}
    curves = {name: values for name, values in curves.items() if any(v is not None for v in values)}
    curves["AVG"] = [summary["avg"][label] for label in labels]
    return curves


def log_sweep(logger, summary: Mapping[str, Any], png_path: str | Path | None = None) -> None:
    """Send one sweep's table, charts, PNG and best temperature to ``logger`` (a
    :class:`~sept_megatron.logging.RunLogger`; a no-op logger on non-zero ranks)."""
    temperatures = [float(t) for t in summary["temperatures"]]
    columns, rows = sweep_table(summary)
    logger.log_table("eval/pass_at_k", columns, rows)
    logger.log_line_plot(
        "eval/curves",
        temperatures,
        sweep_curves(summary),
        title="pass@k and AVG against temperature",
        x_label="temperature",
    )
    labels = [temperature_label(t) for t in temperatures]
    for k in AVG_KS:
        by_benchmark = {
            name: [summary["cells"][name][label].get(f"pass@{k}") for label in labels]
            for name in summary["benchmarks"]
        }
        if any(v is not None for values in by_benchmark.values() for v in values):
            logger.log_line_plot(
                f"eval/pass@{k}_by_benchmark",
                temperatures,
                by_benchmark,
                title=f"pass@{k} against temperature",
                x_label="temperature",
            )
    if png_path is not None and Path(png_path).is_file():
        logger.log_image("eval/sweep", str(png_path), caption="temperature sweep (sweep.png)")
    logger.set_summary(
        {
            "eval/best_temperature": float(summary["best_temperature"]),
            "eval/best_avg": summary["best_avg"],
            **{f"eval/avg_at_T{label}": summary["avg"][label] for label in labels},
        }
    )
