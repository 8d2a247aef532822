"""Read an offline W&B run back: the run's ``run-<id>.wandb`` transaction log, parsed into
wandb's own protobuf records (``wandb.proto.wandb_internal_pb2.Record``).

wandb 0.31 writes that log from its Go core and no longer ships a Python reader
(``wandb.sdk.internal.datastore`` is gone), so the framing is read here: the file starts with a
7-byte header (``:W&B``, magic 0xBEE1, version 0) and holds LevelDB-log records in 32 KiB
blocks, each chunk with a 7-byte header (CRC, length, type FULL/FIRST/MIDDLE/LAST); a block's
tail shorter than a header is zero padding. Everything inside a record is wandb's protobuf.

    run = read_offline_run(run_dir)          # the directory wandb.init(dir=...) was given
    run.group, run.job_type, run.history[step]["train/loss"], run.table(run.history[1]["rollout/samples"])
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a .wandb log"
    records, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        if BLOCK - offset % BLOCK < HEADER:  # block tail: padding
            offset += BLOCK - offset % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        if kind == 0:  # zero-filled end of a block
            offset += BLOCK - offset % BLOCK
            continue
        pending += data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _nested(target: dict, item) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    run_dir: Path  # wandb/offline-run-*
    project: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: dict[int, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def table(self, ref: dict) -> tuple[list[str], list[list[Any]]]:
        """Columns and rows of a logged table (a history or summary value of type table-file)."""
        assert ref["_type"] == "table-file", ref
        stored = json.loads((self.run_dir / "files" / ref["path"]).read_text())
        return stored["columns"], stored["data"]

    def keys(self) -> set[str]:
        return {key for row in self.history.values() for key in row}


def finished_records(log_file: Path, timeout_s: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The log's records once its ``exit`` record is on disk: ``run.finish()`` returns before
    wandb's core process has written the log (measured: 7 bytes right after finish)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = read_records(log_file)
        except Exception:  # caught mid-write: a record cut short; read again
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{log_file}: no exit record after {timeout_s} s"
        time.sleep(0.2)


def read_offline_run(root: Path) -> OfflineRun:
    """The one offline run under ``root/wandb`` (``root`` is what ``wandb.init(dir=)`` got)."""
    runs = sorted((Path(root) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {root}, found {runs}"
    (log_file,) = runs[0].glob("run-*.wandb")
    run = OfflineRun(runs[0])
    for record in finished_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.project, run.name = record.run.project, record.run.display_name
            run.group, run.job_type = record.run.run_group, record.run.job_type
            for item in record.run.config.update:
                _nested(run.config, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _nested(row, item)
            run.history[int(row.get("_step", record.history.step.num))] = row
        elif kind == "summary":
            for item in record.summary.update:
                _nested(run.summary, item)
        elif kind == "config":
            for item in record.config.update:
                _nested(run.config, item)
    return run
