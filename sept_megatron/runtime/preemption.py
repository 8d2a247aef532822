"""Stop cleanly at a round boundary when the scheduler says time is running out.

Data path: SLURM sends SIGUSR1 some minutes before the time limit (``#SBATCH
--signal=B:USR1@300`` in examples/sept.sbatch sends it to the batch shell, which forwards it to
every rank through srun; ``scancel --signal=USR1`` or ``kill -USR1`` reach ranks directly). The
handler only sets a flag: a Python signal handler must not do collective work. At the end of
each round every rank calls :meth:`StopRequest.agreed`, an all-reduce (MAX) of the flags, so all
ranks see the same answer at the same round even if the signal reached only some of them. If
any rank was asked to stop, the loop writes this round's checkpoint and raises
:class:`Preempted`; ``sept-megatron train`` exits with :data:`EXIT_PREEMPTED` and the batch
script requeues the job, which resumes from ``RUN/checkpoints/latest`` with the same command.

SIGTERM is deliberately left alone: launchers (torchrun, srun, Slurm at the time limit) send it
to end ranks now, and a rank that ignored it until a round boundary would hold the job up.
"""

from __future__ import annotations

import logging
import signal

EXIT_PREEMPTED = 75
"""EX_TEMPFAIL: stopped early with a checkpoint; run the same command again to resume."""
STOP_SIGNAL = signal.SIGUSR1

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised by the loop once the checkpoint of ``rounds_done`` rounds is written."""

    def __init__(self, rounds_done: int):
        super().__init__(
            f"stopped after round {rounds_done} on {STOP_SIGNAL.name}; the "
            "checkpoint is written: run the same command to resume"
        )
        self.rounds_done = rounds_done


class StopRequest:
    """The SIGUSR1 flag of this process (see :func:`install`)."""

    def __init__(self) -> None:
        self.received = False

    def _handle(self, signum, frame) -> None:
        log.warning("%s received: stopping after this round with a checkpoint", signal.Signals(signum).name)
        self.received = True
        # Asked once is enough. Ignoring repeats (the batch script repeats the request for
        # ranks still starting up) also covers interpreter shutdown, where Python puts back the
        # default action of handled signals, which for SIGUSR1 is to end the process.
        signal.signal(signum, signal.SIG_IGN)

    def agreed(self) -> bool:
        """Collective over the default group: True on every rank if any rank got the signal."""
        import torch
        import torch.distributed as dist

        from sept_megatron.runtime.distributed import compute_device

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.received
        flag = torch.tensor([1.0 if self.received else 0.0], device=compute_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


_installed: StopRequest | None = None


def install() -> StopRequest:
    """Install the SIGUSR1 handler once per process (main thread); later calls return it.

    ``sept-megatron train`` calls this before its slow imports, so that a signal arriving during
    start-up sets the flag instead of ending the rank (SIGUSR1's default action).
    """
    global _installed
    if _installed is None:
        _installed = StopRequest()
        signal.signal(STOP_SIGNAL, _installed._handle)
        # Restart interrupted system calls (sockets of gloo/NCCL, file I/O) instead of failing
        # them with EINTR: the handler only sets a flag.
        signal.siginterrupt(STOP_SIGNAL, False)
    return _installed
