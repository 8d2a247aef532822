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
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from sept_megatron.trainer.arch import ModelArch
from sept_megatron.trainer.model import unwrap_module

META_FILE = "sept_megatron_ckpt.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                 "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "vocab.json", "merges.txt", "added_tokens.json")


@dataclass
class CheckpointMeta:
    arch: ModelArch
    padded_vocab: int
    params_dtype: str
    tensor_parallel: int
    pipeline_parallel: int
    train_state: dict[str, Any] | None = None  # round, sampler position, scheduler (training only)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "arch": self.arch.to_dict(),
                "padded_vocab": self.padded_vocab, "params_dtype": self.params_dtype,
                "tensor_parallel": self.tensor_parallel,
                "pipeline_parallel": self.pipeline_parallel, "train_state": self.train_state}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CheckpointMeta":
        if d.get("format") != FORMAT_VERSION:
            raise ValueError(f"checkpoint format {d.get('format')} is not {FORMAT_VERSION}")
        return cls(ModelArch.from_dict(d["arch"]), d["padded_vocab"], d["params_dtype"],
                   d["tensor_parallel"], d["pipeline_parallel"], d.get("train_state"))


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE)) or os.path.isfile(
        os.path.join(path, LATEST_FILE))


def resolve_checkpoint(path: str) -> str:
    """A checkpoint dir, or a root with a ``latest`` pointer -> the checkpoint dir."""
    pointer = os.path.join(path, LATEST_FILE)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isfile(os.path.join(path, META_FILE)):
        raise FileNotFoundError(f"{path}: not a sept_megatron checkpoint (no {META_FILE}); "
                                "pass a directory written by convert_hf_to_megatron.py or train")
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


def save_checkpoint(root_or_dir: str, name: str | None, sharded_state_dict: dict,
                    meta: CheckpointMeta, hf_side_dir: str) -> str:
    """Write a checkpoint atomically (collective: every rank calls it). Returns its path.

    ``name`` given: ``root/name`` plus the ``latest`` pointer (training). ``name`` None:
    ``root_or_dir`` itself is the checkpoint (conversion); it is written to a temp sibling and
    renamed, so a half-written conversion never looks like a checkpoint.
    """
    from megatron.core import dist_checkpointing

    final, tmp = _prepare_temp_dir(root_or_dir, name, hf_side_dir)
    dist_checkpointing.save(sharded_state_dict, os.path.join(tmp, "model"))
    _barrier()
    _publish(tmp, final, root_or_dir, name, meta)
    _barrier()
    return final


def _prepare_temp_dir(root_or_dir: str, name: str | None, hf_side_dir: str) -> tuple[str, str]:
    """(final path, its fixed temp sibling), the temp dir fresh with the HF side files in it."""
    final = os.path.join(root_or_dir, name) if name else root_or_dir
    parent, base = os.path.split(os.path.abspath(final))
    # A fixed temp name: what a killed job left half-written is simply replaced here.
    tmp = os.path.join(parent, f".tmp-{base}")
    if _rank() == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(os.path.join(tmp, "model"))
        copy_hf_side_files(hf_side_dir, os.path.join(tmp, "hf"))
    _barrier()
    return final, tmp


def _publish(tmp: str, final: str, root: str, name: str | None, meta: CheckpointMeta) -> None:
    """Rank 0, once every shard is on disk: metadata, rename into place, then the pointer.
    Until the rename a reader sees only the previous checkpoint."""
    if _rank() != 0:
        return
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(meta.to_json(), f, indent=1)
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
    process writes them into ``ROOT/.tmp-<name>`` while training goes on. Renaming into
    place, the ``latest`` pointer and pruning happen in the finalize callback, run on every
    rank (:class:`AsyncCallsQueue`) only after every rank's writer has finished, so a job
    killed mid-save still resumes from the previous checkpoint. At most one save is in
    flight: :meth:`save` first finishes the outstanding one, and :meth:`finish` (end of
    training) waits for it. Every method is collective: all ranks call it, in the same order.
    """

    def __init__(self, async_save: bool, keep_last: int):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.async_save, self.keep_last = async_save, keep_last
        # persistent=False: a forked writer per save. The persistent (spawned) worker would
        # receive CPU tensors by pickling, which megatron-core does not support yet.
        self._queue = AsyncCallsQueue(persistent=False) if async_save else None

    def save(self, root: str, name: str, sharded_state_dict: dict, meta: CheckpointMeta,
             hf_side_dir: str) -> float:
        """Save ``root/name``; returns the seconds this call blocked the caller."""
        start = time.perf_counter()
        if not self.async_save:
            save_checkpoint(root, name, sharded_state_dict, meta, hf_side_dir)
            prune_checkpoints(root, self.keep_last)
            return time.perf_counter() - start
        from megatron.core import dist_checkpointing

        self._queue.maybe_finalize_async_calls(blocking=True)  # one save in flight at most
        final, tmp = _prepare_temp_dir(root, name, hf_side_dir)
        request = dist_checkpointing.save(sharded_state_dict, os.path.join(tmp, "model"),
                                          async_sharded_save=True)
        request.add_finalize_fn(partial(self._finalize, tmp, final, root, name, meta))
        self._queue.schedule_async_request(request)
        return time.perf_counter() - start

    def _finalize(self, tmp: str, final: str, root: str, name: str, meta: CheckpointMeta) -> None:
        _publish(tmp, final, root, name, meta)
        prune_checkpoints(root, self.keep_last)

    def poll(self) -> None:
        """Publish a background save that has finished on every rank (never waits)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def finish(self) -> None:
        """Wait for the outstanding background save and publish it."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)

    @property
    def pending(self) -> int:
        return self._queue.get_num_unfinalized_calls() if self._queue is not None else 0


def _write_pointer(root: str, name: str) -> None:
    tmp = os.path.join(root, f".{LATEST_FILE}.tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
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


def load_sharded(ckpt_dir: str, sharded_state_dict: dict) -> dict:
    """Load tensors (any TP/PP layout) into the given sharded state dict.

    A checkpoint without some ``_extra_state`` objects the model asks for (written with local
    layers, e.g. by tools/convert_hf_to_megatron.py, and loaded into TE layers: TE's attention
    has one the local spec lacks) still loads: those modules keep their fresh FP8 state.
    Anything else missing from the checkpoint is an error naming it.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    loaded, _, absent = dist_checkpointing.load(
        sharded_state_dict, os.path.join(ckpt_dir, "model"),
        strict=StrictHandling.RETURN_UNEXPECTED)  # "unexpected": asked for, not in the checkpoint
    missing = sorted(key for key in absent if not _EXTRA_STATE_KEY.search(key))
    if missing:
        raise ValueError(f"{ckpt_dir}: checkpoint lacks {len(missing)} tensor(s) the model needs, "
                         f"e.g. {missing[:3]}; is it a checkpoint of another model, or one without the "
                         "optimizer state a resume needs?")
    return loaded


def check_compatible(meta: CheckpointMeta, arch: ModelArch, tensor_parallel: int) -> None:
    """A checkpoint from another model is a clear error, before anything is loaded."""
    if meta.arch != arch:
        diffs = [f"{k}: checkpoint {v!r} vs model {getattr(arch, k)!r}"
                 for k, v in meta.arch.to_dict().items() if getattr(arch, k) != v]
        raise ValueError("checkpoint is from another model (" + "; ".join(diffs) + "); point "
                         "model.megatron_ckpt / logging.run_dir at a checkpoint of model.hf_path")
    if meta.padded_vocab % tensor_parallel:
        raise ValueError(f"checkpoint padded vocab {meta.padded_vocab} is not divisible by "
                         f"parallel.tensor_parallel={tensor_parallel}")


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

