"""`sept-megatron demo --search`: the draw is seeded, the choice follows the validation score,
the table is written, and the test split is never read (toy scale end to end)."""

import csv
import json
from dataclasses import replace

import pytest
from mp import run_python

from sept_megatron.demo.search import (
    REFERENCE,
    Schedule,
    SearchBudget,
    SearchSpace,
    _choose,
    draw_candidates,
    table_rows,
)


def test_draw_is_seeded_within_budget_and_starts_with_the_reference():
    space, budget = SearchSpace(), SearchBudget(candidates=8, max_answers=3072)
    drawn = draw_candidates(space, budget)
    assert drawn == draw_candidates(space, budget)
    assert drawn[0] == REFERENCE and REFERENCE not in drawn[1:]
    assert len(set(drawn)) == 9
    assert all(s.answers <= 3072 and s.tau_end >= s.tau_start for s in drawn)
    assert draw_candidates(space, replace(budget, seed=1))[1:] != drawn[1:]


def test_budget_is_checked_before_any_work():
    with pytest.raises(ValueError, match="candidates=999"):
        draw_candidates(SearchSpace(), SearchBudget(candidates=999, max_answers=1536))
    with pytest.raises(ValueError, match="stage2_seeds"):
        SearchBudget(stage2_seeds=(5, 6)).validate(200)
    with pytest.raises(ValueError, match="stage1_questions=300"):
        SearchBudget(stage1_questions=300).validate(200)


def test_schedule_becomes_a_recipe():
    from sept_megatron.demo.run import DemoRecipe

    recipe = Schedule(
        lr=3e-4,
        rounds=10,
        prompts_per_round=128,
        steps_per_round=4,
        tau_start=0.4,
        tau_end=0.8,
        anneal_fraction=1.0,
    ).recipe(DemoRecipe())
    assert (recipe.mini_batch_size, recipe.steps_per_round, recipe.lr) == (32, 4, 3e-4)
    assert (recipe.tau_start, recipe.tau_end, recipe.rounds) == (0.4, 0.8, 10)
    recipe.validate()


def _row(name, stage1, runs=None):
    stage2 = None
    if runs is not None:
        scores = [score for score, _ in runs]
        stage2 = {
            "runs": [
                {"score": s, "mechanism_holds": m, "pass1_gain_at_T1": 0.06, "pass1_fall_at_base_best_T": 0.0}
                for s, m in runs
            ],
            "score_mean": sum(scores) / len(scores),
            "score_min": min(scores),
            "mechanism_holds": all(m for _, m in runs),
        }
    return {
        "name": name,
        "schedule": {**vars(REFERENCE)},
        "answers": 1536,
        "reference": False,
        "stage1": {"pass@1": 0.3, "pass@8": 0.7, "pass@32": 0.8, "avg": 0.6, "score": stage1},
        "stage2": stage2,
    }


def test_choice_is_the_best_confirmed_score_among_schedules_whose_mechanism_holds():
    rows = [
        _row("c00", 0.05),  # best stage 1 but never confirmed: not eligible
        _row("c01", 0.02, [(0.03, False), (0.04, True)]),  # best score, mechanism fails once
        _row("c02", 0.01, [(0.01, True), (0.02, True)]),
        _row("c03", 0.00, [(0.015, True), (0.012, True)]),
    ]
    chosen = _choose(rows)
    assert chosen["name"] == "c02" and chosen["mechanism_holds_on_val"]
    assert [r["chosen"] for r in rows] == [False, False, True, False]
    assert chosen["reaches_paper_margin_on_val"]
    flat = table_rows({"rows": rows})
    assert flat[2]["chosen"] and flat[2]["s2_score_mean"] == pytest.approx(1.5)
    # Nobody passes the mechanism: the best score is taken (and flagged).
    rows = [_row("c00", 0.0, [(0.01, False)]), _row("c01", 0.0, [(0.02, False)])]
    chosen = _choose(rows)
    assert chosen["name"] == "c01" and not chosen["mechanism_holds_on_val"]


TOY_SEARCH = """
import sys
from pathlib import Path
import sept_megatron.data as data

_load = data.load_questions
def guarded(path, **kwargs):
    assert "test" not in str(path).rsplit("/", 1)[-1], f"the search read the test split: {path}"
    return _load(path, **kwargs)
data.load_questions = guarded  # before anything imports it by name

from sept_megatron.demo.base_model import BaseModelRecipe
from sept_megatron.demo.run import DemoRecipe
from sept_megatron.demo.search import Schedule, SearchBudget, SearchSpace, run_search

if __name__ == "__main__":
    out, cache = sys.argv[1], sys.argv[2]
    base = BaseModelRecipe(hidden_size=32, num_layers=2, ffn_hidden_size=64, n_train=400,
                           steps=20, batch_size=16)
    template = DemoRecipe(temperatures=(0.0, 1.0), eval_samples=8, test_questions=8,
                          val_questions=12, max_response_length=48)
    reference = Schedule(lr=1e-4, rounds=1, prompts_per_round=16, steps_per_round=2,
                         tau_start=0.6, tau_end=1.0, anneal_fraction=1.0)
    space = SearchSpace(lr=(1e-2,), rounds=(2,), prompts_per_round=(16,), steps_per_round=(1, 2),
                        tau_start=(0.5,), tau_end=(1.0,), anneal_fraction=(1.0,), reference=reference)
    budget = SearchBudget(candidates=1, max_answers=32, stage1_questions=8, top=2,
                          stage2_seeds=(7, 8), seed=7)
    run_search(out, space, budget, template, base, cache_dir=cache, jobs=2, progress=False)
    if len(sys.argv) > 3:  # resume: redo the run named there as if it had been killed mid-way
        run = Path(sys.argv[3])
        (run / "DONE").unlink()
        (run / "sept" / "metrics.jsonl").write_text('{"round": 99}\\n')
        run_search(out, space, budget, template, base, cache_dir=cache, jobs=1, progress=False)
"""


@pytest.mark.slow
def test_toy_search_writes_the_table_and_follows_the_validation_score(tmp_path):
    script = tmp_path / "toy_search.py"
    script.write_text(TOY_SEARCH)
    out = tmp_path / "search"
    result = run_python(str(script), str(out), str(tmp_path / "cache"), timeout=1500)
    search = json.loads((out / "search.json").read_text())
    rows = search["rows"]
    assert [r["name"] for r in rows] == ["c00", "c01"] and rows[0]["reference"]
    base = search["base"]["stage2"]
    assert base["best_temperature"] in (0.0, 1.0) and base["questions"] == 12
    for row in rows:  # both confirmed (top=2), each with both training seeds, on 12 questions
        runs = row["stage2"]["runs"]
        assert [r["seed"] for r in runs] == [7, 8] and {r["questions"] for r in runs} == {12}
        for r in runs:
            assert r["score"] == pytest.approx(r["avg"] - base["best_avg"])
        assert row["stage1"]["questions"] == 8
    eligible = [r for r in rows if r["stage2"]["mechanism_holds"]] or rows
    best = max(eligible, key=lambda r: (r["stage2"]["score_mean"], r["stage2"]["score_min"]))
    assert search["chosen"]["name"] == best["name"]
    assert [r["chosen"] for r in rows].count(True) == 1
    table = list(csv.DictReader((out / "search.csv").open()))
    assert len(table) == 2 and [t["chosen"] for t in table].count("True") == 1
    assert "| c00 (reference) |" in (out / "search.md").read_text()
    assert "Chosen: " + best["name"] in result.output
    chosen = json.loads((out / "chosen_recipe.json").read_text())
    assert chosen["lr"] == best["schedule"]["lr"] and chosen["rounds"] == best["schedule"]["rounds"]
    # Each schedule went through the real train path: Megatron checkpoint + HF export.
    assert len(list((out / "runs").glob("*/seed-8/sept/checkpoints/latest"))) == 2
    # Resume: finished runs and cells are reused; an unfinished run is redone from scratch.
    reference_run = out / "runs" / rows[0]["run_key"] / "seed-7"
    (reference_run / "sweep_stage1" / "stale").write_text("from the killed run")
    run_python(str(script), str(out), str(tmp_path / "cache"), str(reference_run), timeout=1500)
    assert (reference_run / "DONE").exists() and not (reference_run / "sweep_stage1" / "stale").exists()
    rounds = [json.loads(line)["round"] for line in (reference_run / "sept" / "metrics.jsonl").open()]
    assert rounds == [1]  # the reference schedule's one round, once; the killed run's log is gone
    resumed = json.loads((out / "search.json").read_text())
    assert [r["name"] for r in resumed["rows"]] == ["c00", "c01"]
    assert resumed["rows"][1]["stage2"] == rows[1]["stage2"]  # untouched run: reused as it was
