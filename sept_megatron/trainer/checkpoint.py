"""Checkpoints: Megatron dist_checkpointing for tensors, a small JSON for everything else.

A sept_megatron checkpoint is a directory::

    CKPT/
      sept_megatron_ckpt.json   architecture, padded vocab, dtype, layout it was written at,
                                and (training checkpoints) round, data position, RNG, schedule
      hf/                       config.json, generation config and tokenizer files (no weights)
      model/                    dist_checkpointing (torch_dist): model (+ optimizer) shards

Training writes ``ROOT/round_000012/`` and then the pointer file ``ROOT/latest``. Each round
directory is first written as ``ROOT/.tmp-round_000012`` and renamed when complete, and the
pointer is replaced atomically last, so a job killed at any moment leaves the previous
checkpoint intact and the next start resumes from it. dist_checkpointing can load at any
TP/PP, so a checkpoint is not tied to the layout that wrote it.

``checkpoint.async_save`` (:class:`CheckpointSaver`) writes the shards in a background process
and does the rename + pointer in dist_checkpointing's finalize step, so the same guarantee
holds while training only waits for the staging of the tensors.

Every published checkpoint carries ``manifest.json`` (each file's size and CRC32, see
:mod:`sept_megatron.trainer.integrity`), written last before the rename; loads check it first.
A save that fails (a full disk, at any write) is never published: its temp directory is
removed and the previous checkpoint stays the latest.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from sept_megatron.trainer import integrity
from sept_megatron.trainer.arch import ModelArch
from sept_megatron.trainer.model import unwrap_module

META_FILE = "sept_megatron_ckpt.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


@dataclass
class CheckpointMeta:
    arch: ModelArch
    padded_vocab: int
    params_dtype: str
    tensor_parallel: int
    pipeline_parallel: int
    train_state: dict[str, Any] | None = None  # round, sampler position, scheduler (training only)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "arch": self.arch.to_dict(),
            "padded_vocab": self.padded_vocab,
            "params_dtype": self.params_dtype,
            "tensor_parallel": self.tensor_parallel,
            "pipeline_parallel": self.pipeline_parallel,
            "train_state": self.train_state,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CheckpointMeta:
        if d.get("format") != FORMAT_VERSION:
            raise ValueError(f"checkpoint format {d.get('format')} is not {FORMAT_VERSION}")
        return cls(
            ModelArch.from_dict(d["arch"]),
            d["padded_vocab"],
            d["params_dtype"],
            d["tensor_parallel"],
            d["pipeline_parallel"],
            d.get("train_state"),
        )


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE)) or os.path.isfile(os.path.join(path, LATEST_FILE))


def resolve_checkpoint(path: str) -> str:
    """A checkpoint dir, or a root with a ``latest`` pointer -> the checkpoint dir."""
    pointer = os.path.join(path, LATEST_FILE)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isfile(os.path.join(path, META_FILE)):
        raise FileNotFoundError(
            f"{path}: not a sept_megatron checkpoint (no {META_FILE}); "
            "pass a directory written by convert_hf_to_megatron.py or train"
        )
    return path


def latest_checkpoint(root: str) -> str | None:
    """The checkpoint ``root/latest`` points to, or None when there is none yet."""
    if not os.path.isfile(os.path.join(root, LATEST_FILE)):
        return None
    return resolve_checkpoint(root)


def read_meta(ckpt_dir: str) -> CheckpointMeta:
    with open(os.path.join(resolve_checkpoint(ckpt_dir), META_FILE)) as f:
        return CheckpointMeta.from_json(json.load(f))


def copy_hf_side_files(hf_dir: str, out_dir: str) -> None:
    """Config and tokenizer files travel with every checkpoint, so an export is complete."""
    os.makedirs(out_dir, exist_ok=True)
    for name in HF_SIDE_FILES:
        src = os.path.join(hf_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(out_dir, name))


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    root_or_dir: str, name: str | None, sharded_state_dict: dict, meta: CheckpointMeta, hf_side_dir: str
) -> str:
    """Write a checkpoint atomically (collective: every rank calls it). Returns its path.

    ``name`` given: ``root/name`` plus the ``latest`` pointer (training). ``name`` None:
    ``root_or_dir`` itself is the checkpoint (conversion); it is written to a temp sibling and
    renamed, so a half-written conversion never looks like a checkpoint.
    """
    from megatron.core import dist_checkpointing

    final, tmp = _prepare_temp_dir(root_or_dir, name, hf_side_dir)
    dist_checkpointing.save(sharded_state_dict, os.path.join(tmp, "model"))
    # Synchronous: this rank digests its own shards now (still in the page cache).
    integrity.digest_rank_shards(os.path.join(tmp, "model"), _rank())
    _barrier()
    _publish_agreed(tmp, final, root_or_dir, name, meta)
    return final


def _prepare_temp_dir(root_or_dir: str, name: str | None, hf_side_dir: str) -> tuple[str, str]:
    """(final path, its fixed temp sibling), the temp dir fresh with the HF side files in it."""
    final = os.path.join(root_or_dir, name) if name else root_or_dir
    parent, base = os.path.split(os.path.abspath(final))
    # A fixed temp name: what a killed job left half-written is simply replaced here.
    tmp = os.path.join(parent, f".tmp-{base}")

    def fresh_temp_dir():
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(os.path.join(tmp, "model"))
        copy_hf_side_files(hf_side_dir, os.path.join(tmp, "hf"))

    _on_rank0_agreed(fresh_temp_dir, tmp)
    return final, tmp


def _agree(error: str | None) -> str | None:
    """Every rank learns the first rank's error (collective), so all fail or go on together."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def _on_rank0_agreed(fn, path: str) -> None:
    """Run ``fn`` on rank 0; an OSError there (a full disk) is raised on every rank as
    :class:`~sept_megatron.trainer.integrity.CheckpointSaveFailed` naming ``path`` (collective)."""
    error = None
    if _rank() == 0:
        try:
            fn()
        except OSError as exc:
            error = f"{path}: {type(exc).__name__}: {exc}"
    error = _agree(error)
    if error:
        raise integrity.CheckpointSaveFailed(error)


def _publish_agreed(tmp: str, final: str, root: str, name: str | None, meta: CheckpointMeta) -> None:
    _on_rank0_agreed(partial(_publish, tmp, final, root, name, meta), final)


def _publish(tmp: str, final: str, root: str, name: str | None, meta: CheckpointMeta) -> None:
    """Rank 0, once every shard is on disk: metadata, rename into place, then the pointer.
    Until the rename a reader sees only the previous checkpoint."""
    if _rank() != 0:
        return
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(meta.to_json(), f, indent=1)
    integrity.write_manifest(tmp)  # last: every file, the metadata included, is in it
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    if name:
        _write_pointer(root, name)


class CheckpointSaver:
    """Training checkpoints, written in the foreground or in the background.

    ``async_save=False``: :func:`save_checkpoint`, then pruning; training waits for the disk.

    ``async_save=True``: dist_checkpointing's async save. The call blocks only while the
    shards are planned and staged in host memory (a GPU->CPU copy on GPU; on the CPU the
    writer is a forked process whose copy-on-write view is the snapshot); a background
    process writes them into ``ROOT/.tmp-<name>`` and digests them for the manifest while
    training goes on. Renaming into place, the ``latest`` pointer and pruning happen in the
    finalize callback, run on every rank (:class:`AsyncCallsQueue`) only after every rank's
    writer has finished, so a job killed mid-save still resumes from the previous checkpoint.
    At most one save is in flight: :meth:`save` first finishes the outstanding one, and
    :meth:`finish` (end of training) waits for it. Every method is collective: all ranks call
    it, in the same order.

    A save that fails (before it starts: less free space than the last save's size; or at any
    write) is never published: its temp directory is removed and ``latest`` keeps naming the
    previous checkpoint. ``on_save_error="stop"`` raises
    :class:`~sept_megatron.trainer.integrity.CheckpointSaveFailed` on every rank, naming the path and
    the space needed; ``"warn"`` logs it, counts it (:attr:`failures`) and the next save
    tries again.
    """

    def __init__(self, async_save: bool, keep_last: int, on_save_error: str = "stop", warn=None):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.async_save, self.keep_last, self.on_save_error = async_save, keep_last, on_save_error
        self._warn = warn or (lambda message: print(message, flush=True))
        # persistent=False: a forked writer per save. The persistent (spawned) worker would
        # receive CPU tensors by pickling, which megatron-core does not support yet.
        self._queue = AsyncCallsQueue(persistent=False) if async_save else None
        self._in_flight: str | None = None  # temp dir of the outstanding background save
        self._last_size: int | None = None  # bytes of the last published save
        self.failures = 0  # saves that failed and were survived (on_save_error=warn)

    def save(
        self, root: str, name: str, sharded_state_dict: dict, meta: CheckpointMeta, hf_side_dir: str
    ) -> float:
        """Save ``root/name``; returns the seconds this call blocked the caller."""
        start = time.perf_counter()
        self._finalize_outstanding(blocking=True)  # one save in flight at most
        if self._last_size is None and latest_checkpoint(root):
            self._last_size = integrity.checkpoint_size(latest_checkpoint(root))
        final = os.path.join(root, name)
        problem = _agree(integrity.space_problem(root, self._last_size))
        if problem:
            self._failed(
                f"checkpoint save to {final} not started: {problem}; free space or "
                "point logging.run_dir elsewhere",
                None,
            )
            return time.perf_counter() - start
        try:
            if self.async_save:
                self._start_background_save(root, name, sharded_state_dict, meta, hf_side_dir)
            else:
                save_checkpoint(root, name, sharded_state_dict, meta, hf_side_dir)
                self._published(root, final)
        except (Exception, CheckpointException) as exc:  # every rank alike (_on_rank0_agreed)
            self._failed(integrity.describe_save_error(exc, final, self._last_size), _temp_dir_of(final))
        return time.perf_counter() - start

    def _start_background_save(self, root, name, sharded_state_dict, meta, hf_side_dir) -> None:
        from megatron.core import dist_checkpointing

        final, tmp = _prepare_temp_dir(root, name, hf_side_dir)
        model_dir = os.path.join(tmp, "model")
        request = dist_checkpointing.save(sharded_state_dict, model_dir, async_sharded_save=True)
        # The writer process digests this rank's shards after writing them (manifest parts).
        # A rank with nothing to write (every shard it holds is a replica another rank saves)
        # gets no writer from Megatron: none to wrap.
        if request.async_fn is not None:
            request = request._replace(
                async_fn=partial(integrity.write_after, request.async_fn, model_dir, _rank())
            )
        request.add_finalize_fn(partial(self._finalize, tmp, final, root, name, meta))
        self._in_flight = tmp
        self._queue.schedule_async_request(request)

    def _finalize(self, tmp: str, final: str, root: str, name: str, meta: CheckpointMeta) -> None:
        _publish_agreed(tmp, final, root, name, meta)
        self._published(root, final)

    def _published(self, root: str, final: str) -> None:
        self._in_flight = None
        self._last_size = integrity.checkpoint_size(final)
        prune_checkpoints(root, self.keep_last)

    def _finalize_outstanding(self, blocking: bool) -> None:
        if self._queue is None:
            return
        try:
            self._queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as exc:  # on every rank (Megatron's finalize)
            tmp, self._in_flight = self._in_flight, None
            final = _final_dir_of(tmp) if tmp else "?"
            self._failed(integrity.describe_save_error(exc, final, self._last_size), tmp)

    def _failed(self, message: str, tmp: str | None) -> None:
        """The save is dropped (its temp dir removed); stop, or warn and go on."""
        if tmp and _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.on_save_error == "stop":
            raise integrity.CheckpointSaveFailed(message)
        self.failures += 1
        self._warn(f"{message}; training goes on (checkpoint.on_save_error=warn), the next save tries again")

    def poll(self) -> None:
        """Publish a background save that has finished on every rank (never waits)."""
        self._finalize_outstanding(blocking=False)

    def finish(self) -> None:
        """Wait for the outstanding background save and publish it."""
        self._finalize_outstanding(blocking=True)

    @property
    def pending(self) -> int:
        return self._queue.get_num_unfinalized_calls() if self._queue is not None else 0


def _temp_dir_of(final: str) -> str:
    parent, base = os.path.split(os.path.abspath(final))
    return os.path.join(parent, f".tmp-{base}")


def _final_dir_of(tmp: str) -> str:
    parent, base = os.path.split(tmp)
    return os.path.join(parent, base.removeprefix(".tmp-"))


def _write_pointer(root: str, name: str) -> None:
    tmp = os.path.join(root, f".{LATEST_FILE}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        os.remove(tmp)  # the old pointer stays; no half-written one is left behind
        raise
    os.replace(tmp, os.path.join(root, LATEST_FILE))


def prune_checkpoints(root: str, keep: int) -> None:
    """Keep the newest ``keep`` round directories (rank 0 only; never the one ``latest`` names)."""
    if _rank() != 0 or keep <= 0:
        return
    rounds = sorted(d for d in os.listdir(root) if d.startswith("round_"))
    current = open(os.path.join(root, LATEST_FILE)).read().strip()
    for stale in rounds[:-keep]:
        if stale != current:
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)


# Transformer Engine modules keep FP8 scaling state (recipe, amax history, scales) in
# ``_extra_state``; Megatron saves it as a ShardedObject beside the weights, so an FP8 run
# resumes with its scaling state. ``_extra_state3`` etc.: TE's grouped GEMMs.
_EXTRA_STATE_KEY = re.compile(r"_extra_state\d*$")


def check_intact(path: str) -> None:
    """Every file a checkpoint's manifest lists is there at its size (no reading): a damaged
    checkpoint is an error naming the file before anything loads it."""
    ckpt_dir = resolve_checkpoint(path)
    problems = integrity.verify_checkpoint(ckpt_dir, checksums=False)
    if problems:
        raise integrity.CheckpointDamaged(
            f"{ckpt_dir} is damaged:\n  " + "\n  ".join(problems) + "\n  restore it, or check "
            f"it with `sept-megatron checkpoint verify {ckpt_dir}`"
        )


def load_sharded(ckpt_dir: str, sharded_state_dict: dict) -> dict:
    """Load tensors (any TP/PP layout) into the given sharded state dict.

    A checkpoint without some ``_extra_state`` objects the model asks for (written with local
    layers, e.g. by tools/convert_hf_to_megatron.py, and loaded into TE layers: TE's attention
    has one the local spec lacks) still loads: those modules keep their fresh FP8 state.
    Anything else missing from the checkpoint is an error naming it.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    check_intact(ckpt_dir)
    try:
        loaded, _, absent = dist_checkpointing.load(
            sharded_state_dict, os.path.join(ckpt_dir, "model"), strict=StrictHandling.RETURN_UNEXPECTED
        )  # "unexpected": asked for, not in it
    except (EOFError, RuntimeError, OSError, pickle.UnpicklingError) as exc:
        # A damaged file the manifest could not catch (none, or an older checkpoint).
        raise integrity.CheckpointDamaged(
            f"{ckpt_dir}: cannot be read ({type(exc).__name__}: {exc}); check it with "
            f"`sept-megatron checkpoint verify {ckpt_dir}`"
        ) from exc
    missing = sorted(key for key in absent if not _EXTRA_STATE_KEY.search(key))
    if missing:
        raise ValueError(
            f"{ckpt_dir}: checkpoint lacks {len(missing)} tensor(s) the model needs, "
            f"e.g. {missing[:3]}; is it a checkpoint of another model, or one without the "
            "optimizer state a resume needs?"
        )
    return loaded


def check_compatible(meta: CheckpointMeta, arch: ModelArch, tensor_parallel: int) -> None:
    """A checkpoint from another model is a clear error, before anything is loaded."""
    if meta.arch != arch:
        diffs = [
            f"{k}: checkpoint {v!r} vs model {getattr(arch, k)!r}"
            for k, v in meta.arch.to_dict().items()
            if getattr(arch, k) != v
        ]
        raise ValueError(
            "checkpoint is from another model (" + "; ".join(diffs) + "); point "
            "model.megatron_ckpt / logging.run_dir at a checkpoint of model.hf_path"
        )
    if meta.padded_vocab % tensor_parallel:
        raise ValueError(
            f"checkpoint padded vocab {meta.padded_vocab} is not divisible by "
            f"parallel.tensor_parallel={tensor_parallel}"
        )


def load_model_weights(model_chunks, ckpt_dir: str) -> None:
    """Load model tensors only (a converted or a training checkpoint) into this rank's stages."""
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    loaded = load_sharded(ckpt_dir, {"model": model_sharded_state_dict(model_chunks)})
    for i, chunk in enumerate(model_chunks):
        unwrap_module(chunk).load_state_dict(loaded["model"][f"model{i}"], strict=False)


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_sharded_state_dict(model_chunks) -> dict:
    """Chunks under separate dict keys; the tensors' own keys carry global layer indices, so
    the checkpoint is the same whatever the TP/PP/VPP layout that wrote it."""
    return {f"model{i}": unwrap_module(c).sharded_state_dict() for i, c in enumerate(model_chunks)}
