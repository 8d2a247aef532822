"""gpu-marked tests serialise themselves on one machine-wide lock (``tests/gpu_lock.py``)."""

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from mp import REPO_ROOT

PROBE = Path(__file__).with_name("_gpu_lock_probe.py")


def start_probe(lock_path: Path, mark: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "SEPT_GPU_TEST_DEVICE": "cpu",
        "SEPT_GPU_TEST_LOCK": str(lock_path),
        "GPU_LOCK_PROBE_MARK": str(mark),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "-p",
            "no:randomly",
            str(PROBE),
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_gpu_tests_hold_the_lock_and_wait_for_it(tmp_path):
    lock_path, cpu_test_ran = tmp_path / "gpu.lock", tmp_path / "cpu_test_ran"
    with open(lock_path, "a+") as held:  # another gpu test is running
        fcntl.flock(held, fcntl.LOCK_EX)
        probe = start_probe(lock_path, cpu_test_ran)
        deadline = time.monotonic() + 120
        while not cpu_test_ran.exists() and probe.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # time enough to start a gpu test, were it not waiting
        still_waiting = probe.poll() is None
        fcntl.flock(held, fcntl.LOCK_UN)
    output, _ = probe.communicate(timeout=120)
    assert cpu_test_ran.exists() and still_waiting, output
    assert probe.returncode == 0, output
    assert "3 passed" in output, output
