"""Adding a rollout backend needs no change to the package: a toy backend defined in tests/,
registered as a plugin (an entry point), runs `sept-megatron train` end to end; its own
config check is what `train` and `sept-megatron config` report; and the registry's errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sept_megatron.rollout.registry import backend_class, backend_names, register_backend

TOY = Path(__file__).resolve().parent / "toy_backend"


def toy_env(calls: Path) -> dict[str, str]:
    path = os.pathsep.join([str(TOY), os.environ.get("PYTHONPATH", "")])
    return dict(
        os.environ, PYTHONPATH=path, SEPT_TOY_CALLS=str(calls), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"
    )


def train(inputs: Path, run_dir: Path, calls: Path, *extra: str):
    args = [
        f"model.hf_path={inputs / 'hf'}",
        f"data.train_files={inputs / 'train.jsonl'}",
        "train.rounds=2",
        "train.prompts_per_round=4",
        "train.mini_batch_size=4",
        "train.micro_batch_size=2",
        "data.max_response_length=8",
        "train.warmup_steps=0",
        f"logging.run_dir={run_dir}",
        "logging.progress=false",
        "checkpoint.export_hf=false",
        "rollout.backend=toy",
        *extra,
    ]
    return subprocess.run(
        [sys.executable, "-m", "sept_megatron.cli", "train", *args],
        capture_output=True,
        text=True,
        env=toy_env(calls),
        timeout=400,
    )


@pytest.mark.slow
def test_a_plugin_backend_runs_the_loop_end_to_end(tiny_run_inputs, tmp_path):
    calls = tmp_path / "calls.jsonl"
    proc = train(tiny_run_inputs, tmp_path / "run", calls)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    names = [c["call"] for c in seen]
    # The loop's round with a bucket-taking engine: answers, memory to the trainer, weights
    # streamed in (it cannot bind shared weights), memory back.
    assert names == ["init"] + ["generate", "release_memory", "update_weights", "resume_memory"] * 2, names
    assert all(c["tensors"] > 0 for c in seen if c["call"] == "update_weights")
    assert seen[1]["temperature"] == pytest.approx(0.6)  # tau_s of round 1 reached the engine


@pytest.mark.slow
def test_the_plugin_checks_its_own_config_section(tiny_run_inputs, tmp_path):
    proc = train(tiny_run_inputs, tmp_path / "run", tmp_path / "calls.jsonl", "rollout.engine_tp=2")
    assert proc.returncode == 2
    assert "rollout.engine_tp=2: the toy backend runs one engine per rank" in proc.stderr
    assert not (tmp_path / "calls.jsonl").exists()  # refused before any engine was built


def test_register_backend_in_process(monkeypatch):
    from sept_megatron.rollout import registry

    monkeypatch.setattr(registry, "_REGISTERED", {})  # registered for this test only

    class Mine:
        @classmethod
        def check_config(cls, rollout, *, arch=None):
            return ["mine: always refuses"]

    register_backend("mine", Mine)
    assert "mine" in backend_names() and backend_class("mine") is Mine
    from sept_megatron.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match="mine: always refuses"):
        validate(load_config(None, ["model.hf_path=x", "rollout.backend=mine"]), world_size=1)


def test_unknown_backend_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"rollout.backend='nope': choose one of \[.*'hf'.*'sglang'"):
        backend_class("nope")
    with pytest.raises(ValueError, match="letters, digits"):
        register_backend("a b", object)
