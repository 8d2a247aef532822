"""``sept-megatron eval`` on the real CUDA path: a tiny bf16 model swept at two temperatures.
Skipped without CUDA (see tests/conftest.py)."""

import json

import pytest
from mp import run_python

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_eval_cli_on_gpu(tiny_run_inputs, tmp_path, gpu_env):
    device = gpu_env["SEPT_DEVICE"]
    out = tmp_path / "out"
    run_python(
        "sept_megatron.cli",
        "eval",
        "--model",
        str(tiny_run_inputs / "hf"),
        "--benchmarks",
        str(tiny_run_inputs / "val.jsonl"),
        "--temperatures",
        "0,1",
        "--n",
        "4",
        "--max-new-tokens",
        "16",
        "--max-questions",
        "8",
        "--out",
        str(out),
        "--device",
        device,
        "--dtype",
        "bfloat16" if device == "cuda" else "float32",
        env=gpu_env,
    )
    summary = json.loads((out / "results.json").read_text())
    cells = summary["cells"][summary["benchmarks"][0]]
    assert cells["0.0"]["n"] == 1 and cells["1.0"]["n"] == 4
    assert cells["1.0"]["num_questions"] == 8
    assert summary["best_temperature"] in (0.0, 1.0)
    assert (out / "sweep.png").is_file()
