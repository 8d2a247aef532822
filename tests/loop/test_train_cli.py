"""`sept-megatron train` end to end on a tiny random-init model: 1 process, TP=2, PP=2,
kill-and-resume, ablation modes, and bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mp import free_port

pytestmark = pytest.mark.slow

ROUNDS = 3


def base_args(inputs: Path, run_dir: Path, rounds: int = ROUNDS) -> list[str]:
    return [
        f"model.hf_path={inputs / 'hf'}",
        f"data.train_files={inputs / 'train.jsonl'}",
        f"train.rounds={rounds}",
        "train.prompts_per_round=8",
        "train.mini_batch_size=4",
        "train.micro_batch_size=2",
        "data.max_response_length=16",
        "train.lr=3e-3",
        "train.warmup_steps=0",
        f"logging.run_dir={run_dir}",
        "logging.progress=false",
        "checkpoint.save_every_n_rounds=1",
    ]


def cli_command(args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "sept_megatron.cli", "train", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        "-m",
        "sept_megatron.cli",
        "train",
        *args,
    ]


def train_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(extra or {}))


def run_train(
    args: list[str],
    nproc: int = 1,
    expect_ok: bool = True,
    timeout: int = 400,
    env: dict[str, str] | None = None,
):
    proc = subprocess.run(
        cli_command(args, nproc), capture_output=True, text=True, env=train_env(env), timeout=timeout
    )
    output = proc.stdout + proc.stderr
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"train failed (rc={proc.returncode}):\n{output[-4000:]}")
    return proc.returncode, output


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def round_prompts(run_dir: Path, round_number: int) -> list[int]:
    lines = (run_dir / "samples" / f"round_{round_number:06d}.jsonl").read_text().splitlines()
    return [json.loads(line)["index"] for line in lines]


@pytest.fixture(scope="module")
def single_run(tiny_run_inputs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    run_train(
        base_args(tiny_run_inputs, run_dir)
        + [
            "train.measure_round_fit=true",
            f"eval.benchmarks={tiny_run_inputs / 'val.jsonl'}",
            "eval.every_n_rounds=2",
            "eval.n=2",
            "eval.max_questions=4",
        ]
    )
    return run_dir


def test_single_process_run_logs_every_metric(single_run):
    metrics = read_metrics(single_run)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    expected = {
        "train/loss",
        "train/grad_norm",
        "train/lr",
        "rollout/response_length_mean",
        "rollout/response_length_max",
        "rollout/truncation_rate",
        "rollout/tau_s",
        "perf/gen_tokens_per_s",
        "perf/train_tokens_per_s",
        "timing/generate",
        "timing/train",
        "timing/sync",
        "timing/checkpoint",
    }
    for m in metrics:
        assert expected <= set(m), expected - set(m)
        assert m["train/optimizer_steps"] == 2  # 8 prompts x n=1 / mini-batch 4
    assert "val/avg" in metrics[1] and "val/avg" not in metrics[0]
    taus = [m["rollout/tau_s"] for m in metrics]
    assert taus[0] == pytest.approx(0.6) and taus[-1] == pytest.approx(1.0)


def test_each_round_fits_its_own_samples(single_run):
    # The loss on a round's samples falls across that round's optimizer steps.
    for m in read_metrics(single_run):
        assert m["train/round_fit_after"] < m["train/round_fit_before"], m


def test_samples_jsonl_and_final_export(single_run):
    rows = [json.loads(l) for l in (single_run / "samples" / "round_000001.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert {"prompt", "response", "tau_s", "prompt_tokens", "response_tokens", "finish_reason"} <= set(
        rows[0]
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(single_run / "hf_final", local_files_only=True)
    assert model.config.model_type == "qwen2"
    assert (single_run / "checkpoints" / "latest").read_text().strip() == "round_000003"
    assert not list((single_run / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("layout", [("2", "1"), ("1", "2")], ids=["tp2", "pp2"])
def test_two_process_layouts_match_one_process(single_run, tiny_run_inputs, tmp_path, layout):
    tp, pp = layout
    run_train(
        base_args(tiny_run_inputs, tmp_path)
        + [
            f"parallel.tensor_parallel={tp}",
            f"parallel.pipeline_parallel={pp}",
            "checkpoint.save_every_n_rounds=0",
        ],
        nproc=2,
    )
    ours = [m["train/loss"] for m in read_metrics(tmp_path)]
    reference = [m["train/loss"] for m in read_metrics(single_run)]
    assert ours == pytest.approx(reference, abs=1e-4)


def kill_and_resume(
    inputs: Path,
    tmp_path: Path,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    rounds: int = 5,
    nproc: int = 1,
) -> tuple[Path, Path, int]:
    """An uninterrupted run, and a run killed (SIGKILL) after its round-2 checkpoint and then
    rerun with the same command; returns (reference dir, resumed dir, round resumed from)."""
    extra_args = extra_args or []
    reference = tmp_path / "reference"
    run_train(base_args(inputs, reference, rounds) + extra_args, env=env, nproc=nproc)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        cli_command(base_args(inputs, killed, rounds) + extra_args, nproc),
        env=train_env(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pointer = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and pointer.read_text().strip() >= "round_000002":
            break
        time.sleep(0.05)
    if nproc > 1:  # the node dies: every rank (torchrun starts them in sessions of their own)
        import psutil

        for rank in psutil.Process(proc.pid).children(recursive=True):
            rank.kill()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = int(pointer.read_text().strip().split("_")[1])
    assert resumed_from < rounds, "the job finished before it could be killed"
    _, output = run_train(base_args(inputs, killed, rounds) + extra_args, env=env, nproc=nproc)
    assert f"at round {resumed_from}" in output
    for r in range(resumed_from + 1, rounds + 1):
        assert round_prompts(killed, r) == round_prompts(reference, r)
    return reference, killed, resumed_from


def test_kill_and_resume_continues_with_the_same_prompts(tiny_run_inputs, tmp_path):
    rounds = 5
    reference, killed, _ = kill_and_resume(tiny_run_inputs, tmp_path, rounds=rounds)
    final = {m["round"]: m["train/loss"] for m in read_metrics(killed)}
    assert final[rounds] == pytest.approx(read_metrics(reference)[-1]["train/loss"], abs=1e-5)


def test_data_parallel_run_checkpoints_and_resumes_its_distributed_optimizer(tiny_run_inputs, tmp_path):
    """DP = 2 with the distributed optimizer (the default): the optimizer state is saved in
    Megatron's dp_reshardable format (trainer/sft.OPTIMIZER_CHECKPOINT_FORMAT; Megatron's
    default format fails to save at DP > 1 in megatron-core 0.16), and a killed run resumes:
    the same prompts, and the weights bitwise (the resumed round's first loss is the
    uninterrupted one). Known gap, on CPU without Apex/TE: the first optimizer step after the
    resume is not bitwise the uninterrupted one (the final loss differs by ~0.2%)."""
    rounds = 4
    reference, killed, resumed_from = kill_and_resume(tiny_run_inputs, tmp_path, rounds=rounds, nproc=2)
    ours = {m["round"]: m for m in read_metrics(killed)}
    theirs = {m["round"]: m for m in read_metrics(reference)}
    first = resumed_from + 1
    assert ours[first]["train/loss_first_step"] == pytest.approx(
        theirs[first]["train/loss_first_step"], abs=1e-6
    )
    assert ours[rounds]["train/loss"] == pytest.approx(theirs[rounds]["train/loss"], rel=1e-2)


@pytest.mark.parametrize("mode", ["offline", "coupled"])
def test_ablation_modes_run(tiny_run_inputs, tmp_path, mode):
    run_train(
        base_args(tiny_run_inputs, tmp_path, rounds=2) + [f"train.mode={mode}", "checkpoint.export_hf=false"]
    )
    taus = [m["rollout/tau_s"] for m in read_metrics(tmp_path)]
    if mode == "coupled":
        assert taus == [1.0, 1.0]  # tau_s = tau_t
    else:
        assert taus[0] == pytest.approx(0.6)


def test_offline_with_the_reference_sft_settings_and_validation_before_training(tiny_run_inputs, tmp_path):
    """The paper's offline row (offline.hyperparameters=sft): one optimizer step per
    offline.sequences_per_step answers, the offline section's LR; eval.before_training logs a
    validation at step 0 (issue 20)."""
    run_train(
        base_args(tiny_run_inputs, tmp_path, rounds=2)
        + [
            "train.mode=offline",
            "offline.hyperparameters=sft",
            "offline.sequences_per_step=8",
            "offline.lr=1e-3",
            "offline.warmup_ratio=0",
            "offline.temperature=0.3",
            f"eval.benchmarks={tiny_run_inputs / 'val.jsonl'}",
            "eval.before_training=true",
            "eval.n=1",
            "eval.max_questions=2",
            "checkpoint.export_hf=false",
        ]
    )
    metrics = read_metrics(tmp_path)
    rounds = [m for m in metrics if "train/loss" in m]
    assert [m["train/optimizer_steps"] for m in rounds] == [1, 1]
    assert rounds[0]["train/lr"] == pytest.approx(1e-3 * (1 + math.cos(math.pi / 2)) / 2)
    assert any(k.startswith("val") or "pass@" in k for k in metrics[0]) and "train/loss" not in metrics[0]


# --- bad input ---------------------------------------------------------------------------
def _assert_fails_cleanly(args, run_dir: Path, *needles: str):
    rc, output = run_train(args, expect_ok=False)
    assert rc != 0
    for needle in needles:
        assert needle in output, output[-3000:]
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_empty_bank_is_a_clear_error(tiny_run_inputs, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = base_args(tiny_run_inputs, tmp_path / "run") + [f"data.train_files={empty}"]
    _assert_fails_cleanly(args, tmp_path / "run", "empty.jsonl")


def test_malformed_row_is_named_by_line(tiny_run_inputs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = (tiny_run_inputs / "train.jsonl").read_text().splitlines()[:5]
    lines.insert(3, "{not json")
    bad.write_text("\n".join(lines) + "\n")
    args = base_args(tiny_run_inputs, tmp_path / "run") + [f"data.train_files={bad}"]
    _assert_fails_cleanly(args, tmp_path / "run", "bad.jsonl", "line 4")


def test_impossible_batch_sizes_fail_before_start(tiny_run_inputs, tmp_path):
    args = base_args(tiny_run_inputs, tmp_path / "run") + ["train.mini_batch_size=3"]
    _assert_fails_cleanly(args, tmp_path / "run", "train.mini_batch_size=3")
    assert not (tmp_path / "run").exists()  # rejected before anything was written


def test_checkpoint_from_another_model_is_refused(tiny_run_inputs, single_run, tmp_path):
    from hf_tiny import make_tiny_model, make_tokenizer

    tokenizer = make_tokenizer(str(tmp_path / "tok"))
    other = make_tiny_model("llama", tokenizer)
    other.save_pretrained(tmp_path / "other_hf")
    tokenizer.save_pretrained(tmp_path / "other_hf")
    args = base_args(tiny_run_inputs, tmp_path / "run") + [
        f"model.hf_path={tmp_path / 'other_hf'}",
        f"model.megatron_ckpt={single_run / 'checkpoints'}",
    ]
    _assert_fails_cleanly(args, tmp_path / "run", "another model", "model_type")


# --- GPU: the same CLI on the real CUDA path (bf16, colocated hf engine) -----------------
GPU_ARGS = ["model.params_dtype=bfloat16", "parallel.device=auto"]


@pytest.mark.gpu
def test_train_checkpoint_kill_and_resume_on_gpu(tiny_run_inputs, tmp_path, gpu_env):
    reference, killed, _ = kill_and_resume(tiny_run_inputs, tmp_path, GPU_ARGS, env=gpu_env)
    metrics = read_metrics(killed)
    assert all(m["train/loss"] == m["train/loss"] for m in metrics)  # no NaN in bf16
    # bf16 kernels need not be bitwise reproducible across processes: a loose match.
    assert metrics[-1]["train/loss"] == pytest.approx(read_metrics(reference)[-1]["train/loss"], rel=5e-2)
    assert (killed / "hf_final" / "config.json").is_file()


@pytest.mark.gpu
def test_train_tp2_matches_one_gpu(tiny_run_inputs, tmp_path, gpu_env, gpu_count):
    if gpu_count < 2:
        pytest.skip("TP=2 needs 2 GPUs")
    args = GPU_ARGS + ["checkpoint.save_every_n_rounds=0"]
    run_train(base_args(tiny_run_inputs, tmp_path / "one") + args, env=gpu_env)
    run_train(
        base_args(tiny_run_inputs, tmp_path / "tp2") + args + ["parallel.tensor_parallel=2"],
        nproc=2,
        env=gpu_env,
    )
    ours = [m["train/loss"] for m in read_metrics(tmp_path / "tp2")]
    reference = [m["train/loss"] for m in read_metrics(tmp_path / "one")]
    assert ours == pytest.approx(reference, rel=5e-2)
