"""Put on PYTHONPATH of a test job (tests/runtime/distributed/test_slurm.py): every training rank
(``SLURM_PROCID`` set) spawns a child process that, like SGLang's scheduler processes, has no
USR1 handler and so dies on USR1. When the rank exits it writes the child's state to
``$SEPT_TEST_CHILD_DIR/rank<R>-restart<N>.txt``: ``alive``, or the signal that ended it.
"""

import os

if (
    os.environ.get("SEPT_TEST_CHILD_DIR")
    and "SLURM_PROCID" in os.environ
    and not os.environ.get("SEPT_TEST_IS_CHILD")
):
    import atexit
    import signal
    import subprocess
    import sys

    _child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import signal, time\n"
                "signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # USR1 ends it\n"
                "time.sleep(3600)"
            ),
        ],
        env=dict(os.environ, SEPT_TEST_IS_CHILD="1"),
    )

    def _record_child() -> None:
        code = _child.poll()
        state = (
            "alive"
            if code is None
            else f"ended by {signal.Signals(-code).name}"
            if code < 0
            else f"exited {code}"
        )
        name = f"rank{os.environ['SLURM_PROCID']}-restart{os.environ.get('SLURM_RESTART_COUNT', '0')}.txt"
        with open(os.path.join(os.environ["SEPT_TEST_CHILD_DIR"], name), "w") as out:
            out.write(state)
        _child.kill()

    atexit.register(_record_child)
