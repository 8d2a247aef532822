"""rollout.timeout_minutes: a rank whose rollout waits on an engine that hangs ends, non-zero,
within the deadline, with an error naming the engine group (a process per case: the deadline
ends the process, as it must when the wait is inside C code)."""

import subprocess
import sys
import textwrap
import time

from mp import REPO_ROOT

HANGING_ROLLOUT = textwrap.dedent("""
    import threading
    from sept_megatron.rollout.base import SamplingParams
    from sept_megatron.rollout.orchestration import DataParallelEngines
    from sept_megatron.rollout.placement import EngineGroup, Placement

    class HangingEngine:
        shard_sequences = 1

        def generate(self, prompts, sampling):
            threading.Event().wait()  # a dead peer: never answers

    engines = DataParallelEngines(Placement((EngineGroup(0, (0,)),), rank=0), HangingEngine(),
                                  timeout_minutes={minutes})
    engines.generate([[1, 2, 3]], SamplingParams(temperature=1.0, n=1, max_new_tokens=4))
    print("returned")
""")


def run_rollout(minutes: float, limit_s: float = 120) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", HANGING_ROLLOUT.format(minutes=minutes)],
        capture_output=True,
        text=True,
        timeout=limit_s,
        cwd=REPO_ROOT,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def test_a_hanging_engine_ends_the_process_within_the_deadline():
    rc, output, seconds = run_rollout(minutes=0.05)  # 3 s
    assert rc == 1, output
    assert "returned" not in output
    assert "rollout timed out: no answer from engine group 0 (ranks 0)" in output
    assert "rollout.timeout_minutes=0.05" in output
    assert seconds < 60, seconds  # start-up + 3 s, on a loaded machine


def test_an_answer_in_time_cancels_the_deadline():
    from sept_megatron.rollout.watchdog import rollout_deadline

    with rollout_deadline(0.02, "engine group 0"):  # 1.2 s
        pass
    time.sleep(2)  # still alive: the timer was cancelled when the block ended
