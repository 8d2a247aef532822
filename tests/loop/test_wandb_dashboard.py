"""`sept-megatron train logging.wandb_mode=offline` on a tiny model: what the training
dashboard holds, read back from the offline run (wandb's own protobuf records)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from wandb_offline import read_offline_run

pytestmark = pytest.mark.slow


def test_training_run_logs_health_samples_validation_and_efficiency(tiny_run_inputs, tmp_path):
    run_dir = tmp_path / "exp-3"
    args = [
        f"model.hf_path={tiny_run_inputs / 'hf'}",
        f"data.train_files={tiny_run_inputs / 'train.jsonl'}",
        "train.rounds=2",
        "train.prompts_per_round=8",
        "train.mini_batch_size=4",
        "train.micro_batch_size=2",
        "data.max_response_length=16",
        "train.lr=3e-3",
        "train.warmup_steps=0",
        f"logging.run_dir={run_dir}",
        "logging.progress=false",
        "checkpoint.export_hf=false",
        f"eval.benchmarks={tiny_run_inputs / 'val.jsonl'}",
        "eval.every_n_rounds=1",
        "eval.n=2",
        "eval.max_questions=4",
        "logging.wandb_mode=offline",
        "logging.samples_every=2",
        "logging.peak_tflops=0.5",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "sept_megatron.cli", "train", *args],
        capture_output=True,
        text=True,
        timeout=400,
        env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = read_offline_run(run_dir)
    assert (run.group, run.job_type) == ("exp-3", "train")  # group: the run directory's name
    assert run.config["train"]["rounds"] == 2

    for step in (1, 2):
        row = run.history[step]
        assert {
            "train/loss",
            "train/grad_norm",
            "rollout/tau_s",
            "rollout/response_length_mean",
            "rollout/truncation_rate",
            "rollout/logprob_mean",
            "rollout/entropy_mean",
            "perf/tflops_per_gpu",
            "perf/mfu",
            "timing/train",
        } <= set(row)
        assert row["rollout/logprob_mean"] < 0 < row["rollout/entropy_mean"]
        assert row["perf/mfu"] == pytest.approx(row["perf/tflops_per_gpu"] / 0.5)
        # Validation per benchmark (the val split's data_source) against the round.
        assert any(key.startswith("val/") and key.endswith("/pass@1") for key in row)
        assert "val/avg" in row
    # JSONL and W&B carry the same scalars.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["rollout/entropy_mean"] == pytest.approx(run.history[2]["rollout/entropy_mean"])

    assert "rollout/samples" not in run.history[1]  # every 2 rounds: round 2 only
    columns, rows = run.table(run.history[2]["rollout/samples"])
    assert columns == ["question", "answer", "response_tokens", "finish_reason", "tau_s"]
    samples = [
        json.loads(line) for line in (run_dir / "samples" / "round_000002.jsonl").read_text().splitlines()
    ]
    assert len(rows) == len(samples) == 8
    assert rows == [
        [s["prompt"], s["response"], s["response_tokens"], s["finish_reason"], s["tau_s"]] for s in samples
    ]
