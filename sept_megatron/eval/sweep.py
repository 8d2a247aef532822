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

Under torchrun every rank runs the sweep with its own engine
(:class:`~sept_megatron.rollout.orchestration.DataParallelEngines`): the questions of a wave of
cells (as many cells as it takes to give every engine a batch) are spread over all engines,
the responses gathered to rank 0, which grades them in a process pool
(:class:`~.grading.GradingPool`) while the engines generate the next wave, and writes every
file. Each sample is seeded by (cell, question, sample index), so the results equal a
one-process sweep's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

from tqdm.auto import tqdm

from ..data import Question, check_template, render_prompts
from ..rollout.base import Generation, RolloutEngine, SamplingParams
from ..rollout.orchestration import DataParallelEngines, Request
from .grading import GradingPool, extract_last_boxed
from .metrics import AVG_KS, avg_ks, avg_score, benchmark_metrics

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


@dataclass(frozen=True)
class Response:
    """What grading and the responses file need of one generation (sent to rank 0)."""

    text: str
    num_tokens: int
    finish_reason: str


def _response(generation: Generation) -> Response:
    return Response(generation.text, len(generation.token_ids), generation.finish_reason)


def grade_cell(
    questions: Sequence[Question],
    rows: Sequence[Sequence[Response]],
    sampling: SamplingParams,
    *,
    benchmark: str,
    grades: Sequence[bool],
    elapsed_s: float = 0.0,
) -> CellResult:
    """Reduce one cell's responses (``rows[question][sample]``) and their grades to pass@k."""
    correct_counts: list[int] = []
    responses: list[dict] = []
    flat = iter(grades)
    for question, samples in zip(questions, rows):
        graded = [_record(question, index, response, next(flat)) for index, response in enumerate(samples)]
        correct_counts.append(sum(record["correct"] for record in graded))
        responses.extend(graded)
    return CellResult(
        benchmark=benchmark,
        temperature=sampling.temperature,
        settings={},
        correct_counts=correct_counts,
        metrics=benchmark_metrics(correct_counts, sampling.n, greedy=sampling.temperature == 0),
        mean_response_tokens=fmean(r["num_tokens"] for r in responses),
        truncated_fraction=fmean(r["finish_reason"] == "length" for r in responses),
        elapsed_s=elapsed_s,
        responses=responses,
    )


def _record(question: Question, sample_index: int, response: Response, correct: bool) -> dict:
    return {
        "index": question.index,
        "sample": sample_index,
        "ground_truth": question.ground_truth,
        "answer": extract_last_boxed(response.text),
        "correct": bool(correct),
        "finish_reason": response.finish_reason,
        "num_tokens": response.num_tokens,
        "response": response.text,
    }


def _grading_inputs(questions: Sequence[Question], rows: Sequence[Sequence[Response]]):
    texts = [response.text for samples in rows for response in samples]
    truths = [q.ground_truth for q, samples in zip(questions, rows) for _ in samples]
    return texts, truths


@dataclass
class _Cell:
    """One (benchmark, temperature) cell to compute: its questions, prompts and sampling."""

    benchmark: str
    questions: Sequence[Question]
    prompts: list[list[int]]
    sampling: SamplingParams
    settings: dict[str, Any] = field(default_factory=dict)


def _waves(cells: list[_Cell], num_engines: int, shard_sequences: int) -> Iterator[list[_Cell]]:
    """Consecutive cells, as few per wave as give every engine at least one batch."""
    wave: list[_Cell] = []
    batches = 0
    for cell in cells:
        copies = 1 if cell.sampling.temperature == 0 else cell.sampling.n
        wave.append(cell)
        batches += math.ceil(len(cell.prompts) * copies / shard_sequences)
        if batches >= num_engines:
            yield wave
            wave, batches = [], 0
    if wave:
        yield wave


class _WaveGrading:
    """Rank 0's grading of one generated wave, running in the pool until :meth:`finish`."""

    def __init__(self, wave: list[_Cell], rows: list, grader: GradingPool, generate_s: float):
        self.wave, self.rows, self.generate_s = wave, rows, generate_s
        self.started = time.monotonic()
        self.pending = [
            grader.submit(*_grading_inputs(cell.questions, cell_rows)) for cell, cell_rows in zip(wave, rows)
        ]

    def finish(self) -> list[CellResult]:
        results = []
        for cell, cell_rows, pending in zip(self.wave, self.rows, self.pending):
            elapsed = self.generate_s / len(self.wave) + time.monotonic() - self.started
            result = grade_cell(
                cell.questions,
                cell_rows,
                cell.sampling,
                benchmark=cell.benchmark,
                grades=pending.result(),
                elapsed_s=elapsed,
            )
            result.settings = cell.settings
            results.append(result)
        return results


def _as_engines(engine: RolloutEngine | DataParallelEngines) -> DataParallelEngines:
    return engine if isinstance(engine, DataParallelEngines) else DataParallelEngines.single(engine)


def _generate_wave(engines: DataParallelEngines, wave: list[_Cell]) -> tuple[list | None, float]:
    """Collective: every engine answers its share of the wave; rank 0 gets the responses."""
    started = time.monotonic()
    rows = engines.generate_many(
        [Request(cell.prompts, cell.sampling) for cell in wave], dst=0, pack=_response
    )
    return rows, time.monotonic() - started


def _share(engines: DataParallelEngines, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (collective when there are several)."""
    if engines.placement.world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------
# The sweep


def run_sweep(
    engine: RolloutEngine | DataParallelEngines,
    tokenizer: Any,
    benchmarks: Mapping[str, Sequence[Question]],
    temperatures: Sequence[float],
    n: int,
    out_dir: str | Path,
    max_new_tokens: int = 3072,
    template: str = "auto",
    seed: int = 0,
    progress: bool = True,
    grading_workers: int = 0,
) -> dict:
    """Evaluate every benchmark at every temperature; write and return the results.

    ``engine``: one engine, or every rank's :class:`DataParallelEngines` (then every rank calls
    this; rank 0 writes). ``grading_workers``: grading processes on rank 0 (0: in-process).
    Returns the content of ``results.json`` (on every rank); see the module docstring.
    """
    check_sweep_args(benchmarks, temperatures, n, max_new_tokens, template)
    engines = _as_engines(engine)
    writer = engines.placement.rank == 0
    out_dir = Path(out_dir)
    cells: list[_Cell] = []
    for name, temperature in ((name, float(t)) for name in benchmarks for t in temperatures):
        settings = _cell_settings(name, benchmarks[name], temperature, n, max_new_tokens, template, seed)
        sampling = sampling_for(temperature, n, max_new_tokens, settings["seed"])
        cells.append(_Cell(name, benchmarks[name], [], sampling, settings))
    results: dict[tuple[str, float], CellResult] = {}
    if writer:
        (out_dir / "cells").mkdir(parents=True, exist_ok=True)
        (out_dir / "responses").mkdir(parents=True, exist_ok=True)
        for cell in cells:
            stored = _load_cell(out_dir / "cells" / f"{_cell_stem(*_key(cell))}.json", cell.settings)
            if stored is not None:
                results[_key(cell)] = stored
    done = _share(engines, set(results))
    todo = [cell for cell in cells if _key(cell) not in done]
    prompts = {
        name: render_prompts(benchmarks[name], tokenizer, template)
        for name in {cell.benchmark for cell in todo}
    }
    for cell in todo:
        cell.prompts = prompts[cell.benchmark]
    unit = engines.local.shard_sequences if engines.local is not None else 1
    bar = tqdm(total=len(todo), desc="sweep", unit="cell", disable=not (progress and writer))
    with GradingPool(grading_workers if writer else 0) as grader:
        grading: _WaveGrading | None = None
        try:
            for wave in _waves(todo, engines.num_engines, unit):
                bar.set_postfix_str(
                    ", ".join(f"{c.benchmark} T={temperature_label(c.sampling.temperature)}" for c in wave)
                )
                rows, generate_s = _generate_wave(engines, wave)
                if grading is not None:  # the previous wave, graded while this one generated
                    _finish(grading, out_dir, results, bar)
                grading = _WaveGrading(wave, rows, grader, generate_s) if writer else None
        finally:
            if grading is not None:  # also when generation failed: keep what was graded
                _finish(grading, out_dir, results, bar)
    bar.close()
    summary = None
    if writer:
        summary = summarise(results, list(benchmarks), [float(t) for t in temperatures], n)
        summary["config"] = {"max_new_tokens": max_new_tokens, "template": template, "seed": seed}
        _write_atomic(out_dir / "results.json", json.dumps(summary, indent=2) + "\n")
        _write_atomic(out_dir / "results.md", results_markdown(summary))
        plot_sweep(summary, out_dir / "sweep.png")
    return _share(engines, summary)


def _key(cell: _Cell) -> tuple[str, float]:
    return cell.benchmark, cell.sampling.temperature


def _finish(grading: _WaveGrading, out_dir: Path, results: dict, bar) -> None:
    for cell in grading.finish():
        _save_cell(out_dir, cell)
        cell.responses = []  # on disk now; a full sweep's texts would not fit in memory
        results[(cell.benchmark, cell.temperature)] = cell
        bar.update(1)


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
            raise ValueError(f"benchmark name {name!r} must match {_SAFE_NAME.pattern} (used in file names)")
        if not questions:
            raise ValueError(f"benchmark {name!r} has no questions")
        missing = [q.index for q in questions if q.ground_truth is None]
        if missing:
            raise ValueError(
                f"benchmark {name!r}: questions {missing[:5]} have no ground truth to grade against"
            )


def temperature_label(temperature: float) -> str:
    """``0.0``, ``0.2``, ``1.0``, ``1.25``: the key used in file names and results.json."""
    one_decimal = f"{temperature:.1f}"
    if float(one_decimal) == round(temperature, 6):
        return one_decimal
    return f"{round(temperature, 6):g}"


def _cell_stem(benchmark: str, temperature: float) -> str:
    return f"{benchmark}_T{temperature_label(temperature)}"


def _cell_settings(
    benchmark: str,
    questions: Sequence[Question],
    temperature: float,
    n: int,
    max_new_tokens: int,
    template: str,
    seed: int,
) -> dict[str, Any]:
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
            stream.write(
                json.dumps({"benchmark": cell.benchmark, "temperature": cell.temperature, **record}) + "\n"
            )
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


def summarise(
    results: Mapping[tuple[str, float], CellResult], benchmarks: list[str], temperatures: list[float], n: int
) -> dict:
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
    overview = [
        [summary["avg"][label]] + [summary["mean"][label].get(f"pass@{k}") for k in header_ks]
        for label in labels
    ]
    lines += _table(
        ["T", "AVG"] + [f"mean pass@{k}" for k in header_ks], overview, summary["temperatures"], best_label
    )
    for k in header_ks:
        lines += ["", f"## pass@{k}", ""]
        rows = [
            [summary["cells"][b][label].get(f"pass@{k}") for b in summary["benchmarks"]] for label in labels
        ]
        lines += _table(["T"] + summary["benchmarks"], rows, summary["temperatures"], best_label)
    return "\n".join(lines) + "\n"


def _table(
    header: list[str], rows: list[list[float | None]], temperatures: list[float], best_label: str
) -> list[str]:
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
            axes.plot(
                temperatures,
                [math.nan if v is None else 100 * v for v in values],
                marker="o",
                label=f"mean pass@{k}",
            )
    axes.plot(
        temperatures,
        [100 * summary["avg"][label] for label in labels],
        marker="s",
        color="black",
        linewidth=2,
        label="AVG",
    )
    axes.axvline(
        summary["best_temperature"],
        color="grey",
        linestyle="--",
        label=f"best T = {temperature_label(summary['best_temperature'])}",
    )
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
    engine: RolloutEngine | DataParallelEngines,
    tokenizer: Any,
    benchmarks: Mapping[str, Sequence[Question]],
    *,
    temperature: float,
    n: int,
    max_questions: int | None = None,
    max_new_tokens: int = 3072,
    template: str = "auto",
    seed: int = 0,
    grader: GradingPool | None = None,
) -> dict[str, float]:
    """One temperature, the first ``max_questions`` of each benchmark, no files written.

    Returns ``val/<bench>/pass@<k>`` for each k available, ``val/avg`` (as in the sweep) and
    ``val/mean_response_tokens``, ready for the logger. With :class:`DataParallelEngines`
    every rank calls it, every engine answers a share, and rank 0 grades and returns the
    metrics (other ranks get ``{}``).
    """
    if max_questions is not None and max_questions < 1:
        raise ValueError(f"max_questions must be >= 1 (or None for all), got {max_questions}")
    subsets = {name: list(qs[:max_questions]) for name, qs in benchmarks.items()}
    check_sweep_args(subsets, [temperature], n, max_new_tokens, template)
    engines = _as_engines(engine)
    sampling = sampling_for(temperature, n, max_new_tokens, seed)
    requests = [
        Request(render_prompts(questions, tokenizer, template), sampling) for questions in subsets.values()
    ]
    rows = engines.generate_many(requests, dst=0, pack=_response)
    if rows is None:
        return {}
    grader = grader or GradingPool(0)
    metrics: dict[str, float] = {}
    per_benchmark: dict[str, dict[int, float]] = {}
    response_tokens: list[float] = []
    for (name, questions), cell_rows in zip(subsets.items(), rows):
        grades = grader.grade(*_grading_inputs(questions, cell_rows))
        cell = grade_cell(questions, cell_rows, sampling, benchmark=name, grades=grades)
        per_benchmark[name] = cell.metrics
        response_tokens.append(cell.mean_response_tokens)
        metrics.update({f"val/{name}/pass@{k}": v for k, v in cell.metrics.items()})
    metrics["val/avg"] = avg_score(per_benchmark)
    metrics["val/mean_response_tokens"] = fmean(response_tokens)
    return metrics
