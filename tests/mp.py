"""Launch real multi-process jobs from tests: ``torchrun`` workers or a plain one-process run.

    from mp import run_torchrun, run_python
    result = run_torchrun(2, "tests/convert/_worker.py", "--out", str(tmp_path))
    result = run_python("tools/convert_hf_to_megatron.py", "--hf-dir", d, check=False)

Each launch costs several seconds of start-up (python, torch, megatron-core, transformers
imports), so a worker script should do all the work of one layout in one launch. Workers run
from the repository root with ``OMP_NUM_THREADS=1`` (the CI machine has 2 cores shared by up to
2 ranks) and ``PYTHONWARNINGS=ignore`` (megatron-core warns at import about TE and Apex).

On a non-zero exit or a timeout, :class:`LaunchError` carries the tail of the combined output, so
the failing rank's traceback shows up in the pytest report. A timed-out launch is killed as a
whole process group: no orphaned ranks keep a port or a core.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sept_megatron.runtime.distributed import free_port  # noqa: F401  (tests import it from here)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT_S = 300
TAIL_CHARS = 6000


class LaunchError(AssertionError):
    """A launched job exited non-zero or ran out of time (message ends with its output)."""


@dataclass(frozen=True)
class LaunchResult:
    returncode: int
    output: str  # stdout and stderr interleaved


def _target(script_or_module: str) -> list[str]:
    """A ``.py`` path (relative to the repo root or absolute) runs as a script, else ``-m``."""
    if script_or_module.endswith(".py"):
        path = Path(script_or_module)
        return [str(path if path.is_absolute() else REPO_ROOT / path)]
    return ["-m", script_or_module]


def _env(port: int, extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(
        os.environ,
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TOKENIZERS_PARALLELISM="false",
    )
    # A plain run must be a world of one even when pytest itself runs under a launcher.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(name, None)
    env.update(extra or {})
    return env


def _run(command: list[str], env: dict[str, str], timeout: float, check: bool, what: str) -> LaunchResult:
    proc = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank it started
        output, _ = proc.communicate()
        raise LaunchError(
            f"{what} timed out after {timeout:.0f} s; output tail:\n{output[-TAIL_CHARS:]}"
        ) from None
    if check and proc.returncode != 0:
        raise LaunchError(
            f"{what} failed (exit code {proc.returncode}); output tail:\n{output[-TAIL_CHARS:]}"
        )
    return LaunchResult(proc.returncode, output)


def run_torchrun(
    nproc: int,
    script_or_module: str,
    *args: str,
    timeout: float = DEFAULT_TIMEOUT_S,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> LaunchResult:
    """``torchrun --nproc-per-node=nproc`` on a free port; raises :class:`LaunchError` on a
    non-zero exit (unless ``check=False``) or a timeout."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        *_target(script_or_module),
        *map(str, args),
    ]
    return _run(
        command, _env(port, env), timeout, check, f"torchrun --nproc-per-node={nproc} {script_or_module}"
    )


def run_python(
    script_or_module: str,
    *args: str,
    timeout: float = DEFAULT_TIMEOUT_S,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> LaunchResult:
    """A plain ``python`` run (a world of one; MASTER_PORT set to a free port in case it
    creates a process group)."""
    command = [sys.executable, *_target(script_or_module), *map(str, args)]
    return _run(command, _env(free_port(), env), timeout, check, f"python {script_or_module}")
