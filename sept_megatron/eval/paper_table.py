"""``sept-megatron paper-table``: the paper's results tables (Table 1/4/5) from evaluation sweeps.

    sept-megatron paper-table runs/sweep_base runs/sweep_sept offline=runs/sweep_offline
    sept-megatron paper-table --temperature 1.0 base=eval/base sept=eval/q7b-sept --out table.md

Each RUN_DIR holds the ``results.json`` of a temperature sweep (``sept-megatron eval --out``,
the demo's ``sweep_*`` folders). The first is the baseline, the base model at its best swept
temperature (the paper's baseline); every other row is read at ``--temperature`` (default 1.0,
the temperature the paper evaluates trained models at). Columns: pass@1, pass@8, pass@32
averaged over the benchmarks, and AVG (their mean), in percent, with each method's difference
to the baseline in parentheses. ``NAME=DIR`` names a row (default: the folder's name).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .metrics import AVG_KS
from .sweep import temperature_label

COLUMNS = tuple(f"pass@{k}" for k in AVG_KS) + ("AVG",)


@dataclass(frozen=True)
class Row:
    """One method's line: its scores (fractions) at one temperature of its sweep."""

    name: str
    temperature: float
    scores: dict[str, float | None]


def read_row(name: str, run_dir: Path, temperature: float | None) -> Row:
    """The row of ``run_dir``'s sweep at ``temperature`` (None: the sweep's best)."""
    path = run_dir / "results.json"
    if not path.is_file():
        raise ValueError(
            f"{run_dir}: no results.json (give the --out folder of `sept-megatron "
            "eval`, or a demo's sweep_* folder)"
        )
    summary = json.loads(path.read_text())
    chosen = summary["best_temperature"] if temperature is None else temperature
    label = temperature_label(chosen)
    if label not in summary["avg"]:
        swept = ", ".join(temperature_label(t) for t in summary["temperatures"])
        raise ValueError(
            f"{run_dir}: temperature {label} was not swept (swept: {swept}); pass --temperature one of those"
        )
    mean = summary["mean"][label]
    scores = {f"pass@{k}": mean.get(f"pass@{k}") for k in AVG_KS}
    scores["AVG"] = summary["avg"][label]
    return Row(name, float(chosen), scores)


def _cell(value: float | None, baseline: float | None) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:.1f}"
    if baseline is not None:
        text += f" ({100 * (value - baseline):+.1f})"
    return text


def render(rows: Sequence[Row]) -> str:
    """Markdown: the baseline first, then each method with its difference to the baseline."""
    base = rows[0]
    lines = ["| method | T | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for index, row in enumerate(rows):
        name = f"{row.name} (baseline, best T)" if index == 0 else row.name
        cells = [_cell(row.scores[c], None if index == 0 else base.scores[c]) for c in COLUMNS]
        lines.append(f"| {name} | {row.temperature:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _named(spec: str) -> tuple[str, Path]:
    name, sep, folder = spec.partition("=")
    if not sep:
        return Path(spec).name, Path(spec)
    if not name or not folder:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=DIR or DIR")
    return name, Path(folder)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sept-megatron paper-table",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "runs",
        nargs="+",
        type=_named,
        metavar="RUN_DIR",
        help="sweep folders ([NAME=]DIR); the first is the baseline",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="temperature of every row but the baseline's (default 1.0)",
    )
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = [
            read_row(name, folder, None if index == 0 else args.temperature)
            for index, (name, folder) in enumerate(args.runs)
        ]
    except (ValueError, KeyError, json.JSONDecodeError) as error:
        print(f"sept-megatron paper-table: error: {error}", file=sys.stderr)
        return 2
    table = render(rows)
    print(table, end="")
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
