"""`sept-megatron train` in the paper's baseline modes on the tiny model, through the real CLI:
EM-FT at TP = 2 and GRPO at PP = 2, each 2 rounds, killed (SIGKILL) after its first checkpoint
and resumed with the same command, continuing with the prompts an uninterrupted run draws;
and GRPO's refusals before anything starts."""

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from test_train_cli import base_args, cli_command, read_metrics, round_prompts, run_train, train_env

pytestmark = pytest.mark.slow

ROUNDS = 2
PROMPTS_PER_ROUND = 8  # as in base_args


def expected_prompts(inputs: Path, rounds: int, n: int) -> list[list[int]]:
    """The bank indices each round samples (data.shuffle_seed=0), each repeated n times:
    what an uninterrupted run writes to its samples files."""
    from sept_megatron.data import QuestionSampler, load_questions

    bank = load_questions(inputs / "train.jsonl")  # nothing is dropped: short prompts
    sampler = QuestionSampler(list(range(len(bank))), seed=0)
    return [[i for i in sampler.next_batch(PROMPTS_PER_ROUND) for _ in range(n)] for _ in range(rounds)]


def kill_after_first_checkpoint_then_resume(args: list[str], run_dir: Path, nproc: int) -> str:
    """Start the run, SIGKILL every process once round 1's checkpoint is published, rerun the
    same command; returns the resumed run's output."""
    proc = subprocess.Popen(
        cli_command(args, nproc), env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pointer = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not pointer.exists():
        time.sleep(0.05)
    # torchrun starts its ranks in sessions of their own: kill them by id, then torchrun.
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGKILL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert pointer.read_text().strip() == "round_000001", "not killed after round 1"
    _, output = run_train(args, nproc=nproc)
    assert "at round 1" in output
    return output


def test_em_ft_at_tp2_lowers_entropy_and_resumes(tiny_run_inputs, tmp_path):
    args = base_args(tiny_run_inputs, tmp_path, ROUNDS) + [
        "train.mode=em",
        "parallel.tensor_parallel=2",
        "train.measure_round_fit=true",
        "checkpoint.export_hf=false",
    ]
    kill_after_first_checkpoint_then_resume(args, tmp_path, nproc=2)
    expected = expected_prompts(tiny_run_inputs, ROUNDS, n=1)
    assert [round_prompts(tmp_path, r) for r in (1, 2)] == expected
    metrics = {m["round"]: m for m in read_metrics(tmp_path)}
    assert sorted(metrics) == [1, 2]
    for m in metrics.values():
        assert m["rollout/tau_s"] == 1.0  # coupled: answers drawn at tau_t
        assert m["train/entropy"] == pytest.approx(m["train/loss"])
        # The entropy of the round's own answers falls across its optimizer steps.
        assert m["train/round_fit_after"] < m["train/round_fit_before"], m


def test_grpo_at_pp2_logs_rewards_and_resumes(tiny_run_inputs, tmp_path):
    args = base_args(tiny_run_inputs, tmp_path, ROUNDS) + [
        "train.mode=grpo",
        "rollout.n=2",
        "train.mini_batch_size=8",
        "parallel.pipeline_parallel=2",
        "checkpoint.export_hf=false",
    ]  # 16 answers, 2 updates per round: old log-probs taken
    kill_after_first_checkpoint_then_resume(args, tmp_path, nproc=2)
    assert [round_prompts(tmp_path, r) for r in (1, 2)] == expected_prompts(tiny_run_inputs, ROUNDS, 2)
    metrics = read_metrics(tmp_path)
    assert [m["round"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {
            "rollout/reward_mean",
            "rollout/groups_all_equal",
            "train/clip_fraction",
            "train/entropy",
        } <= set(m)
        assert m["train/optimizer_steps"] == 2 and m["rollout/tau_s"] == 1.0
        assert 0 <= m["rollout/reward_mean"] <= 1 and m["train/entropy"] > 0
    rows = [
        json.loads(line) for line in (tmp_path / "samples" / "round_000002.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 16 and {"reward", "advantage"} <= set(rows[0])
    # A group whose rewards are all equal has zero advantages.
    groups = [rows[i : i + 2] for i in range(0, 16, 2)]
    equal = [g for g in groups if g[0]["reward"] == g[1]["reward"]]
    assert all(r["advantage"] == 0 for g in equal for r in g)
    assert metrics[-1]["rollout/groups_all_equal"] == len(equal) / 8


def test_grpo_with_a_kl_penalty_to_the_initial_model(tiny_run_inputs, tmp_path):
    """train.kl_coef > 0: the frozen initial model's log-probs reach the loss; the penalty is
    zero while the policy still equals it (round 1's first step) and positive once it moved."""
    run_dir = tmp_path / "kl"
    args = base_args(tiny_run_inputs, run_dir, rounds=ROUNDS) + [
        "train.mode=grpo",
        "rollout.n=2",
        "train.mini_batch_size=8",
        "train.kl_coef=0.5",
        "checkpoint.export_hf=false",
        "train.lr=3e-2",
    ]
    run_train(args)
    metrics = read_metrics(run_dir)
    assert [m["round"] for m in metrics] == [1, 2]
    kl = [m["train/kl"] for m in metrics]
    assert all(value >= 0 for value in kl) and kl[-1] > 0, kl


def test_grpo_refuses_questions_without_ground_truth(tiny_run_inputs, tmp_path):
    bank = tmp_path / "no_truth.jsonl"
    rows = [json.loads(line) for line in (tiny_run_inputs / "train.jsonl").read_text().splitlines()[:8]]
    del rows[2]["answer"]  # the demo rows' ground truth
    bank.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = base_args(tiny_run_inputs, tmp_path / "run", ROUNDS) + [
        f"data.train_files={bank}",
        "train.mode=grpo",
        "rollout.n=2",
    ]
    rc, output = run_train(args, expect_ok=False)
    assert rc != 0
    assert "no_truth.jsonl" in output and "train.mode=grpo" in output and "row 3" in output, output[-2000:]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_grpo_needs_groups_and_every_answer(tiny_run_inputs, tmp_path):
    args = base_args(tiny_run_inputs, tmp_path / "run", ROUNDS) + [
        "train.mode=grpo",
        "rollout.n=1",
        "train.drop_truncated=true",
    ]
    rc, output = run_train(args, expect_ok=False)
    assert rc != 0 and "rollout.n=1" in output and "train.drop_truncated=true" in output
