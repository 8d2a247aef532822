"""Round telemetry: TFLOP/s and MFU by the bench's formula, the peak table, memory peaks."""

from __future__ import annotations

import pytest
import torch

from sept_megatron.loop.telemetry import RoundTelemetry, device_peak_tflops, peak_tflops_for
from sept_megatron.trainer.arch import ModelArch
from sept_megatron.trainer.sft import Sample

# Qwen2-7B's shape: 7.62B parameters by HF's own count.
QWEN2_7B = ModelArch(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    num_layers=28,
    num_attention_heads=28,
    num_query_groups=4,
    head_dim=128,
    ffn_hidden_size=18944,
    norm_eps=1e-6,
    rope_theta=1e6,
    rope_scaling_factor=None,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
    qkv_bias=True,
    qk_layernorm=False,
)


def telemetry(peak=None, extra=False) -> RoundTelemetry:
    return RoundTelemetry.for_run(
        QWEN2_7B, world_size=8, device=torch.device("cpu"), peak_tflops=peak, measure_round_fit=extra
    )


def test_tflops_and_mfu_follow_6n_plus_attention_per_token():
    meter = telemetry(peak=989.4)
    assert meter.params == 7_615_616_512  # the published parameter count of Qwen2-7B
    samples = [Sample([1] * 100, [2] * 412), Sample([1] * 24, [2] * 1000)]
    by_hand = sum(s * (6 * meter.params + 12 * 28 * 28 * 128 * s) for s in (512, 1024))
    assert meter.train_flops(samples) == pytest.approx(by_hand)
    figures = meter.throughput(samples, train_seconds=2.0)
    assert figures["perf/tflops_per_gpu"] == pytest.approx(by_hand / 2.0 / 8 / 1e12)
    assert figures["perf/mfu"] == pytest.approx(figures["perf/tflops_per_gpu"] / 989.4)
    # Two extra forward passes (train.measure_round_fit) count as 2/3 of a training pass.
    assert telemetry(extra=True).train_flops(samples) == pytest.approx(by_hand * 5 / 3)
    assert "perf/mfu" not in telemetry(peak=None).throughput(samples, 2.0)  # CPU, no flag


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H20", 148.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.1),
        ("NVIDIA L4", 121.0),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA GB200", 2500.0),
        ("Tesla T4", None),
    ],
)
def test_peak_table_matches_the_longest_name_first(name, peak):
    assert peak_tflops_for(name) == peak


def test_configured_peak_wins_and_cpu_has_none():
    assert device_peak_tflops(123.0, torch.device("cpu")) == 123.0
    assert device_peak_tflops(None, torch.device("cpu")) is None


def test_memory_phases_record_nothing_on_cpu():
    sink: dict = {}
    with telemetry().phase(sink, "train"):
        torch.ones(1000)
    assert sink == {}


@pytest.mark.gpu
def test_memory_phases_record_each_phase_peak_on_gpu():
    device = torch.device("cuda", 0)
    meter = RoundTelemetry.for_run(
        QWEN2_7B, world_size=1, device=device, peak_tflops=None, measure_round_fit=False
    )
    sink: dict = {}
    with meter.phase(sink, "generate"):
        big = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # 256 MiB
        del big
    with meter.phase(sink, "sync"):
        small = torch.empty(16 * 2**20, dtype=torch.uint8, device=device)
        del small
    assert sink["memory/generate_peak_allocated_gib"] >= 0.25
    # Reset per phase: the later phase does not inherit the earlier peak.
    assert sink["memory/sync_peak_allocated_gib"] < sink["memory/generate_peak_allocated_gib"] - 0.2
    assert sink["memory/generate_peak_reserved_gib"] >= sink["memory/generate_peak_allocated_gib"]
    assert meter.peak_tflops == peak_tflops_for(torch.cuda.get_device_name(device))
