"""``sept-megatron paper-table`` on small sweep folders in the demo's / eval's results.json format."""

import json
import sys
import types

import pytest

from sept_megatron.cli import main as cli_main
from sept_megatron.eval.metrics import benchmark_metrics
from sept_megatron.eval.sweep import CellResult, summarise

N = 32
TEMPERATURES = [0.6, 1.0]


def write_sweep(folder, counts_by_temperature: dict[float, dict[str, list[int]]]) -> None:
    """A sweep's results.json from per-question correct counts (what sweep.summarise writes)."""
    results = {}
    for t, per_benchmark in counts_by_temperature.items():
        for name, counts in per_benchmark.items():
            results[(name, t)] = CellResult(
                benchmark=name,
                temperature=t,
                settings={"n": N},
                correct_counts=counts,
                metrics=benchmark_metrics(counts, N),
                mean_response_tokens=100.0,
                truncated_fraction=0.0,
            )
    benchmarks = sorted({name for per in counts_by_temperature.values() for name in per})
    summary = summarise(results, benchmarks, sorted(counts_by_temperature), N)
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(summary))


@pytest.fixture
def runs(tmp_path):
    """A base sweep whose best T is 0.6, and two trained models swept at 0.6 and 1.0."""
    write_sweep(
        tmp_path / "sweep_base", {0.6: {"a": [16, 0], "b": [32, 8]}, 1.0: {"a": [8, 0], "b": [16, 0]}}
    )
    write_sweep(
        tmp_path / "sweep_sept", {0.6: {"a": [32, 0], "b": [32, 0]}, 1.0: {"a": [32, 16], "b": [32, 8]}}
    )
    write_sweep(tmp_path / "sweep_offline", {1.0: {"a": [0, 0], "b": [32, 0]}})
    return tmp_path


def test_paper_table_prints_the_papers_layout(runs, capsys):
    code = cli_main(
        [
            "paper-table",
            str(runs / "sweep_base"),
            str(runs / "sweep_sept"),
            f"offline={runs / 'sweep_offline'}",
            "--out",
            str(runs / "table.md"),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert table == (runs / "table.md").read_text()
    lines = table.splitlines()
    assert lines[0] == "| method | T | pass@1 | pass@8 | pass@32 | AVG |"
    base = summary(runs / "sweep_base", 0.6)
    sept = summary(runs / "sweep_sept", 1.0)
    assert lines[2] == (
        "| sweep_base (baseline, best T) | 0.6 | " + " | ".join(f"{100 * v:.1f}" for v in base) + " |"
    )
    assert lines[3] == (
        "| sweep_sept | 1 | "
        + " | ".join(f"{100 * s:.1f} ({100 * (s - b):+.1f})" for s, b in zip(sept, base))
        + " |"
    )
    assert lines[4].startswith("| offline | 1 | ")


def summary(folder, t):
    stored = json.loads((folder / "results.json").read_text())
    label = f"{t:.1f}"
    return [stored["mean"][label][f"pass@{k}"] for k in (1, 8, 32)] + [stored["avg"][label]]


def test_a_temperature_that_was_not_swept_is_a_clear_error(runs, capsys):
    code = cli_main(
        ["paper-table", str(runs / "sweep_base"), str(runs / "sweep_offline"), "--temperature", "0.6"]
    )
    assert code == 2
    assert "temperature 0.6 was not swept (swept: 1.0)" in capsys.readouterr().err


def test_a_folder_without_results_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["paper-table", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_eval_general_without_lm_eval_names_the_install_command(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(SystemExit, match="pip install lm-eval"):
        cli_main(["eval-general", "--model", str(tmp_path), "--out", str(tmp_path / "out")])


def test_eval_general_runs_the_five_tasks_and_writes_their_results(tmp_path, monkeypatch):
    calls = []

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return {"results": {task: {"acc,none": 0.5} for task in kwargs["tasks"]}}

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    assert cli_main(["eval-general", "--model", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    tasks = [
        "leaderboard_ifeval",
        "leaderboard_bbh",
        "leaderboard_gpqa",
        "leaderboard_musr",
        "leaderboard_mmlu_pro",
    ]
    assert calls[0]["tasks"] == tasks and calls[0]["model"] == "hf"
    assert calls[0]["model_args"] == f"pretrained={tmp_path},dtype=bfloat16"
    written = json.loads((tmp_path / "out" / "general.json").read_text())
    assert sorted(written["results"]) == sorted(tasks)


def test_eval_general_refuses_a_folder_without_config_before_importing(tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        cli_main(["eval-general", "--model", str(tmp_path), "--out", str(tmp_path / "out")])
