"""A deadline on the rollout: an engine that died or hangs ends the job, loudly, in bounded time.

A rank waiting on an engine is usually blocked inside C code: the hf engine's ``generate`` on
its owner, an SGLang engine's scheduler behind ZMQ, or the answers' all-gather (gloo/NCCL) on
every other rank. Nothing raised into the main thread is seen there, so the deadline is a
timer thread that prints which engine group the rank was waiting on and ends the process
(``os._exit``), as NCCL's own watchdog does on a collective timeout; the launcher (torchrun,
srun --kill-on-bad-exit) then ends the other ranks, and the rerun resumes from the last
checkpoint. Every rank arms the same deadline, so each one fails within
``rollout.timeout_minutes`` even without a launcher. An SGLang HTTP server that dies or hangs
is an error of the request itself (the client's ``ServerError``, an :class:`EngineDied`
naming the server; socket timeout ``rollout.timeout_minutes``).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_ROLLOUT_TIMEOUT = 1


class EngineDied(RuntimeError):
    """A rollout engine (an SGLang server, ...) is gone or gave no answer in time; the message
    names it. The run stops; rerunning it resumes from the last checkpoint."""


def timeout_message(waiting_on: str, minutes: float) -> str:
    return (
        f"rollout timed out: no answer from {waiting_on} within "
        f"rollout.timeout_minutes={minutes:g}; the engine died or hangs. The job ends; "
        "rerun the same command to resume from the last checkpoint"
    )


@contextmanager
def rollout_deadline(minutes: float | None, waiting_on: str) -> Iterator[None]:
    """Within the block, this process ends (exit 1, message on stderr) after ``minutes``."""
    if not minutes:
        yield
        return
    timer = threading.Timer(minutes * 60.0, _expire, args=(waiting_on, minutes))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _expire(waiting_on: str, minutes: float) -> None:
    rank = os.environ.get("RANK", "0")
    print(
        f"sept-megatron train: error (rank {rank}): {timeout_message(waiting_on, minutes)}",
        file=sys.stderr,
        flush=True,
    )
    # Our own helpers (a background checkpoint writer, its queue's manager) would outlive an
    # os._exit and keep the job's output open: end them first. The save is never published.
    for child in multiprocessing.active_children():
        child.kill()
    os._exit(EXIT_ROLLOUT_TIMEOUT)
