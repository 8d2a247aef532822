"""One gpu-marked test at a time per machine, however the suite is launched.

Several gpu tests take tens of GB each; run side by side (``pytest -n 8``) they ran an H200 out
of memory (seen as OOM and as NCCL "unhandled cuda error", ``../shared/notes/gpu-h200.md``).
So a pytest process holds an exclusive ``flock`` on one lock file from the set-up of its
first gpu test of a module (module-scoped fixtures that launch GPU workers included) to the
tear-down of that module's last test it runs, and a process waiting for it just blocks:
``pytest -m gpu -n 8`` then runs one module's GPU work at a time. The kernel drops
the lock when its holder exits, so a killed test never leaves it held.

The file is ``$SEPT_GPU_TEST_LOCK``, default ``<tmpdir>/sept-megatron-gpu-tests.lock``: one per
machine (set it per GPU to run tests on several GPUs at once, with ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def gpu_lock_path() -> Path:
    return Path(
        os.environ.get("SEPT_GPU_TEST_LOCK") or Path(tempfile.gettempdir()) / "sept-megatron-gpu-tests.lock"
    )


def _release_cached_cuda_memory() -> None:
    """An in-process gpu test leaves tensors in torch's caching allocator; hand them back
    before the next test (possibly in another pytest-xdist worker) gets the GPU."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        import gc

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def exclusive_gpu(path: Path | None = None) -> Iterator[None]:
    """Hold the machine's gpu-test lock for the duration of the block (waits for it)."""
    path = path or gpu_lock_path()
    with open(path, "a+") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            _release_cached_cuda_memory()
            fcntl.flock(lock_file, fcntl.LOCK_UN)


class ModuleGpuLock:
    """The lock as the test protocol takes it (``conftest.pytest_runtest_protocol``): taken
    before a gpu test's set-up, kept while the next test this process runs is in the same
    module (its module fixtures may still hold GPU memory), released after the module's
    last one."""

    def __init__(self) -> None:
        self._held: contextlib.ExitStack | None = None

    @property
    def held(self) -> bool:
        return self._held is not None

    def before(self, needs_gpu: bool) -> None:
        if needs_gpu and self._held is None:
            stack = contextlib.ExitStack()
            stack.enter_context(exclusive_gpu())
            self._held = stack

    def after(self, same_module_next: bool) -> None:
        if self._held is not None and not same_module_next:
            self._held.close()
            self._held = None
