"""A job whose rank dies or hangs mid-round ends on every rank, non-zero, in bounded time.

Two ranks of a tiny TP=2 run (so that every training step needs both), one of them taken out
after round 1 has been logged, i.e. during round 2:

- under torchrun, rank 1 killed: the launcher ends rank 0 and exits non-zero at once;
- without any launcher (two plain processes, as on nodes whose launcher cannot see each other):
  rank 1 killed, rank 0 notices the closed connection and exits non-zero on its own; rank 1
  frozen (SIGSTOP, a hung node), rank 0 fails when its collective times out after
  ``parallel.timeout_minutes``.

The Slurm variant (srun --kill-on-bad-exit) is in test_slurm.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from loop.test_train_cli import base_args
from mp import free_port

pytestmark = pytest.mark.slow

TIMEOUT_MINUTES = 0.25  # 15 s: the hang test waits this long
START_TIMEOUT_S = 400  # two ranks starting on a loaded 2-core machine
ENDS_WITHIN_S = 60  # after the failure, every rank must be gone by then


def endless_args(inputs: Path, run_dir: Path) -> list[str]:
    """A run that would last far longer than the test: it must be ended by the failure."""
    return base_args(inputs, run_dir, rounds=1000) + [
        "parallel.tensor_parallel=2",
        f"parallel.timeout_minutes={TIMEOUT_MINUTES}",
        # a peer can hang while the survivor waits on the rollout's exchange, which
        # rollout.timeout_minutes bounds (a gloo group of its own)
        f"rollout.timeout_minutes={TIMEOUT_MINUTES}",
        "checkpoint.save_every_n_rounds=0",
        "checkpoint.export_hf=false",
    ]


def rank_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")
    }
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **extra)
    return env


def wait_for_round_one(run_dir: Path, procs: list[subprocess.Popen]) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (metrics.exists() and metrics.read_text().strip()):
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead, f"a process ended before round 1: {dead}"
        assert time.monotonic() < deadline, "round 1 was not logged in time"
        time.sleep(0.2)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> float:
    """Seconds until every process has exited; fails (after killing them) past ``timeout``."""
    start = time.monotonic()
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"still running {timeout:.0f} s after the failure: {proc.args[:4]}")
    return time.monotonic() - start


def test_torchrun_ends_every_rank_when_one_dies(tiny_run_inputs, tmp_path):
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            f"--master-port={free_port()}",
            "-m",
            "sept_megatron.cli",
            "train",
            *endless_args(tiny_run_inputs, run_dir),
        ],
        env=rank_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_round_one(run_dir, [launcher])
        ranks = {int(p.environ()["RANK"]): p for p in psutil.Process(launcher.pid).children()}
        assert sorted(ranks) == [0, 1]
        ranks[1].kill()
        elapsed = wait_all([launcher], ENDS_WITHIN_S)
        gone, alive = psutil.wait_procs(list(ranks.values()), timeout=5)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    assert not alive, f"ranks left running: {alive}"
    print(f"torchrun exited {launcher.returncode} {elapsed:.1f} s after rank 1 was killed")


def start_plain_ranks(inputs: Path, run_dir: Path, logs: Path) -> list[subprocess.Popen]:
    """Two ranks from RANK/WORLD_SIZE alone, no launcher watching them."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = rank_env(
            RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        with open(logs / f"rank{rank}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "sept_megatron.cli", "train", *endless_args(inputs, run_dir)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return procs


@pytest.mark.parametrize("failure", ["killed", "hung"])
def test_without_a_launcher_the_survivor_exits_non_zero_in_time(tiny_run_inputs, tmp_path, failure):
    run_dir = tmp_path / "run"
    rank0, rank1 = procs = start_plain_ranks(tiny_run_inputs, run_dir, tmp_path)
    try:
        wait_for_round_one(run_dir, procs)
        rank1.send_signal(signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
        elapsed = wait_all([rank0], ENDS_WITHIN_S)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = (tmp_path / "rank0.log").read_text(errors="replace")
    assert rank0.returncode not in (0, None), output[-3000:]
    if failure == "hung":
        # Nothing but the collective timeout can notice a peer that is alive but silent.
        assert elapsed >= TIMEOUT_MINUTES * 60 * 0.9, (elapsed, output[-3000:])
        assert "timed out" in output.lower() or "timeout" in output.lower(), output[-3000:]
    print(f"rank 0 exited {rank0.returncode} {elapsed:.1f} s after rank 1 was {failure}")
