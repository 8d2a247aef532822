"""Run by ``test_gpu_lock.py`` in its own pytest process, with ``SEPT_GPU_TEST_DEVICE=cpu`` (so
the gpu tests run) and ``SEPT_GPU_TEST_LOCK`` pointing at the test's lock file."""

import fcntl
import os
from pathlib import Path

import pytest
from gpu_lock import gpu_lock_path


def lock_is_held() -> bool:
    """Whether someone holds the gpu-test lock (a second open file cannot take it)."""
    with open(gpu_lock_path(), "a+") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(probe, fcntl.LOCK_UN)
        return False


@pytest.fixture(scope="module")
def held_during_module_setup() -> bool:
    return lock_is_held()


def test_a_cpu_test_does_not_wait_for_the_lock():
    Path(os.environ["GPU_LOCK_PROBE_MARK"]).touch()


@pytest.mark.gpu
def test_gpu_test_and_its_module_fixture_hold_the_lock(held_during_module_setup):
    assert held_during_module_setup and lock_is_held()


@pytest.mark.gpu
def test_the_next_gpu_test_still_holds_it():
    assert lock_is_held()
