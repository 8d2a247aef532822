"""Checkpoint integrity: a manifest of every file's size and CRC32, checked before a load.

A checkpoint (see :mod:`sept_megatron.trainer.checkpoint`) is published with ``manifest.json``::

    {"format": 1, "total_bytes": N, "files": {"model/__0_0.distcp": {"size": S, "crc32": "1a2b3c4d"}, ...}}

Who computes what, so that no file is re-read on the round's critical path:

- the big tensor shards (``model/__<rank>_<i>.distcp``): each rank's background writer, right
  after it wrote them (:func:`digest_rank_shards`, inside the forked writer of an async save;
  a synchronous save digests them itself, the disk's page cache still holding them), into a
  per-rank part ``model/.manifest-rank<r>.json``;
- everything else (Megatron's ``.metadata``, ``common.pt``, ``metadata.json``, the HF side
  files, ``sept_megatron_ckpt.json``: kilobytes): rank 0 when it publishes, merging the parts
  (:func:`write_manifest`), just before the directory is renamed into place.

At load, :func:`verify_checkpoint` compares the files with the manifest (sizes always, CRC32
when asked: a truncated shard is found without reading anything, a flipped bit by the CRC);
:func:`choose_resume_checkpoint` walks a run's checkpoints newest first and returns the newest
complete one, with what was wrong with the ones it passed over. CRC32 (zlib, GB/s) is enough:
it catches every burst error up to 32 bits and almost all others; the aim is damage, not
tampering.
"""

from __future__ import annotations

import errno
import json
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
_PART_NAME = ".manifest-rank{rank}.json"
_PART_RE = re.compile(r"^\.manifest-rank\d+\.json$")
_CHUNK = 8 << 20
META_FILE = "sept_megatron_ckpt.json"  # same name as checkpoint.META_FILE (no import cycle)
LATEST_FILE = "latest"


class CheckpointDamaged(ValueError):
    """A checkpoint whose files do not match its manifest (or that has no metadata)."""


def file_digest(path: str) -> dict[str, int | str]:
    """Size and CRC32 of one file, read in 8 MiB chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


def _files_under(ckpt_dir: str) -> list[str]:
    """Every file of a checkpoint, relative to it, manifest and per-rank parts excluded."""
    found = []
    for parent, _, names in os.walk(ckpt_dir):
        for name in names:
            if name == MANIFEST_FILE or _PART_RE.match(name):
                continue
            found.append(os.path.relpath(os.path.join(parent, name), ckpt_dir))
    return sorted(found)


def digest_rank_shards(model_dir: str, rank: int) -> bool:
    """This rank's shard files (``__<rank>_*.distcp``) -> ``.manifest-rank<rank>.json``.
    Run by the rank's writer once its files are written and fsynced. False when the part
    could not be written (e.g. a full disk): :func:`write_manifest` then digests the shards
    itself, or the save fails there, on rank 0, where the failure is handled."""
    prefix = f"__{rank}_"
    try:
        digests = {
            f"model/{name}": file_digest(os.path.join(model_dir, name))
            for name in sorted(os.listdir(model_dir))
            if name.startswith(prefix)
        }
        with open(os.path.join(model_dir, _PART_NAME.format(rank=rank)), "w") as f:
            json.dump(digests, f)
    except OSError:
        return False
    return True


def write_after(write_fn, model_dir: str, rank: int, *args, **kwargs) -> None:
    """An async save's background function: Megatron's writer, then this rank's digests (still
    in the forked writer process, so training never waits for them). A failed write is
    reported by Megatron's finalize step; its partial files are then never published."""
    try:
        write_fn(*args, **kwargs)
    except (OSError, EOFError):
        # Megatron's writer reports write errors through its results queue; what escapes is
        # the queue itself gone: the training process is exiting (a fault stopped the run).
        # Nobody is left to report to, and this save is never published: end quietly.
        os._exit(1)
    digest_rank_shards(model_dir, rank)


def write_manifest(ckpt_dir: str) -> int:
    """Rank 0, every file written: merge the ranks' parts, digest the rest, write the manifest
    (fsynced). Returns the checkpoint's total size in bytes."""
    model_dir = os.path.join(ckpt_dir, "model")
    digested: dict[str, dict] = {}
    parts = [n for n in os.listdir(model_dir) if _PART_RE.match(n)] if os.path.isdir(model_dir) else []
    for name in parts:
        with open(os.path.join(model_dir, name)) as f:
            digested.update(json.load(f))
    files = {}
    for rel in _files_under(ckpt_dir):
        on_disk = os.path.getsize(os.path.join(ckpt_dir, rel))
        known = digested.get(rel)
        files[rel] = known if known and known["size"] == on_disk else file_digest(os.path.join(ckpt_dir, rel))
    total = sum(d["size"] for d in files.values())
    tmp = os.path.join(ckpt_dir, f".{MANIFEST_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "total_bytes": total, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, MANIFEST_FILE))
    for name in parts:
        os.remove(os.path.join(model_dir, name))
    return total


def read_manifest(ckpt_dir: str) -> dict | None:
    """The manifest, or None for a checkpoint written before manifests existed."""
    path = os.path.join(ckpt_dir, MANIFEST_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"format {manifest.get('format')!r}")
    except (ValueError, OSError) as exc:
        raise CheckpointDamaged(f"{path}: unreadable manifest ({exc})") from None
    return manifest


def verify_checkpoint(ckpt_dir: str, checksums: bool = True, share: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with one checkpoint directory, one line per file ([] when complete).
    ``share=(rank, world)``: sizes of every file, CRC32 of every world-th file only (the
    ranks split the reading). A checkpoint without a manifest (written before manifests) is
    checked for its metadata files only."""
    problems = []
    for required in (META_FILE, os.path.join("model", ".metadata")):
        if not os.path.isfile(os.path.join(ckpt_dir, required)):
            problems.append(f"{os.path.join(ckpt_dir, required)}: missing")
    try:
        manifest = read_manifest(ckpt_dir)
    except CheckpointDamaged as exc:
        return problems + [str(exc)]
    if manifest is None:
        return problems
    mine, ranks = share
    for index, (rel, expected) in enumerate(sorted(manifest["files"].items())):
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
            continue
        size = os.path.getsize(path)
        if size != expected["size"]:
            problems.append(
                f"{path}: {size} bytes, the manifest says {expected['size']} (truncated or overwritten)"
            )
        elif checksums and index % ranks == mine and file_digest(path)["crc32"] != expected["crc32"]:
            problems.append(
                f"{path}: CRC32 {file_digest(path)['crc32']} differs from the "
                f"manifest's {expected['crc32']} (corrupted)"
            )
    return problems


def checkpoint_size(ckpt_dir: str) -> int | None:
    """Bytes of a published checkpoint, from its manifest (None without one)."""
    try:
        manifest = read_manifest(ckpt_dir)
    except CheckpointDamaged:
        return None
    return int(manifest["total_bytes"]) if manifest else None


@dataclass
class ResumeChoice:
    """The checkpoint to resume from (None: start fresh) and the newer ones passed over."""

    path: str | None
    passed_over: list[tuple[str, list[str]]] = field(default_factory=list)

    def describe_fallback(self) -> str:
        skipped = "; ".join(
            f"{p} ({problems[0]}{' ...' if len(problems) > 1 else ''})" for p, problems in self.passed_over
        )
        return f"passed over damaged checkpoint(s) {skipped}; resuming from {self.path}"


def _candidates(root: str) -> list[str]:
    """The ``latest`` pointer's target first, then every round directory, newest first."""
    names = sorted((d for d in os.listdir(root) if d.startswith("round_")), reverse=True)
    pointer = os.path.join(root, LATEST_FILE)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            latest = f.read().strip()
        names = [latest] + [n for n in names if n != latest and n < latest]
    return [os.path.join(root, n) for n in names]


def choose_resume_checkpoint(
    root: str,
    checksums: bool = True,
    share: tuple[int, int] = (0, 1),
    merge: Callable[[list[str]], list[str]] = lambda found: found,
) -> ResumeChoice:
    """The newest complete checkpoint under a run's checkpoint root.

    The one ``latest`` names when it is complete; otherwise the newest older round directory
    that is (kept by ``checkpoint.keep_last >= 2``), with the damaged ones listed. No complete
    one: :class:`CheckpointDamaged` naming each file and what is wrong with it. ``share`` and
    ``merge`` split the checksums over ranks (see :func:`resume_checkpoint`)."""
    if not os.path.isfile(os.path.join(root, LATEST_FILE)):
        return ResumeChoice(None)
    passed_over = []
    for candidate in _candidates(root):
        problems = merge(
            verify_checkpoint(candidate, checksums, share)
            if os.path.isdir(candidate)
            else [f"{candidate}: missing (named by {os.path.join(root, LATEST_FILE)})"]
        )
        if not problems:
            return ResumeChoice(candidate, passed_over)
        passed_over.append((candidate, problems))
    lines = [line for _, problems in passed_over for line in problems]
    raise CheckpointDamaged(
        f"no complete checkpoint under {root}:\n  " + "\n  ".join(lines) + "\n  restore the "
        "files, or move the damaged directory away to start over (checkpoint.keep_last >= 2 "
        "keeps an older checkpoint to fall back on)"
    )


def _gather_problems(problems: list[str]) -> list[str]:
    """Every rank's findings, on every rank (collective), in rank order."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return problems
    everyone: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problems)
    return sorted({line for found in everyone for line in found})


def resume_checkpoint(root: str, warn: Callable[[str], None]) -> ResumeChoice:
    """The newest complete checkpoint of a run, every file's CRC32 checked once, the files
    split over the ranks (collective: every rank calls it and gets the same answer). A fall
    back to an older checkpoint is reported through ``warn``."""
    import torch.distributed as dist

    share = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    choice = choose_resume_checkpoint(root, checksums=True, share=share, merge=_gather_problems)
    if choice.passed_over:
        warn(choice.describe_fallback())
    return choice


# --- saving: space and failures ------------------------------------------------------------
class CheckpointSaveFailed(OSError):
    """A save that could not complete; nothing of it was published."""


def free_bytes(path: str) -> int:
    """Free bytes on the file system that holds ``path`` (or would: a directory not made yet
    is measured at its nearest existing parent)."""
    import shutil

    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def space_problem(root: str, needed: int | None) -> str | None:
    """Why a save of ``needed`` bytes cannot fit under ``root`` (None: it can, or unknown)."""
    if not needed:
        return None
    free = free_bytes(root)
    if free >= needed:
        return None
    return (
        f"{root}: {free / 2**20:.1f} MiB free, a checkpoint needs about "
        f"{needed / 2**20:.1f} MiB (the last save's size)"
    )


def describe_save_error(exc: BaseException, path: str, needed: int | None) -> str:
    """One line naming the path, the cause and, for a full disk, the space needed."""
    parent = os.path.dirname(os.path.abspath(path))
    # torch's zip writer reports a full disk without errno ("unexpected pos ..."): a write that
    # failed with (almost) nothing left on the file system is the same fault.
    if any(
        isinstance(c, OSError) and c.errno == errno.ENOSPC or "No space left on device" in str(c)
        for c in _causes(exc)
    ) or _nearly_full(parent):
        need = (
            f"about {needed / 2**20:.1f} MiB (the last save's size)"
            if needed
            else "at least one checkpoint's size"
        )
        return (
            f"checkpoint save to {path} failed: no space left on the device "
            f"({free_bytes(parent) / 2**20:.1f} MiB free under {parent}, a checkpoint needs "
            f"{need}); free space or point logging.run_dir elsewhere"
        )
    root_cause = list(_causes(exc))[-1]
    if isinstance(root_cause, CheckpointSaveFailed):
        return f"checkpoint save to {path} failed: {root_cause}"
    return f"checkpoint save to {path} failed: {type(root_cause).__name__}: {root_cause}"


def _nearly_full(directory: str) -> bool:
    try:
        return free_bytes(directory) < 64 << 10
    except OSError:
        return False


def _causes(exc: BaseException):
    """The exception, what it wraps (``__cause__``, ``__context__``) and, for torch's
    ``CheckpointException`` (a BaseException), each rank's wrapped failure."""
    seen, stack = set(), [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [current.__context__, current.__cause__]
        failures = getattr(current, "failures", None)  # CheckpointException: rank -> (exc, tb)
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]


# --- `sept-megatron checkpoint verify DIR` ----------------------------------------------------
def checkpoints_in(path: str) -> list[str]:
    """One checkpoint, or every round directory of a run (``RUN`` or ``RUN/checkpoints``)."""
    if os.path.isfile(os.path.join(path, META_FILE)) or os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        return [path]
    for root in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(root):
            rounds = sorted(d for d in os.listdir(root) if d.startswith("round_"))
            if rounds:
                return [os.path.join(root, d) for d in rounds]
    return []


def build_parser():
    """``sept-megatron checkpoint``'s parser (one action: verify)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="sept-megatron checkpoint",
        description="Check checkpoints against their manifests (sizes and CRC32 of every file).",
    )
    parser.add_argument("action", choices=("verify",))
    parser.add_argument("path", help="a checkpoint, a run's checkpoints/ dir, or a run dir")
    return parser


def verify_main(argv: list[str]) -> int:
    """Check one checkpoint or a run's checkpoints; exit 1 on damage, 2 when there is none."""
    args = build_parser().parse_args(["verify", *argv])
    found = checkpoints_in(args.path)
    if not found:
        print(
            f"sept-megatron checkpoint verify: error: {args.path}: no checkpoint there (expected "
            f"{META_FILE}, or round_* directories)",
            file=__import__("sys").stderr,
        )
        return 2
    damaged = 0
    for ckpt_dir in found:
        problems = verify_checkpoint(ckpt_dir)
        manifest = None if problems else read_manifest(ckpt_dir)
        if problems:
            damaged += 1
            print(f"DAMAGED  {ckpt_dir}")
            for line in problems:
                print(f"  {line}")
        elif manifest is None:
            print(f"UNVERIFIED  {ckpt_dir} (no {MANIFEST_FILE}: written before manifests)")
        else:
            print(
                f"OK  {ckpt_dir} ({len(manifest['files'])} files, {manifest['total_bytes'] / 2**20:.1f} MiB)"
            )
    print(f"{len(found) - damaged} of {len(found)} checkpoint(s) complete")
    return 1 if damaged else 0
