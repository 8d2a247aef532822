"""The loop hands the colocated engine's GPU memory to Megatron for the SFT steps; the sync
loads the new weights (an SGLang engine resumes its weights first) and the engine's memory is
resumed after it; model.attention and train.recompute reach the model the loop
builds. One `sept-megatron train` run (2 rounds) with the engine's and the sync's calls recorded. On CPU the
release / resume calls are no-ops of the hf engine; tests/rollout/test_engine_memory_gpu.py
checks what they do on CUDA."""

import json

import pytest
from mp import run_python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recorded(tiny_run_inputs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("engine_calls")
    out = run_dir / "calls.json"
    run_python(
        "tests/loop/_engine_calls.py",
        out,
        f"model.hf_path={tiny_run_inputs / 'hf'}",
        f"data.train_files={tiny_run_inputs / 'train.jsonl'}",
        "train.rounds=2",
        "train.prompts_per_round=4",
        "train.mini_batch_size=4",
        "train.micro_batch_size=2",
        "data.max_response_length=8",
        f"logging.run_dir={run_dir / 'run'}",
        "logging.progress=false",
        "checkpoint.export_hf=false",
        "model.attention=unfused",
        "train.recompute=full",
    )
    return json.loads(out.read_text())


def test_engine_memory_is_released_for_training_and_resumed_after_the_sync(recorded):
    assert recorded["rc"] == 0
    # On CPU the sync writes straight into the engine's weights (weight_sync.direct):
    # the engine binds them to the trainer's shared buffer once, then sees no call at all.
    assert recorded["calls"] == [
        "generate",
        "release_memory",
        "sync",
        "bind_weights",
        "resume_memory",
        "generate",
        "release_memory",
        "sync",
        "resume_memory",
    ]


def test_attention_and_recompute_settings_reach_the_model(recorded):
    assert recorded["model"] == {
        "core_attention": "DotProductAttention",
        "recompute_granularity": "full",
        "recompute_method": "uniform",
    }
