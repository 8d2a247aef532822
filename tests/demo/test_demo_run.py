"""`sept-megatron demo` end to end at toy scale: every phase runs and the report is complete;
the report's arithmetic (pass@k curves, targets, mean and spread over seeds) on known counts."""

import json

import pytest
from mp import run_python
from toy_demo import toy_script

from sept_megatron.demo.run import DemoRecipe, score_counts, summarise_seeds, targets
from sept_megatron.eval.metrics import pass_at_k

SCRIPT = toy_script('run_seeds(out, [0, 1], True, DEMO, BASE, cache_dir=cache, wandb_mode="disabled")')


@pytest.mark.slow
def test_demo_writes_report_table_and_plot_per_seed_and_a_summary(tmp_path):
    script = tmp_path / "toy_demo.py"
    script.write_text(SCRIPT)
    out = tmp_path / "demo"
    result = run_python(str(script), str(out), str(tmp_path / "cache"), timeout=900)
    for seed in (0, 1):
        run = out / f"seed-{seed}"
        report = json.loads((run / "report.json").read_text())
        assert report["seed"] == seed
        assert set(report["baseline"]) >= {"temperature", "pass@1", "pass@8", "avg", "t1", "curve"}
        assert report["baseline"]["temperature"] in (0.0, 1.0)
        assert len(report["sept"]["curve"]) == 8 and len(report["baseline"]["t1"]["curve"]) == 8
        assert report["sept"]["curve"][0] == pytest.approx(report["sept"]["pass@1"])
        assert set(report["sept"]) >= {"pass@1", "pass@8", "avg", "at_base_best_temperature"}
        assert {"offline", "coupled", "em", "grpo"} <= set(report)
        assert "| GRPO, T = 1.0 |" in (run / "report.md").read_text()
        # GRPO: grpo_n = 8 answers to each of 16 / 8 questions per round, graded.
        grpo_rows = (run / "grpo" / "samples" / "round_000001.jsonl").read_text().splitlines()
        assert len(grpo_rows) == 16 and '"reward"' in grpo_rows[0]
        assert set(report["wall_time_s"]) >= {
            "base_model",
            "baseline_sweep",
            "sept_train",
            "sept_eval",
            "total",
        }
        assert {"mechanism_holds", "paper_claim_holds"} <= set(report["targets"])
        assert (run / "report.png").stat().st_size > 10_000
        assert "| SePT, T = 1.0 |" in (run / "report.md").read_text()
        # The SePT run went through the train code path: Megatron checkpoint + HF export.
        assert (run / "sept" / "checkpoints" / "latest").exists()
        assert (run / "sept" / "hf_final" / "config.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    gains = summary["stats"]["mechanism: pass@1 gain at T=1"]
    assert len(gains["values"]) == 2 and gains["min"] <= gains["mean"] <= gains["max"]
    assert (out / "summary.png").stat().st_size > 10_000
    assert "mean +- std" in result.output and "holds on" in result.output
    # Seeds differ in the SePT run's data order and sampling: not two copies of one run.
    samples = [(out / f"seed-{s}" / "sept" / "samples" / "round_000001.jsonl").read_text() for s in (0, 1)]
    assert samples[0] != samples[1]


def test_score_counts_gives_the_project_metrics_and_the_pass_at_k_curve():
    counts, n = [0, 1, 16, 32], 32
    scores = score_counts(counts, n)
    assert len(scores["curve"]) == 32
    for k in (1, 8, 32):
        expected = sum(pass_at_k(n, c, k) for c in counts) / 4
        assert scores[f"pass@{k}"] == pytest.approx(expected) == pytest.approx(scores["curve"][k - 1])
    assert scores["avg"] == pytest.approx((scores["pass@1"] + scores["pass@8"] + scores["pass@32"]) / 3)
    assert all(a <= b for a, b in zip(scores["curve"], scores["curve"][1:]))
    greedy = score_counts([1, 0, 1, 1], 1)  # temperature 0: one sample, pass@k = pass@1
    assert greedy["curve"] == [0.75] * 32 and greedy["avg"] == pytest.approx(0.75)
    few = score_counts([2, 0], 8)  # n < 32: AVG over pass@1 and pass@8 only
    assert few["pass@32"] is None and len(few["curve"]) == 8


def _report(seed, base_t1, base_best, sept_t1, sept_at_best, base_avg, sept_avg):
    return {
        "seed": seed,
        "baseline": {
            "temperature": 0.6,
            "pass@1": base_best,
            "avg": base_avg,
            "t1": {"pass@1": base_t1, "curve": [base_t1]},
            "curve": [base_best],
        },
        "sept": {
            "pass@1": sept_t1,
            "pass@8": 0.7,
            "pass@32": 0.8,
            "avg": sept_avg,
            "at_base_best_temperature": {"pass@1": sept_at_best},
            "curve": [sept_t1],
        },
        "recipe": {},
        "wall_time_s": {"total": 1.0},
    }


def test_targets_and_the_summary_over_seeds():
    exactly = _report(
        0, base_t1=0.30, base_best=0.40, sept_t1=0.35, sept_at_best=0.38, base_avg=0.60, sept_avg=0.61
    )
    exactly["targets"] = targets(exactly)
    assert exactly["targets"]["mechanism_holds"] and exactly["targets"]["paper_claim_holds"]
    short = _report(
        1, base_t1=0.30, base_best=0.40, sept_t1=0.349, sept_at_best=0.41, base_avg=0.60, sept_avg=0.609
    )
    short["targets"] = targets(short)
    assert not short["targets"]["mechanism_holds"] and not short["targets"]["paper_claim_holds"]
    fell = _report(
        2, base_t1=0.30, base_best=0.40, sept_t1=0.40, sept_at_best=0.379, base_avg=0.60, sept_avg=0.65
    )
    fell["targets"] = targets(fell)
    assert not fell["targets"]["mechanism_holds"] and fell["targets"]["paper_claim_holds"]
    summary = summarise_seeds([exactly, short, fell])
    assert summary["mechanism_holds_on"] == 1 and summary["paper_claim_holds_on"] == 2
    margin = summary["stats"]["paper: SePT T=1 AVG - base best AVG"]
    assert margin["values"] == pytest.approx([0.01, 0.009, 0.05])
    assert margin["mean"] == pytest.approx(0.023) and margin["std"] == pytest.approx(0.0233880, rel=1e-4)
    assert (margin["min"], margin["max"]) == pytest.approx((0.009, 0.05))
    # With fewer than 32 samples there is no pass@32: that figure is left out, the rest stays.
    toy = _report(
        3, base_t1=0.30, base_best=0.40, sept_t1=0.35, sept_at_best=0.38, base_avg=0.60, sept_avg=0.61
    )
    toy["sept"]["pass@32"] = None
    toy["targets"] = targets(toy)
    stats = summarise_seeds([exactly, toy])["stats"]
    assert "SePT T=1 pass@32" not in stats and stats["SePT T=1 pass@1"]["values"] == [0.35, 0.35]


def test_recipe_is_checked_before_any_work():
    with pytest.raises(ValueError, match="mini_batch_size"):
        DemoRecipe(prompts_per_round=64, mini_batch_size=48).validate()
    with pytest.raises(ValueError, match="temperatures"):
        DemoRecipe(temperatures=(0.0, 0.6)).validate()


def test_a_finished_seed_is_reused_only_with_the_same_recipes(tmp_path):
    from dataclasses import asdict, replace

    from sept_megatron.demo.base_model import BaseModelRecipe
    from sept_megatron.demo.run import _finished_report

    recipe, base = DemoRecipe(), BaseModelRecipe()
    run = tmp_path / "seed-3"
    run.mkdir()
    (run / "report.json").write_text(
        json.dumps({"seed": 3, "recipe": asdict(recipe), "base_recipe": asdict(base)})
    )
    assert _finished_report(run, 3, False, recipe, base)["seed"] == 3
    assert _finished_report(run, 3, True, recipe, base) is None  # asked for ablations it lacks
    assert _finished_report(run, 3, False, replace(recipe, lr=2e-4), base) is None
    assert _finished_report(run, 3, False, recipe, replace(base, seed=base.seed + 1)) is None
    assert _finished_report(tmp_path / "seed-4", 4, False, recipe, base) is None
