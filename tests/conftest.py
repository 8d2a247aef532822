"""Fixtures shared across test directories.

``tiny_run_inputs``: a tiny Qwen2 HF checkpoint with the demo tokenizer, and arithmetic
train/val JSONL files, built once per session (used by ``loop/`` and ``distributed/``).
``benchmark_dir``: ``../shared/data/benchmarks`` beside the repo; tests using it skip cleanly
when it is absent (the data is never copied into the repo).

The suite runs with ``SEPT_DEVICE=cpu`` (inherited by every process it launches).
"""

import os
from pathlib import Path

import pytest

# CPU-path tests stay on CPU/gloo even on a GPU machine; gpu-marked tests ask for CUDA
# explicitly (SEPT_DEVICE=cuda in the environment of the processes they launch).
os.environ.setdefault("SEPT_DEVICE", "cpu")


@pytest.fixture(scope="session")
def benchmark_dir() -> Path:
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"
    if not path.is_dir():
        pytest.skip(f"shared benchmarks not available at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory):
    # Imported here so that collecting the fast unit tests does not import transformers.
    from hf_tiny import make_tiny_model, make_tokenizer
    from sept_megatron.demo.task import build_splits, write_jsonl

    root = tmp_path_factory.mktemp("loop_inputs")
    tokenizer = make_tokenizer(str(root / "tok"))
    model = make_tiny_model("qwen2", tokenizer)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    splits = build_splits(0, n_train=64, n_val=16, n_test=16)
    write_jsonl(splits["train"], root / "train.jsonl")
    write_jsonl(splits["val"], root / "val.jsonl")
    return root
