"""`sept-megatron eval --wandb-mode offline` on a tiny hf model: the sweep's table, charts,
PNG and best temperature, read back from the offline run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wandb_offline import read_offline_run

from sept_megatron.eval import cli
from sept_megatron.eval.dashboard import sweep_curves, sweep_table


def write_benchmark(path: Path, count: int) -> Path:
    lines = [
        json.dumps({"question": f"[{path.stem}-{i}] what is {i}*{i}?", "answer": str(i * i)})
        for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_eval_logs_table_curves_png_and_best_temperature(tmp_path: Path) -> None:
    from hf_tiny import make_tiny_model, make_tokenizer

    tokenizer = make_tokenizer(tmp_path / "tok")
    make_tiny_model("qwen2", tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    benches = [write_benchmark(tmp_path / "alpha.jsonl", 3), write_benchmark(tmp_path / "beta.jsonl", 2)]
    out = tmp_path / "base-sweep"
    argv = [
        "--model",
        str(tmp_path / "model"),
        "--benchmarks",
        ",".join(map(str, benches)),
        "--temperatures",
        "0,1",
        "--n",
        "32",
        "--max-new-tokens",
        "3",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--grading-workers",
        "0",
        "--wandb-mode",
        "offline",
        "--wandb-group",
        "exp-7",
        "--wandb-job-type",
        "eval-base",
    ]
    assert cli.main(argv) == 0
    summary = json.loads((out / "results.json").read_text())
    run = read_offline_run(out)
    assert (run.group, run.job_type) == ("exp-7", "eval-base")

    columns, rows = run.table(run.summary["eval/pass_at_k"])
    assert columns == [
        "benchmark",
        "temperature",
        "pass@1",
        "pass@2",
        "pass@4",
        "pass@8",
        "pass@16",
        "pass@32",
        "mean_response_tokens",
        "truncated_fraction",
    ]
    assert [(r[0], r[1]) for r in rows] == [("alpha", 0.0), ("alpha", 1.0), ("beta", 0.0), ("beta", 1.0)]
    assert rows[3][2] == pytest.approx(summary["cells"]["beta"]["1.0"]["pass@1"])
    assert rows[1][7] == pytest.approx(summary["cells"]["alpha"]["1.0"]["pass@32"])

    # The W&B line charts: pass@1/8/32 and AVG against temperature, and per benchmark.
    charts = run.config["_wandb"]["visualize"]
    assert {
        "eval/curves",
        "eval/pass@1_by_benchmark",
        "eval/pass@8_by_benchmark",
        "eval/pass@32_by_benchmark",
    } <= set(charts)
    _, points = run.table(run.summary["eval/curves_table"])
    lines = {(key, x): y for x, key, y in points}
    assert set(key for key, _ in lines) == {"mean pass@1", "mean pass@8", "mean pass@32", "AVG"}
    assert lines[("AVG", 1.0)] == pytest.approx(summary["avg"]["1.0"])
    assert lines[("mean pass@8", 0.0)] == pytest.approx(summary["mean"]["0.0"]["pass@8"])

    image = run.summary["eval/sweep"]
    assert image["_type"] == "image-file" and (run.run_dir / "files" / image["path"]).stat().st_size > 1000
    assert run.summary["eval/best_temperature"] == summary["best_temperature"]
    assert run.summary["eval/best_avg"] == pytest.approx(summary["best_avg"])
    assert not (out / "config.json").exists()  # eval keeps its own eval_args.json


def test_sweep_table_and_curves_leave_missing_ks_out() -> None:
    summary = {
        "benchmarks": ["a"],
        "temperatures": [0.0, 1.0],
        "avg": {"0.0": 0.5, "1.0": 0.4},
        "mean": {"0.0": {"pass@1": 0.5}, "1.0": {"pass@1": 0.3, "pass@8": 0.6}},
        "cells": {
            "a": {
                "0.0": {"pass@1": 0.5, "mean_response_tokens": 3.0, "truncated_fraction": 0.0},
                "1.0": {"pass@1": 0.3, "pass@8": 0.6, "mean_response_tokens": 4.0, "truncated_fraction": 0.5},
            }
        },
    }
    columns, rows = sweep_table(summary)
    assert columns == [
        "benchmark",
        "temperature",
        "pass@1",
        "pass@8",
        "mean_response_tokens",
        "truncated_fraction",
    ]
    assert rows == [["a", 0.0, 0.5, None, 3.0, 0.0], ["a", 1.0, 0.3, 0.6, 4.0, 0.5]]
    assert sweep_curves(summary) == {"mean pass@1": [0.5, 0.3], "mean pass@8": [None, 0.6], "AVG": [0.5, 0.4]}


def test_eval_rejects_an_over_long_wandb_group(tmp_path: Path, capsys) -> None:
    bench = write_benchmark(tmp_path / "alpha.jsonl", 2)
    with pytest.raises(SystemExit):
        cli.parse_args(
            [
                "--model",
                str(tmp_path),
                "--benchmarks",
                str(bench),
                "--out",
                str(tmp_path / "o"),
                "--wandb-group",
                "g" * 129,
            ]
        )
    assert "argument --wandb-group: must be 1 to 128 characters" in capsys.readouterr().err
