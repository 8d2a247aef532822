"""`sept-megatron train` on a disk that fills up: ENOSPC injected at the Python write calls.

    python tests/trainer/checkpoint/_faulty_disk_train.py key=value ...   (run by test_save_faults.py)

Environment:
- ``FAULT_ENOSPC_FILE``: a file name; every file opened for writing whose path ends with it
  and lies under a checkpoint temp dir (``.tmp-round_*``) or is the ``latest`` pointer's temp
  file gets a ``write`` that raises ``OSError(ENOSPC)`` after ``FAULT_ENOSPC_AFTER`` successful
  write calls (default 0: the first write fails). Covers Megatron's shard writer (in its
  forked writer processes, which inherit the patch), torch DCP's ``.metadata``, and our
  metadata, manifest and pointer files.
- ``FAULT_ENOSPC_ROUNDS``: comma-separated round numbers whose save is faulty (default: all;
  for the pointer: the n-th pointer written, i.e. round n with a save every round).
- ``FAULT_FREE_MIB``: ``shutil.disk_usage`` reports this much free space (the pre-save check).

Everything else (the CLI, the loop, Megatron's dist_checkpointing) runs unchanged.
"""

import builtins
import errno
import io
import os
import shutil
import sys
from collections import namedtuple

REAL_OPEN = io.open
TARGET = os.environ.get("FAULT_ENOSPC_FILE")
AFTER = int(os.environ.get("FAULT_ENOSPC_AFTER", "0"))
ROUNDS = [r for r in os.environ.get("FAULT_ENOSPC_ROUNDS", "").split(",") if r]


class FullDiskFile:
    """A writable file whose ``write`` fails with ENOSPC after ``AFTER`` calls."""

    def __init__(self, real, path: str):
        self._real, self._path, self._writes = real, path, 0

    def write(self, data):
        if self._writes >= AFTER:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)
        self._writes += 1
        return self._real.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._real.close()

    def __getattr__(self, name):
        return getattr(self._real, name)


POINTER_WRITES = [0]  # the pointer is written in the main process, once per published save


def _faulty(path: str) -> bool:
    if not TARGET or not path.endswith(TARGET):
        return False
    if os.path.basename(path).startswith(".latest"):
        POINTER_WRITES[0] += 1
        return not ROUNDS or str(POINTER_WRITES[0]) in ROUNDS
    in_temp = [part for part in path.split(os.sep) if part.startswith(".tmp-round_")]
    return bool(in_temp) and (not ROUNDS or any(in_temp[0].endswith(f"_{int(r):06d}") for r in ROUNDS))


def faulty_open(file, mode="r", *args, **kwargs):
    real = REAL_OPEN(file, mode, *args, **kwargs)
    if isinstance(file, (str, os.PathLike)) and any(m in mode for m in "wax") and _faulty(os.fspath(file)):
        return FullDiskFile(real, os.fspath(file))
    return real


def install() -> None:
    """Patch this process; forked writers inherit it (spawned helpers import this as a module)."""
    if TARGET:
        builtins.open = faulty_open
        io.open = faulty_open  # pathlib.Path.open (torch DCP's .metadata) goes through io.open
    if os.environ.get("FAULT_FREE_MIB"):
        shutil.disk_usage = small_disk


real_usage = shutil.disk_usage
Usage = namedtuple("Usage", "total used free")


def small_disk(path):
    total, used, _ = real_usage(path)
    return Usage(total, used, int(float(os.environ["FAULT_FREE_MIB"]) * 2**20))


if __name__ == "__main__":
    install()
    from sept_megatron import cli

    sys.exit(cli.main(["train", *sys.argv[1:]]))
