"""``checkpoint.async_save`` (on by default): a job killed while a background save is in flight
keeps the previous checkpoint loadable, and resuming from it gives the same run as never
stopping."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sept_megatron.trainer import checkpoint as ckpt

pytestmark = pytest.mark.slow

ROUNDS = 3


def train_args(inputs: Path, run_dir: Path, async_save: bool) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sept_megatron.cli",
        "train",
        f"model.hf_path={inputs / 'hf'}",
        f"data.train_files={inputs / 'train.jsonl'}",
        f"train.rounds={ROUNDS}",
        "train.prompts_per_round=8",
        "train.mini_batch_size=4",
        "train.micro_batch_size=2",
        "data.max_response_length=16",
        "train.lr=3e-3",
        "train.warmup_steps=0",
        f"logging.run_dir={run_dir}",
        "logging.progress=false",
        "checkpoint.save_every_n_rounds=1",
        "checkpoint.keep_last=2",
        "checkpoint.export_hf=false",
        # async: the default (no override), so the default is what is tested
    ] + ([] if async_save else ["checkpoint.async_save=false"])


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def run_to_end(args: list[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, env=env(), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["round"]: row["train/loss"] for row in rows}


def prompts(run_dir: Path, round_number: int) -> list[int]:
    path = run_dir / "samples" / f"round_{round_number:06d}.jsonl"
    return [json.loads(line)["index"] for line in path.read_text().splitlines()]


def kill_during_a_background_save(args: list[str], root: Path) -> None:
    """Start the run; SIGKILL it (and its writer processes) once round 2's save is in flight."""
    proc = subprocess.Popen(
        args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    in_flight = root / ".tmp-round_000002"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not in_flight.exists():
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert in_flight.exists(), "the run ended before round 2's save started"


def test_kill_during_async_save_then_resume_matches_an_uninterrupted_run(tiny_run_inputs, tmp_path):
    reference = tmp_path / "reference"
    run_to_end(train_args(tiny_run_inputs, reference, async_save=False))

    run_dir = tmp_path / "async"
    root = run_dir / "checkpoints"
    kill_during_a_background_save(train_args(tiny_run_inputs, run_dir, async_save=True), root)
    # The in-flight save was never published: the pointer still names a complete checkpoint.
    latest = (root / ckpt.LATEST_FILE).read_text().strip()
    assert latest == "round_000001", latest
    assert not (root / "round_000002").exists()
    meta = ckpt.read_meta(str(root))
    assert meta.train_state["round"] == 1
    assert (root / latest / "model" / "metadata.json").is_file()

    output = run_to_end(train_args(tiny_run_inputs, run_dir, async_save=True))
    assert "at round 1" in output  # resumed from the previous checkpoint, which loaded
    for r in range(2, ROUNDS + 1):
        assert prompts(run_dir, r) == prompts(reference, r)
    # Round 1's checkpoint was written in the background while round 2 trained: resuming
    # from it reproduces the uninterrupted run, so it holds the weights of the save call.
    resumed, expected = losses(run_dir), losses(reference)
    for r in range(2, ROUNDS + 1):
        assert resumed[r] == pytest.approx(expected[r], abs=1e-5), (r, resumed, expected)
    # At exit the last save was awaited and published; pruning kept two.
    assert (root / ckpt.LATEST_FILE).read_text().strip() == f"round_{ROUNDS:06d}"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("round_")) == [
        f"round_{ROUNDS - 1:06d}",
        f"round_{ROUNDS:06d}",
    ]
    assert not list(root.glob(".tmp-*"))
