"""``sept-megatron demo --search``: choose the demo's SePT schedule on the validation split.

    sept-megatron demo --search [--out runs/demo-search] [--jobs 2]

The score is the paper's criterion, measured on validation only: SePT's AVG at T = 1 minus the
base model's best temperature-swept AVG (AVG = mean of pass@1, pass@8, pass@32, n = 32). The
test split is never read.

Protocol (all of it fixed by :class:`SearchSpace` and :class:`SearchBudget`, so the same command
gives the same table):

1. the base model's validation sweep (every temperature of the demo recipe, all validation
   questions, evaluation seed ``budget.seed``), once;
2. stage 1, cheap: the reference schedule (the demo's original, a priori one) and
   ``budget.candidates`` schedules drawn at random (``random.Random(budget.seed)``) from the
   grid of :class:`SearchSpace`, each trained once (training seed ``budget.seed``) through the
   real train path and scored at T = 1 on the first ``budget.stage1_questions`` validation
   questions against the base's best AVG on those same questions;
3. stage 2, confirmation: the ``budget.top`` best of stage 1 on all validation questions, trained
   with every seed of ``budget.stage2_seeds`` (the stage-1 model is reused for the first), scored
   at T = 1 and at the base's best validation temperature (for the mechanism check);
4. the choice: the best mean stage-2 score among the schedules whose mechanism holds on
   validation for every stage-2 seed (pass@1 at T = 1 >= base + 5 points and no fall of more
   than 2 points at the base's best T); if none does, the best mean score, flagged.

CPU budget: every schedule of the grid costs at most ``budget.max_answers`` SePT answers
(rounds x prompts per round), i.e. the demo's training stays cheap; the search as a whole
trains ``1 + candidates + top x (len(stage2_seeds) - 1)`` runs. Seeds are disjoint from the
demo's reporting seeds (0, 1, 2). Every training and evaluation runs with ``budget.threads``
torch threads (results depend on the thread count), each in a fresh process when ``--jobs`` >
1, so the table does not depend on ``--jobs``. Everything is resumable: a run lives in
``OUT/runs/<hash of its recipe and thread count>/seed-S``; a finished run (``DONE`` marker) and a
finished sweep cell are not redone, an unfinished run is restarted from scratch. Measured on the
project's shared 2-core machine with ``--jobs 2``: about 33 minutes wall for the default budget
(16 SePT trainings, 13 stage-1 and 6 stage-2 evaluations).

Writes ``OUT/search.md`` (the table), ``OUT/search.csv``, ``OUT/search.json`` (everything,
with wall times) and ``OUT/chosen_recipe.json``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from sept_megatron.demo.base_model import BaseModelRecipe, build_base_model
from sept_megatron.demo.run import (
    MECHANISM_GAIN,
    MECHANISM_MAX_FALL,
    DemoRecipe,
    best_temperature,
    cell_counts,
    default_cache,
    prepare_data,
    score_counts,
    sweep,
    train_sept,
)


@dataclass(frozen=True)
class Schedule:
    """The searched part of a :class:`DemoRecipe`."""

    lr: float
    rounds: int
    prompts_per_round: int
    steps_per_round: int
    """Optimizer steps per round: mini-batch = prompts_per_round / steps_per_round."""
    tau_start: float
    tau_end: float
    anneal_fraction: float

    @property
    def answers(self) -> int:
        """SePT answers generated and trained on: the schedule's CPU cost."""
        return self.rounds * self.prompts_per_round

    def recipe(self, template: DemoRecipe) -> DemoRecipe:
        return replace(
            template,
            lr=self.lr,
            rounds=self.rounds,
            prompts_per_round=self.prompts_per_round,
            mini_batch_size=self.prompts_per_round // self.steps_per_round,
            tau_start=self.tau_start,
            tau_end=self.tau_end,
            anneal_fraction=self.anneal_fraction,
        )


REFERENCE = Schedule(
    lr=1e-4,
    rounds=24,
    prompts_per_round=64,
    steps_per_round=2,
    tau_start=0.6,
    tau_end=1.0,
    anneal_fraction=2 / 3,
)
"""The demo's original schedule (set a priori, issue 12): always in the search, as a yardstick."""


@dataclass(frozen=True)
class SearchSpace:
    """The grid schedules are drawn from: one value per field.

    Why these: SFT on the model's own tau_s < 1 samples sharpens it at T = 1, so what moves AVG
    at T = 1 is how far that goes: a lower tau_s (sharper targets), a tau_end below 1 (the last
    rounds keep sharpening instead of training at tau_s = tau_t, which has zero expected
    gradient), and more or larger updates (lr, rounds, answers and steps per round). Too much
    trades pass@32 (diversity) for pass@1; the score decides.
    """

    lr: tuple[float, ...] = (1e-4, 2e-4, 4e-4)
    rounds: tuple[int, ...] = (24, 48)
    prompts_per_round: tuple[int, ...] = (64, 128)
    steps_per_round: tuple[int, ...] = (2, 4)
    tau_start: tuple[float, ...] = (0.3, 0.45, 0.6)
    tau_end: tuple[float, ...] = (0.8, 1.0)
    anneal_fraction: tuple[float, ...] = (2 / 3, 1.0)
    reference: Schedule | None = REFERENCE
    """Tried first, on top of the random draws (it need not lie on the grid)."""

    def grid(self, max_answers: int) -> list[Schedule]:
        names = [f.name for f in fields(Schedule)]  # the grid's axes, in Schedule's order
        grid = [
            Schedule(**dict(zip(names, values)))
            for values in itertools.product(*(getattr(self, name) for name in names))
        ]
        return [
            s
            for s in grid
            if s.answers <= max_answers
            and s.tau_end >= s.tau_start
            and s.prompts_per_round % s.steps_per_round == 0
        ]


@dataclass(frozen=True)
class SearchBudget:
    """How much of the grid is tried, and how hard."""

    candidates: int = 12
    """Schedules drawn at random from the grid for stage 1 (the reference comes on top)."""
    max_answers: int = 6144
    """Most SePT answers (rounds x prompts per round) one schedule may cost."""
    stage1_questions: int = 100
    """Stage 1 scores on the first this-many validation questions (n = 32 each)."""
    top: int = 3
    """Schedules confirmed in stage 2 on all validation questions."""
    stage2_seeds: tuple[int, ...] = (100, 101)
    """Training seeds of stage 2; the first must be ``seed`` (its stage-1 model is reused)."""
    seed: int = 100
    """Draws the candidates, trains stage 1 and seeds every validation sample."""
    threads: int = 1
    """Torch threads per training/evaluation process: results depend on the thread count, so
    it is part of the protocol (and parallel jobs do not change the table)."""

    def validate(self, val_questions: int) -> None:
        for name in ("candidates", "max_answers", "stage1_questions", "top", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"SearchBudget.{name}={getattr(self, name)} must be >= 1")
        if self.stage1_questions > val_questions:
            raise ValueError(
                f"SearchBudget.stage1_questions={self.stage1_questions} exceeds the "
                f"{val_questions} validation questions; lower it"
            )
        if not self.stage2_seeds or self.stage2_seeds[0] != self.seed:
            raise ValueError(
                f"SearchBudget.stage2_seeds={self.stage2_seeds} must start with "
                f"seed={self.seed} (stage 2 reuses the stage-1 model)"
            )
        if len(set(self.stage2_seeds)) != len(self.stage2_seeds):
            raise ValueError(f"SearchBudget.stage2_seeds={self.stage2_seeds} repeats a seed")


def draw_candidates(space: SearchSpace, budget: SearchBudget) -> list[Schedule]:
    """The reference, then ``budget.candidates`` distinct grid points in a seeded random order."""
    pool = [s for s in space.grid(budget.max_answers) if s != space.reference]
    if budget.candidates > len(pool):
        raise ValueError(
            f"SearchBudget.candidates={budget.candidates} exceeds the {len(pool)} "
            f"schedules of the grid within max_answers={budget.max_answers}"
        )
    drawn = random.Random(budget.seed).sample(pool, budget.candidates)
    return ([space.reference] if space.reference else []) + drawn


# --- the search -------------------------------------------------------------------------------
def run_search(
    out_dir: str,
    space: SearchSpace = SearchSpace(),
    budget: SearchBudget = SearchBudget(),
    template: DemoRecipe = DemoRecipe(),
    base_recipe: BaseModelRecipe | None = None,
    cache_dir: str | None = None,
    jobs: int = 1,
    progress: bool = True,
) -> dict:
    """Run the protocol of the module docstring; returns what ``search.json`` holds.

    ``jobs`` schedules train and evaluate side by side, each in its own process with
    ``budget.threads`` torch threads: the table does not depend on ``jobs``.
    """
    import torch

    from sept_megatron.data import load_questions

    template.validate()
    budget.validate(template.val_questions)
    if jobs < 1:
        raise ValueError(f"jobs={jobs} must be >= 1")
    candidates = draw_candidates(space, budget)
    base_recipe = base_recipe or BaseModelRecipe()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base_dir = build_base_model(cache_dir or default_cache(), base_recipe, progress=progress)
    data_dir = prepare_data(out, base_recipe, template)
    val = load_questions(data_dir / "val.jsonl")  # the test split is written, never read
    _say(f"search: {len(candidates)} schedules; the base model's validation sweep first")
    threads = torch.get_num_threads()
    torch.set_num_threads(budget.threads)  # numerics depend on the thread count: fix it
    try:
        base_sweep = out / "base_val_sweep"
        sweep(base_dir, val, str(base_sweep), template.temperatures, template, budget.seed, progress)
    finally:
        torch.set_num_threads(threads)
    base = {
        "stage1": _base_scores(base_sweep, template, budget.stage1_questions),
        "stage2": _base_scores(base_sweep, template, None),
    }
    context = _Context(out, base_dir, data_dir, template, budget)
    timings: dict[str, float] = {}

    names = [f"c{index:02d}" for index in range(len(candidates))]
    _say(f"stage 1: {len(candidates)} schedules on {budget.stage1_questions} validation questions")
    stage1 = _map(
        jobs,
        [
            _Job(context, name, schedule, budget.seed, budget.stage1_questions, (1.0,), base["stage1"])
            for name, schedule in zip(names, candidates)
        ],
        timings,
    )
    rows = [
        {
            "name": name,
            "schedule": asdict(schedule),
            "answers": schedule.answers,
            "run_key": _run_key(schedule.recipe(template), budget.threads),
            "reference": schedule == space.reference,
            "stage1": scored,
            "stage2": None,
        }
        for name, schedule, scored in zip(names, candidates, stage1)
    ]
    top = sorted(rows, key=lambda r: (-r["stage1"]["score"], r["name"]))[: budget.top]
    temps = tuple(dict.fromkeys((1.0, base["stage2"]["best_temperature"])))
    _say(
        f"stage 2: {', '.join(r['name'] for r in top)} on all {len(val)} validation questions, "
        f"seeds {budget.stage2_seeds}"
    )
    stage2 = _map(
        jobs,
        [
            _Job(context, row["name"], Schedule(**row["schedule"]), seed, None, temps, base["stage2"])
            for row in top
            for seed in budget.stage2_seeds
        ],
        timings,
    )
    per_seed = len(budget.stage2_seeds)
    for index, row in enumerate(top):
        row["stage2"] = _stage2_summary(stage2[index * per_seed : (index + 1) * per_seed])
    chosen = _choose(rows)
    result = {
        "protocol": __doc__,
        "space": asdict(space),
        "budget": asdict(budget),
        "template": asdict(template),
        "base_recipe": asdict(base_recipe),
        "base": base,
        "rows": rows,
        "chosen": chosen,
        "jobs": jobs,
        "wall_time_s": {"total": round(time.perf_counter() - start, 1), **timings},
    }
    _write_tables(out, result)
    return result


@dataclass(frozen=True)
class _Context:
    """What every job needs, picklable for a worker process."""

    out: Path
    base_dir: str
    data_dir: Path
    template: DemoRecipe
    budget: SearchBudget


@dataclass(frozen=True)
class _Job:
    """Train one (schedule, seed) once, score it on a stretch of the validation split."""

    context: _Context
    name: str
    schedule: Schedule
    seed: int
    first: int | None
    """Score on the first this-many validation questions (stage 1), or all (None: stage 2)."""
    temperatures: tuple[float, ...]
    base: dict

    @property
    def label(self) -> str:
        return f"{self.name}/seed-{self.seed}/{'stage1' if self.first else 'stage2'}"


def _map(jobs: int, work: list[_Job], timings: dict) -> list[dict]:
    """Run ``work`` in order (one process) or ``jobs`` fresh processes at a time; results in order."""
    if jobs == 1:
        results = [_run_job(job) for job in work]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # A fresh process per job: Megatron's global state never outlives one run.
        with ProcessPoolExecutor(
            jobs,
            mp_context=multiprocessing.get_context("spawn"),
            max_tasks_per_child=1,
            initializer=_own_port,
        ) as pool:
            results = list(pool.map(_run_job, work))
    for job, (scored, seconds) in zip(work, results):
        timings.update(seconds)
        print(
            f"{job.label}: score {100 * scored['score']:+.2f} (AVG at T=1 "
            f"{100 * scored['avg']:.2f}, pass@1 {100 * scored['pass@1']:.2f})",
            flush=True,
        )
    return [scored for scored, _ in results]


def _run_key(recipe: DemoRecipe, threads: int) -> str:
    """A run directory per (recipe, thread count): a resumed or re-budgeted search reuses a
    finished run only where it would compute the very same thing."""
    payload = json.dumps([asdict(recipe), threads], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:12]


def _own_port() -> None:
    """Each worker is a world of one: let it pick a free rendezvous port, rather than all of
    them inheriting (and colliding on) a MASTER_PORT from the parent's environment."""
    os.environ.pop("MASTER_PORT", None)


def _run_job(job: _Job) -> tuple[dict, dict[str, float]]:
    import torch

    from sept_megatron.data import load_questions

    ctx = job.context
    threads = torch.get_num_threads()
    torch.set_num_threads(ctx.budget.threads)
    try:
        seconds: dict[str, float] = {}
        recipe = job.schedule.recipe(ctx.template)
        run_dir = ctx.out / "runs" / _run_key(recipe, ctx.budget.threads) / f"seed-{job.seed}"
        done = run_dir / "DONE"
        if not done.exists():
            # An unfinished run saved no checkpoint (save_every_n_rounds=0) and has no valid
            # sweep: start it afresh rather than append a second run's rounds to its logs.
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            t0 = time.perf_counter()
            train_sept(
                ctx.base_dir,
                ctx.data_dir,
                run_dir / "sept",
                recipe,
                job.seed,
                "online",
                "disabled",
                progress=False,
            )
            seconds[f"{job.name}/seed-{job.seed}/train"] = round(time.perf_counter() - t0, 1)
            done.write_text(json.dumps(asdict(recipe)) + "\n")
        questions = load_questions(ctx.data_dir / "val.jsonl")[: job.first]
        stage = "stage1" if job.first else "stage2"
        sweep_dir = run_dir / f"sweep_{stage}"
        t0 = time.perf_counter()
        # Evaluation seed fixed across schedules: every candidate meets the same random numbers.
        sweep(
            str(run_dir / "sept" / "hf_final"),
            questions,
            str(sweep_dir),
            job.temperatures,
            recipe,
            ctx.budget.seed,
            progress=False,
        )
        seconds[f"{job.label}_eval"] = round(time.perf_counter() - t0, 1)
    finally:
        torch.set_num_threads(threads)
    return _score(sweep_dir, job, len(questions)), seconds


def _score(sweep_dir: Path, job: _Job, questions: int) -> dict:
    base = job.base
    at_t1 = _scores(sweep_dir, 1.0)
    scored = {
        "seed": job.seed,
        "questions": questions,
        **_brief(at_t1),
        "score": at_t1["avg"] - base["best_avg"],
        "pass1_gain_at_T1": at_t1["pass@1"] - base["t1"]["pass@1"],
    }
    if job.first is None:
        at_best = _scores(sweep_dir, base["best_temperature"])
        scored["pass1_fall_at_base_best_T"] = base["best_pass@1"] - at_best["pass@1"]
        scored["mechanism_holds"] = (
            round(scored["pass1_gain_at_T1"], 9) >= MECHANISM_GAIN
            and round(scored["pass1_fall_at_base_best_T"], 9) <= MECHANISM_MAX_FALL
        )
    return scored


def _scores(sweep_dir: Path, temperature: float, first: int | None = None) -> dict:
    counts, n = cell_counts(sweep_dir, temperature)
    return score_counts(counts[:first], n)


def _brief(scores: dict) -> dict:
    return {key: scores[key] for key in ("pass@1", "pass@8", "pass@32", "avg")}


def _base_scores(sweep_dir: Path, template: DemoRecipe, first: int | None) -> dict:
    best_t, best = best_temperature(sweep_dir, template.temperatures, first)
    return {
        "questions": first or template.val_questions,
        "best_temperature": best_t,
        "best_avg": best["avg"],
        "best_pass@1": best["pass@1"],
        "best": _brief(best),
        "t1": _brief(_scores(sweep_dir, 1.0, first)),
    }


def _stage2_summary(runs: list[dict]) -> dict:
    scores = [r["score"] for r in runs]
    return {
        "runs": runs,
        "score_mean": sum(scores) / len(scores),
        "score_min": min(scores),
        "mechanism_holds": all(r["mechanism_holds"] for r in runs),
    }


def _choose(rows: list[dict]) -> dict:
    """Best mean stage-2 score among schedules whose mechanism holds on validation."""
    confirmed = [r for r in rows if r["stage2"] is not None]
    eligible = [r for r in confirmed if r["stage2"]["mechanism_holds"]] or confirmed
    best = max(eligible, key=lambda r: (r["stage2"]["score_mean"], r["stage2"]["score_min"]))
    for row in rows:
        row["chosen"] = row is best
    return {
        "name": best["name"],
        "schedule": best["schedule"],
        "mechanism_holds_on_val": best["stage2"]["mechanism_holds"],
        "score_mean": best["stage2"]["score_mean"],
        "reaches_paper_margin_on_val": best["stage2"]["score_min"] >= 0.01,
    }


# --- the table ----------------------------------------------------------------------------------
_COLUMNS = (
    "name",
    "lr",
    "rounds",
    "prompts_per_round",
    "steps_per_round",
    "tau_start",
    "tau_end",
    "anneal_fraction",
    "answers",
    "s1_pass@1",
    "s1_pass@8",
    "s1_pass@32",
    "s1_avg",
    "s1_score",
    "s2_score_mean",
    "s2_score_min",
    "s2_pass1_gain",
    "s2_pass1_fall",
    "s2_mechanism",
    "chosen",
)


def table_rows(result: dict) -> list[dict]:
    """One flat row per schedule, in stage-1 order; scores in points (0-100)."""
    out = []
    for row in result["rows"]:
        s1, s2 = row["stage1"], row["stage2"]
        flat = {
            "name": row["name"] + (" (reference)" if row["reference"] else ""),
            **row["schedule"],
            "answers": row["answers"],
            **{f"s1_{k}": _points(s1[k]) for k in ("pass@1", "pass@8", "pass@32", "avg")},
            "s1_score": 100 * s1["score"],
        }
        flat["anneal_fraction"] = round(flat["anneal_fraction"], 3)
        if s2 is not None:
            flat |= {
                "s2_score_mean": 100 * s2["score_mean"],
                "s2_score_min": 100 * s2["score_min"],
                "s2_pass1_gain": 100 * sum(r["pass1_gain_at_T1"] for r in s2["runs"]) / len(s2["runs"]),
                "s2_pass1_fall": 100 * max(r["pass1_fall_at_base_best_T"] for r in s2["runs"]),
                "s2_mechanism": s2["mechanism_holds"],
            }
        flat["chosen"] = row.get("chosen", False)
        out.append(flat)
    return out


def _points(value: float | None) -> float | None:
    return None if value is None else 100 * value  # pass@32 is None with n < 32 (toy runs)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 0.01 else f"{value:.2f}"
    return str(value)


def search_markdown(result: dict) -> str:
    base, budget = result["base"], result["budget"]
    rows = table_rows(result)
    lines = [
        "# SePT schedule search (validation split only)",
        "",
        f"Score = SePT AVG at T=1 minus the base's best temperature-swept AVG (points). Base on "
        f"validation: stage 1 ({base['stage1']['questions']} questions) best T = "
        f"{base['stage1']['best_temperature']}, AVG {100 * base['stage1']['best_avg']:.2f}; stage 2 "
        f"({base['stage2']['questions']} questions) best T = {base['stage2']['best_temperature']}, "
        f"AVG {100 * base['stage2']['best_avg']:.2f}, T=1 pass@1 "
        f"{100 * base['stage2']['t1']['pass@1']:.2f}.",
        f"Stage 1: one training seed ({budget['seed']}); stage 2 (top {budget['top']}): seeds "
        f"{', '.join(map(str, budget['stage2_seeds']))}, mean and min of the score, the mechanism "
        f"check (pass@1 gain at T=1 >= 5, fall at the base's best T <= 2, every seed). Budget: "
        f"<= {budget['max_answers']} SePT answers per schedule. s1_* columns: stage 1 SePT at T=1.",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in _COLUMNS) + " |" for row in rows]
    chosen = result["chosen"]
    lines += [
        "",
        f"Chosen: {chosen['name']} {chosen['schedule']} (mean stage-2 score "
        f"{100 * chosen['score_mean']:+.2f} points; mechanism on validation: "
        f"{'holds' if chosen['mechanism_holds_on_val'] else 'does not hold'}; paper margin "
        f"(+1 point on every stage-2 seed): "
        f"{'reached' if chosen['reaches_paper_margin_on_val'] else 'not reached'}).",
    ]
    return "\n".join(lines) + "\n"


def _write_tables(out: Path, result: dict) -> None:
    (out / "search.json").write_text(json.dumps(result, indent=1) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(table_rows(result))
    (out / "search.csv").write_text(buffer.getvalue())
    markdown = search_markdown(result)
    (out / "search.md").write_text(markdown)
    (out / "chosen_recipe.json").write_text(
        json.dumps(
            asdict(
                Schedule(**result["chosen"]["schedule"]).recipe(
                    DemoRecipe(
                        **{k: tuple(v) if isinstance(v, list) else v for k, v in result["template"].items()}
                    )
                )
            ),
            indent=1,
        )
        + "\n"
    )
    print("\n" + markdown, flush=True)


def _say(message: str) -> None:
    print(f"\n== {message} ==", flush=True)
