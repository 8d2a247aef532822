"""The temperature sweep that picks the baseline, and the in-training validation pass.

For every (benchmark, temperature) cell the sweep renders each question's prompt, draws ``n``
samples (one greedy sample at temperature 0), grades them with :func:`is_correct` and reduces
the per-question correct counts to pass@k. The temperature with the best AVG (mean of pass@1,
pass@8 and pass@32 over benchmarks, see :mod:`.metrics`) is the baseline SePT starts from.

Layout of ``out_dir``::

    cells/<bench>_T<temp>.json       one finished cell: correct counts, pass@k, its settings
    responses/<bench>_T<temp>.jsonl  every response with its extracted answer and grade
    results.json  results.md  sweep.png

A sweep is resumable: each cell's files are written atomically (temporary file, then
``os.replace``) and the cell record last, so a cell record exists only for a finished cell,
and a re-run with the same ``out_dir`` skips those. A cell record written with different
settings (n, seed, template, questions...) is refused rather than silently mixed in.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import fmean
from typing import Any, Iterator, Mapping, Sequence

from tqdm.auto import tqdm

from ..data import Question, check_template, render_prompts
from ..rollout.base import RolloutEngine, SamplingParams
from .grading import extract_last_boxed, is_correct
from .metrics import AVG_KS, avg_ks, avg_score, benchmark_metrics

# Prompts per engine.generate call: big enough for a batched engine to stay busy, small enough
# for the progress bar to move and for one call's responses to sit comfortably in memory.
PROMPTS_PER_CALL = 256
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


@dataclass(kw_only=True)
class CellResult:
    """One finished (benchmark, temperature) cell; what ``cells/*.json`` holds."""

    benchmark: str
    temperature: float
    settings: dict[str, Any]  # what must match for a stored cell to be reused
    correct_counts: list[int]
    metrics: dict[int, float]
    mean_response_tokens: float
    truncated_fraction: float  # share of responses that hit max_new_tokens
    elapsed_s: float = 0.0
    responses: list[dict] = field(default_factory=list, repr=False)  # not stored in the cell


# ---------------------------------------------------------------------------------------------
# One cell


def sampling_for(temperature: float, n: int, max_new_tokens: int, seed: int) -> SamplingParams:
    """Temperature 0 is greedy decoding: one sample, since more would all be identical."""
    greedy = temperature == 0
    return SamplingParams(
        temperature=temperature,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        n=1 if greedy else n,
        seed=seed,
    )


def evaluate_cell(
    engine: RolloutEngine,
    questions: Sequence[Question],
    prompts: Sequence[Sequence[int]],
    sampling: SamplingParams,
    *,
    benchmark: str,
    progress: bool = False,
) -> CellResult:
    """Generate ``sampling.n`` responses per prompt, grade them, and reduce to pass@k."""
    started = time.monotonic()
    correct_counts: list[int] = []
    responses: list[dict] = []
    bar = tqdm(total=len(prompts), desc=f"{benchmark} T={temperature_label(sampling.temperature)}",
               leave=False, disable=not progress, unit="q")
    for offset, generations in _generate(engine, prompts, sampling):
        for position, samples in enumerate(generations):
            question = questions[offset + position]
            graded = [_grade(question, sample_index, g) for sample_index, g in enumerate(samples)]
            correct_counts.append(sum(record["correct"] for record in graded))
            responses.extend(graded)
        bar.update(len(generations))
    bar.close()
    return CellResult(
        benchmark=benchmark,
        temperature=sampling.temperature,
        settings={},
        correct_counts=correct_counts,
        metrics=benchmark_metrics(correct_counts, sampling.n, greedy=sampling.temperature == 0),
        mean_response_tokens=fmean(r["num_tokens"] for r in responses),
        truncated_fraction=fmean(r["finish_reason"] == "length" for r in responses),
        elapsed_s=time.monotonic() - started,
        responses=responses,
    )


def _generate(
    engine: RolloutEngine, prompts: Sequence[Sequence[int]], sampling: SamplingParams
) -> Iterator[tuple[int, list[list[Any]]]]:
    """(offset, generations) per engine call, checking the engine kept its contract."""
    for call_index, offset in enumerate(range(0, len(prompts), PROMPTS_PER_CALL)):
        chunk = prompts[offset : offset + PROMPTS_PER_CALL]
        # A distinct seed per call, so equal seeds do not correlate samples across calls.
        call_seed = None if sampling.seed is None else sampling.seed + call_index
        call_sampling = replace(sampling, seed=call_seed)
        generations = engine.generate(chunk, call_sampling)
        if len(generations) != len(chunk) or any(len(g) != sampling.n for g in generations):
            raise RuntimeError(
                f"{type(engine).__name__}.generate returned {len(generations)} prompts' worth of "
                f"generations for {len(chunk)} prompts (expected {sampling.n} each)"
            )
        yield offset, generations


def _grade(question: Question, sample_index: int, generation: Any) -> dict:
    return {
        "index": question.index,
        "sample": sample_index,
        "ground_truth": question.ground_truth,
        "answer": extract_last_boxed(generation.text),
        "correct": is_correct(generation.text, question.ground_truth),
        "finish_reason": generation.finish_reason,
        "num_tokens": len(generation.token_ids),
        "response": generation.text,
    }


# ---------------------------------------------------------------------------------------------
# The sweep


def run_sweep(
    engine: RolloutEngine,
    tokenizer: Any,
    benchmarks: Mapping[str, Sequence[Question]],
    temperatures: Sequence[float],
    n: int,
    out_dir: str | Path,
    max_new_tokens: int = 3072,
    template: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Evaluate every benchmark at every temperature; write and return the results.

    Returns the content of ``results.json``; see the module docstring for the files.
    """
    check_sweep_args(benchmarks, temperatures, n, max_new_tokens, template)
    out_dir = Path(out_dir)
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
    (out_dir / "responses").mkdir(parents=True, exist_ok=True)
    cells = [(name, float(t)) for name in benchmarks for t in temperatures]
    results: dict[tuple[str, float], CellResult] = {}
    bar = tqdm(cells, desc="sweep", unit="cell", disable=not progress)
    for name, temperature in bar:
        bar.set_postfix_str(f"{name} T={temperature_label(temperature)}")
        settings = _cell_settings(name, benchmarks[name], temperature, n, max_new_tokens,
                                  template, seed)
        cell_path = out_dir / "cells" / f"{_cell_stem(name, temperature)}.json"
        stored = _load_cell(cell_path, settings)
        if stored is not None:
            results[(name, temperature)] = stored
            continue
        prompts = render_prompts(benchmarks[name], tokenizer, template)
        sampling = sampling_for(temperature, n, max_new_tokens, settings["seed"])
        cell = evaluate_cell(engine, benchmarks[name], prompts, sampling,
                             benchmark=name, progress=progress)
        cell.settings = settings
        _save_cell(out_dir, cell)
        cell.responses = []  # on disk now; a full sweep's texts would not fit in memory
        results[(name, temperature)] = cell
    summary = summarise(results, list(benchmarks), [float(t) for t in temperatures], n)
    summary["config"] = {"max_new_tokens": max_new_tokens, "template": template, "seed": seed}
    _write_atomic(out_dir / "results.json", json.dumps(summary, indent=2) + "\n")
    _write_atomic(out_dir / "results.md", results_markdown(summary))
    plot_sweep(summary, out_dir / "sweep.png")
    return summary


def check_sweep_args(
    benchmarks: Mapping[str, Sequence[Question]],
    temperatures: Sequence[float],
    n: int,
    max_new_tokens: int,
    template: str,
) -> None:
    """Reject bad arguments before any generation starts."""
    check_template(template)
    if n < 1:
        raise ValueError(f"n (samples per question) must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperatures:
        raise ValueError("no temperatures to sweep")
    for t in temperatures:
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t}")
    labels = [temperature_label(float(t)) for t in temperatures]
    if len(set(labels)) != len(labels):
        raise ValueError(f"temperatures repeat (as file labels: {labels})")
    if not benchmarks:
        raise ValueError("no benchmarks to evaluate")
    for name, questions in benchmarks.items():
        if not _SAFE_NAME.fullmatch(name):
            raise ValueError(
                f"benchmark name {name!r} must match {_SAFE_NAME.pattern} (used in file names)")
        if not questions:
            raise ValueError(f"benchmark {name!r} has no questions")
        missing = [q.index for q in questions if q.ground_truth is None]
        if missing:
            raise ValueError(
                f"benchmark {name!r}: questions {missing[:5]} have no ground truth to grade against")


def temperature_label(temperature: float) -> str:
    """``0.0``, ``0.2``, ``1.0``, ``1.25``: the key used in file names and results.json."""
    one_decimal = f"{temperature:.1f}"
    if float(one_decimal) == round(temperature, 6):
        return one_decimal
    return f"{round(temperature, 6):g}"


def _cell_stem(benchmark: str, temperature: float) -> str:
    return f"{benchmark}_T{temperature_label(temperature)}"


def _cell_settings(benchmark: str, questions: Sequence[Question], temperature: float, n: int,
                   max_new_tokens: int, template: str, seed: int) -> dict[str, Any]:
    """Everything that determines a cell's outcome, so a stale cell is detected on resume."""
    digest = hashlib.sha256()
    for q in questions:
        digest.update(json.dumps([q.index, q.prompt_messages, q.ground_truth]).encode())
    label = f"{benchmark}@{temperature_label(temperature)}"
    return {
        "n": 1 if temperature == 0 else n,
        "max_new_tokens": max_new_tokens,
        "template": template,
        "seed": (seed * 1_000_003 + zlib.crc32(label.encode())) % 2**31,
        "num_questions": len(questions),
        "questions_sha256": digest.hexdigest(),
    }


def _load_cell(path: Path, settings: dict[str, Any]) -> CellResult | None:
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    if stored["settings"] != settings:
        changed = sorted(k for k in settings if stored["settings"].get(k) != settings[k])
        raise ValueError(
            f"{path} was computed with different settings ({', '.join(changed)}); use a fresh "
            "output directory, or delete that cell file to recompute it"
        )
    stored["metrics"] = {int(k): v for k, v in stored["metrics"].items()}
    return CellResult(**stored)


def _save_cell(out_dir: Path, cell: CellResult) -> None:
    """Responses first, the cell record last: the record marks the cell as finished."""
    stem = _cell_stem(cell.benchmark, cell.temperature)
    responses_path = out_dir / "responses" / f"{stem}.jsonl"
    with _atomic_open(responses_path) as stream:
        for record in cell.responses:
            stream.write(json.dumps({"benchmark": cell.benchmark,
                                     "temperature": cell.temperature, **record}) + "\n")
    record = asdict(cell)
    del record["responses"]
    _write_atomic(out_dir / "cells" / f"{stem}.json", json.dumps(record, indent=1) + "\n")


class _atomic_open:
    """Write to ``<path>.tmp`` and move it over ``path`` only if the block finishes."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")

    def __enter__(self):
        self.stream = self.tmp.open("w", encoding="utf-8")
        return self.stream

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    with _atomic_open(path) as stream:
        stream.write(text)


# ---------------------------------------------------------------------------------------------
# Reporting


def summarise(results: Mapping[tuple[str, float], CellResult], benchmarks: list[str],
              temperatures: list[float], n: int) -> dict:
    """The results.json content: per-cell pass@k, benchmark means, AVG and the best T."""
    cells: dict[str, dict[str, dict[str, float]]] = {name: {} for name in benchmarks}
    mean: dict[str, dict[str, float]] = {}
    avg: dict[str, float] = {}
    used_ks: dict[str, list[int]] = {}
    for t in temperatures:
        label = temperature_label(t)
        per_benchmark = {name: results[(name, t)].metrics for name in benchmarks}
        for name in benchmarks:
            cell = results[(name, t)]
            cells[name][label] = {
                **{f"pass@{k}": v for k, v in cell.metrics.items()},
                "n": cell.settings["n"],
                "num_questions": len(cell.correct_counts),
                "mean_response_tokens": cell.mean_response_tokens,
                "truncated_fraction": cell.truncated_fraction,
            }
        shared_ks = sorted(set.intersection(*(set(m) for m in per_benchmark.values())))
        mean[label] = {f"pass@{k}": fmean(m[k] for m in per_benchmark.values()) for k in shared_ks}
        avg[label] = avg_score(per_benchmark)
        used_ks[label] = list(avg_ks(per_benchmark))
    best = max(temperatures, key=lambda t: avg[temperature_label(t)])  # ties: the first listed
    return {
        "benchmarks": benchmarks,
        "temperatures": temperatures,
        "n": n,
        "cells": cells,
        "mean": mean,
        "avg": avg,
        "avg_ks": used_ks,
        "best_temperature": best,
        "best_avg": avg[temperature_label(best)],
    }


def results_markdown(summary: Mapping[str, Any]) -> str:
    """Tables of AVG and pass@k by temperature; the best (baseline) row is marked."""
    best_label = temperature_label(summary["best_temperature"])
    lines = [
        "# Temperature sweep",
        "",
        f"Baseline (best AVG): **T = {best_label}**, AVG = {summary['best_avg']:.4f}. "
        f"AVG = mean over pass@{{{','.join(map(str, AVG_KS))}}} (those available) of the "
        f"benchmark-averaged pass@k; n = {summary['n']} samples per question, 1 at T = 0 (greedy).",
        "",
    ]
    header_ks = [k for k in AVG_KS if any(f"pass@{k}" in m for m in summary["mean"].values())]
    labels = [temperature_label(t) for t in summary["temperatures"]]
    overview = [[summary["avg"][label]] + [summary["mean"][label].get(f"pass@{k}") for k in header_ks]
                for label in labels]
    lines += _table(["T", "AVG"] + [f"mean pass@{k}" for k in header_ks], overview,
                    summary["temperatures"], best_label)
    for k in header_ks:
        lines += ["", f"## pass@{k}", ""]
        rows = [[summary["cells"][b][label].get(f"pass@{k}") for b in summary["benchmarks"]]
                for label in labels]
        lines += _table(["T"] + summary["benchmarks"], rows, summary["temperatures"], best_label)
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[float | None]], temperatures: list[float],
           best_label: str) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t, row in zip(temperatures, rows):
        label = temperature_label(t)
        first = f"**{label}** (baseline)" if label == best_label else label
        cells = ["-" if v is None else f"{100 * v:.1f}" for v in row]
        lines.append("| " + " | ".join([first] + cells) + " |")
    return lines


def plot_sweep(summary: Mapping[str, Any], path: Path) -> None:
    """pass@1/8/32 (benchmark means) and AVG against temperature, the best T marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temperatures = summary["temperatures"]
    labels = [temperature_label(t) for t in temperatures]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for k in AVG_KS:
        values = [summary["mean"][label].get(f"pass@{k}") for label in labels]
        if any(v is not None for v in values):
            axes.plot(temperatures, [math.nan if v is None else 100 * v for v in values],
                      marker="o", label=f"mean pass@{k}")
    axes.plot(temperatures, [100 * summary["avg"][label] for label in labels],
              marker="s", color="black", linewidth=2, label="AVG")
    axes.axvline(summary["best_temperature"], color="grey", linestyle="--",
                 label=f"best T = {temperature_label(summary['best_temperature'])}")
    axes.set_xlabel("temperature")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"Temperature sweep over {len(summary['benchmarks'])} benchmarks")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# In-training validation


def evaluate_once(
    engine: RolloutEngine,
    tokenizer: Any,
    benchmarks: Mapping[str, Sequence[Question]],
    *,
    temperature: float,
    n: int,
    max_questions: int | None = None,
    max_new_tokens: int = 3072,
    template: str = "auto",
    seed: int = 0,
) -> dict[str, float]:
    """One temperature, the first ``max_questions`` of each benchmark, no files written.

    Returns ``val/<bench>/pass@<k>`` for each k available, ``val/avg`` (as in the sweep) and
    ``val/mean_response_tokens``, ready for the logger.
    """
    if max_questions is not None and max_questions < 1:
        raise ValueError(f"max_questions must be >= 1 (or None for all), got {max_questions}")
    subsets = {name: list(qs[:max_questions]) for name, qs in benchmarks.items()}
    check_sweep_args(subsets, [temperature], n, max_new_tokens, template)
    metrics: dict[str, float] = {}
    per_benchmark: dict[str, dict[int, float]] = {}
    response_tokens: list[float] = []
    for name, questions in subsets.items():
        prompts = render_prompts(questions, tokenizer, template)
        sampling = sampling_for(temperature, n, max_new_tokens, seed)
        cell = evaluate_cell(engine, questions, prompts, sampling, benchmark=name)
        per_benchmark[name] = cell.metrics
        response_tokens.append(cell.mean_response_tokens)
        metrics.update({f"val/{name}/pass@{k}": v for k, v in cell.metrics.items()})
    metrics["val/avg"] = avg_score(per_benchmark)
    metrics["val/mean_response_tokens"] = fmean(response_tokens)
    return metrics
