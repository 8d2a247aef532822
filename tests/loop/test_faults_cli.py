"""Faults of the training itself, through the real CLI on the tiny model: non-finite training
stops the run (round, step, last finite loss) without publishing a checkpoint, and
checkpoint.every_minutes saves on wall-clock time."""

import pytest
from loop.test_train_cli import base_args, read_metrics, run_train

pytestmark = pytest.mark.slow


def test_non_finite_training_stops_with_round_step_and_last_finite_loss(tiny_run_inputs, tmp_path):
    # lr=1e30: the first AdamW step throws the weights to ~1e30, every later loss is NaN.
    # 4 optimizer steps in round 1: step 1 finite, steps 2-4 skipped -> stop at the third.
    args = base_args(tiny_run_inputs, tmp_path, rounds=3) + [
        "train.lr=1e30",
        "train.prompts_per_round=16",
        "train.max_skipped_updates=3",
        "checkpoint.export_hf=false",
    ]
    rc, output = run_train(args, expect_ok=False)
    assert rc == 1, output[-3000:]
    assert "sept-megatron train: error: round 1, step 4: 3 consecutive optimizer steps" in output
    assert "last finite loss 5." in output  # the tiny model's first loss, ~ln(379)
    assert "Traceback" not in output
    root = tmp_path / "checkpoints"
    assert not (root / "latest").exists()  # no checkpoint of those weights
    assert not (tmp_path / "metrics.jsonl").exists() or not read_metrics(tmp_path)


def test_every_minutes_saves_on_wall_clock_time(tiny_run_inputs, tmp_path):
    # No round cadence; 0.001 min (60 ms) pass within every round, so every round saves.
    args = base_args(tiny_run_inputs, tmp_path, rounds=3) + [
        "checkpoint.save_every_n_rounds=0",
        "checkpoint.every_minutes=0.001",
        "checkpoint.keep_last=0",
        "checkpoint.export_hf=false",
    ]
    run_train(args)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("round_")) == [
        "round_000001",
        "round_000002",
        "round_000003",
    ]
    assert all(m["timing/checkpoint"] < 60 for m in read_metrics(tmp_path))
