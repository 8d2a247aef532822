"""`sept-megatron bench`: end to end at the tiny shape (all five benchmarks in one launch),
the JSON fields, ratios that come from the measured times, the pure helpers, and bad flags."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from sept_megatron import bench

# Small but real: every benchmark runs its real path, a couple of timed repeats each.
FAST_FLAGS = [
    "--shape",
    "tiny",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--repeats",
    "2",
    "--rounds",
    "2",
    "--gen-new-tokens",
    "8",
    "--gen-batch",
    "8",
    "--round-prompts",
    "8",
]


def run_bench(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "sept_megatron.cli", "bench", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("bench")
    proc = run_bench(FAST_FLAGS + ["--work-dir", str(work)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    parsed = [json.loads(line) for line in lines]  # stdout holds JSON lines and nothing else
    assert [r["bench"] for r in parsed] == list(bench.BENCHMARKS)
    assert "[bench " in proc.stderr  # progress goes to stderr
    return {r["bench"]: r for r in parsed}


def _positive(result: dict, *names: str) -> None:
    for name in names:
        assert isinstance(result[name], float) and result[name] > 0, (name, result[name])


@pytest.mark.slow
def test_train_line(results):
    r = results["train"]
    _positive(
        r,
        "step_s",
        "tokens_per_s",
        "tflops",
        "tflops_6n",
        "transformers_step_s",
        "transformers_tokens_per_s",
        "ratio_to_transformers",
    )
    assert (r["seq_len"], r["micro_batch"], r["device"], r["dtype"]) == (128, 4, "cpu", "float32")
    assert r["ratio_to_transformers"] == pytest.approx(r["transformers_step_s"] / r["step_s"])
    assert r["tokens_per_s"] == pytest.approx(4 * 128 / r["step_s"])
    assert r["tflops"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / 1e12)
    assert r["max_micro_batch"] is None and "CPU" in r["max_micro_batch_skipped"]
    assert r["fp8"]["skipped"] is True and r["fp8"]["reason"]


@pytest.mark.slow
def test_engine_line(results):
    r = results["engine"]
    _positive(r, "generate_s", "direct_generate_s", "tokens_per_s", "ratio_to_transformers")
    assert r["ratio_to_transformers"] == pytest.approx(r["generate_s"] / r["direct_generate_s"])
    assert r["same_tokens"] is True  # same settings and seed: the same answers
    assert 0 < r["overhead_s"] < r["generate_s"]
    assert r["overhead_share"] == pytest.approx(r["overhead_s"] / r["generate_s"])
    assert r["prompts"] == 8 and 0 < r["new_tokens"] <= 8 * 8
    _positive(r, "static_cache_generate_s", "static_cache_speedup_over_direct")
    assert r["static_cache_speedup_over_direct"] == pytest.approx(
        r["direct_generate_s"] / r["static_cache_generate_s"]
    )
    assert r["static_cache_same_tokens"] is True  # greedy: the dynamic cache's tokens


@pytest.mark.slow
def test_sync_line(results):
    r = results["sync"]
    assert (r["tensor_parallel"], r["backend"]) == (2, "gloo")
    _positive(
        r,
        "sync_s",
        "gb_per_s",
        "copy_s",
        "copy_gb_per_s",
        "ratio_to_copy",
        "tensor_copy_s",
        "ratio_to_tensor_copy",
        "bucket_sync_s",
        "ratio_bucket_to_copy",
        "barrier_s",
    )
    assert r["path"] == "direct"  # CPU ranks of one host, hf engine: no buckets
    assert r["ratio_to_copy"] == pytest.approx(r["copy_s"] / r["sync_s"])
    assert r["ratio_bucket_to_copy"] == pytest.approx(r["copy_s"] / r["bucket_sync_s"])
    assert r["gb_per_s"] == pytest.approx(r["bytes"] / r["sync_s"] / 1e9)
    assert r["tensors"] > 0 and r["bytes"] > 0
    names = [row["fn"] for row in r["profile"]["within"]]
    assert "weight_sync.sync" in names and r["profile"]["own"]


@pytest.mark.slow
def test_checkpoint_line(results):
    r = results["checkpoint"]
    _positive(
        r, "first_save_s", "sync_blocking_s", "async_blocking_s", "async_background_s", "ratio_async_to_sync"
    )
    assert r["ratio_async_to_sync"] == pytest.approx(r["async_blocking_s"] / r["sync_blocking_s"])
    assert r["bytes_on_disk"] > 0


@pytest.mark.slow
def test_round_line(results):
    r = results["round"]
    assert r["rounds"] == 2 and r["rounds_measured"] == 1
    _positive(r, "generate_s", "train_s", "sync_s", "checkpoint_s", "round_s", "loop_timing_round_s")
    assert r["other_share"] == pytest.approx(r["other_s"] / r["round_s"])
    parts = sum(r[f"{p}_s"] for p in bench.PHASES)
    assert r["round_s"] == pytest.approx(parts + r["other_s"])
    assert -0.05 < r["other_share"] < 1


# --- pure helpers (no model) -------------------------------------------------------------------
def test_side_by_side_measures_each_function():
    def sleeper(seconds):
        return lambda: time.sleep(seconds)

    times = bench.side_by_side(
        {"slow": sleeper(0.03), "fast": sleeper(0.01)},
        warmup=0,
        repeats=3,
        device=torch.device("cpu"),
        interleave=True,
    )
    ratio = min(times["slow"]) / min(times["fast"])
    assert 2 < ratio < 4, times


@pytest.mark.parametrize(
    "limit_fit,start,expected",
    [(37, 4, 37), (37, 64, 37), (1, 16, 1), (0, 16, 0), (4096, 16, 4096), (16, 16, 16)],
)
def test_largest_fitting_micro_batch(limit_fit, start, expected):
    tried = []

    def fits(m):
        tried.append(m)
        return m <= limit_fit

    assert bench.largest_fitting(fits, start=start, limit=4096) == expected
    assert len(tried) < 30


def test_parameter_count_matches_transformers(tmp_path):
    from hf_tiny import make_tiny_model, make_tokenizer

    from sept_megatron.convert.hf_config import arch_from_hf_config

    tokenizer = make_tokenizer(tmp_path)
    for family, tied in (("qwen2", True), ("llama", False), ("qwen3", False)):
        model = make_tiny_model(family, tokenizer, tie_word_embeddings=tied)
        expected = sum(p.numel() for p in model.parameters())  # shared tensors once
        assert bench.parameter_count(arch_from_hf_config(model.config)) == expected, family


def test_flops_formula_is_six_n_plus_attention():
    from sept_megatron.trainer.arch import ModelArch

    arch = ModelArch(
        model_type="qwen2",
        vocab_size=1024,
        hidden_size=1536,
        num_layers=28,
        num_attention_heads=12,
        num_query_groups=2,
        head_dim=128,
        ffn_hidden_size=8960,
        norm_eps=1e-6,
        rope_theta=1e6,
        rope_scaling_factor=None,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        qkv_bias=True,
        qk_layernorm=False,
    )
    params = bench.parameter_count(arch)
    assert 1.30e9 < params < 1.32e9  # issue 8's 1.31B shape
    assert bench.flops_per_token(arch, params, 1024) == 6 * params + 12 * 28 * 12 * 128 * 1024


def test_round_shares_from_log_intervals():
    records = [
        {"time": 100.0, **{f"timing/{p}": 9.0 for p in bench.PHASES}, "timing/round": 40},
        {
            "time": 110.0,
            "timing/generate": 4.0,
            "timing/train": 3.0,
            "timing/sync": 0.5,
            "timing/checkpoint": 1.5,
            "timing/round": 9.5,
        },
        {
            "time": 120.0,
            "timing/generate": 5.0,
            "timing/train": 3.0,
            "timing/sync": 0.5,
            "timing/checkpoint": 0.5,
            "timing/round": 9.4,
        },
    ]
    shares = bench.round_shares(records)
    assert shares["rounds_measured"] == 2 and shares["round_s"] == 10.0
    assert shares["generate_s"] == 4.5 and shares["other_s"] == 1.0
    assert shares["other_share"] == pytest.approx(0.1)
    assert shares["loop_timing_round_s"] == pytest.approx(9.45)


# --- bad flags ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--only", "train,warp"], "warp"),
        (["--only", ""], "--only"),
        (["--seq-len", "100"], "--seq-len 100"),
        (["--seq-len", "99999"], "--seq-len"),
        (["--micro-batch", "0"], "--micro-batch 0"),
        (["--steps", "0"], "--steps 0"),
        (["--rounds", "1"], "--rounds 1"),
        (["--sync-tp", "3"], "--sync-tp 3"),
        (["--round-prompts", "7"], "--round-prompts 7"),
        (["--async-checkpoint", "maybe"], "--async-checkpoint"),
        (["--device", "tpu"], "--device"),
        (["--shape", "1.5b", "--device", "cpu"], "needs a GPU"),
    ],
)
def test_bad_flags_raise_a_clear_error(flags, needle):
    with pytest.raises(bench.BenchError) as info:
        bench.parse_options(flags)
    assert needle in str(info.value)


def test_unknown_shape_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as info:
        bench.parse_options(["--shape", "7b"])
    assert info.value.code == 2
    assert "--shape: invalid choice: '7b'" in capsys.readouterr().err


def test_bad_flag_exits_2_before_building_anything(tmp_path):
    work = tmp_path / "work"
    proc = run_bench(["--micro-batch", "0", "--work-dir", str(work)], timeout=120)
    assert proc.returncode == 2
    assert "sept-megatron bench: error: --micro-batch 0" in proc.stderr
    assert proc.stdout == "" and not work.exists()


def test_cuda_request_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(bench.BenchError, match="--device 'cuda'"):
        bench.parse_options(["--device", "cuda"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_train_bench_reports_the_largest_micro_batch(tmp_path):
    env_flags = ["--device", "cuda", "--only", "train,engine", "--steps", "2", "--warmup", "1"]
    proc = run_bench(["--shape", "tiny", "--work-dir", str(tmp_path), *env_flags])
    assert proc.returncode == 0, proc.stderr[-4000:]
    train, engine = (json.loads(line) for line in proc.stdout.splitlines())
    assert train["device"].startswith("cuda") and train["dtype"] == "bfloat16"
    assert isinstance(train["max_micro_batch"], int) and train["max_micro_batch"] >= 4
    assert train["peak_memory_gb"] > 0 and train["transformers_peak_memory_gb"] > 0
    assert math.isfinite(train["ratio_to_transformers"]) and engine["same_tokens"] is True
