"""Fixtures shared across test directories.

``tiny_run_inputs``: a tiny Qwen2 HF checkpoint with the demo tokenizer, and arithmetic
train/val JSONL files, built once per session (used by ``loop/`` and ``distributed/``).
``benchmark_dir``: ``../shared/data/benchmarks`` beside the repo; tests using it skip cleanly
when it is absent (the data is never copied into the repo).

The suite runs with ``SEPT_DEVICE=cpu`` and ``SEPT_COMPAT_STRICT=1`` (inherited by every
process it launches).
"""

import os
from pathlib import Path

import pytest

# CPU-path tests stay on CPU/gloo even on a GPU machine; gpu-marked tests ask for CUDA
# explicitly (SEPT_DEVICE=cuda in the environment of the processes they launch).
os.environ.setdefault("SEPT_DEVICE", "cpu")
# Strict compat: a tensor made without a device fails at collectives and model forwards on the
# CPU, as it would on CUDA (see sept_megatron/runtime/compat.py).
os.environ.setdefault("SEPT_COMPAT_STRICT", "1")


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


# --- GPU tests ---------------------------------------------------------------------------
GPU_TEST_DEVICE = os.environ.get("SEPT_GPU_TEST_DEVICE", "cuda")
"""Device the ``gpu`` tests' processes use. Developers without a GPU may set it to ``cpu`` to
check the GPU tests' own logic (files, launches, comparisons) on the CPU path; CI never does."""


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip cleanly, with one reason, where no CUDA device is visible."""
    if GPU_TEST_DEVICE != "cuda" or cuda_device_count() > 0:
        return
    skip = pytest.mark.skip(reason="gpu test: no CUDA device visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_GPU_LOCK = None  # this process's ModuleGpuLock, made on the first gpu test


def _runs_on_the_gpu(item) -> bool:
    """A gpu test that will run (not one skipped at collection for want of CUDA)."""
    return item.get_closest_marker("gpu") is not None and not any(
        mark.name == "skip" for mark in item.iter_markers()
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """gpu tests run one module at a time per machine, also under ``pytest -n``
    (``tests/gpu_lock.py``): several side by side ran the GPU out of memory."""
    global _GPU_LOCK
    if _GPU_LOCK is None and _runs_on_the_gpu(item):
        from gpu_lock import ModuleGpuLock

        _GPU_LOCK = ModuleGpuLock()
    if _GPU_LOCK is not None:
        _GPU_LOCK.before(_runs_on_the_gpu(item))
    yield
    if _GPU_LOCK is not None:
        _GPU_LOCK.after(nextitem is not None and nextitem.path == item.path)


@pytest.fixture
def gpu_env() -> dict[str, str]:
    """Environment for the processes a gpu test launches: the real CUDA path, no compat layer."""
    return {"SEPT_DEVICE": GPU_TEST_DEVICE}


@pytest.fixture
def gpu_count() -> int:
    """GPUs a gpu test may use (2 when two are visible: TP=2 variants run then)."""
    return 2 if GPU_TEST_DEVICE != "cuda" else min(2, cuda_device_count())
