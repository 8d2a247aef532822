"""Megatron dist checkpoint -> HF safetensors, streamed one transformer layer at a time.

The exporter reads the checkpoint's global tensors directly (dist_checkpointing can load any
slice of a saved tensor), never builds a model, and holds at most one layer's tensors plus
one output shard in memory, so a 70B export runs in one modest process. Output: sharded
``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``, plus the config
and tokenizer files the checkpoint carried, loadable by ``AutoModelForCausalLM``.

With ``fp8="blockwise"`` the linear weights the adapter marks ``fp8`` are written as 128x128
blockwise e4m3 plus ``weight_scale_inv`` (:mod:`sept_megatron.convert.fp8`, the quantiser the
rollout sync uses too) and config.json gets the ``quantization_config`` SGLang, vLLM and
transformers read; everything else stays in the checkpoint's dtype.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from tqdm import tqdm

from sept_megatron.convert.adapters import TensorRule, adapter_for, full_to_hf
from sept_megatron.convert.fp8 import BLOCK, check_export_recipe, hf_quantization_config, quantize_hf_tensors
from sept_megatron.convert.hf_import import expected_hf_shapes
from sept_megatron.trainer import checkpoint as ckpt_io

log = logging.getLogger(__name__)


class ShardedSafetensorsWriter:
    """Accumulates tensors and flushes a safetensors shard whenever it exceeds the size cap."""

    def __init__(self, out_dir: str, max_shard_bytes: int):
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shard_files: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        index = len(self.shard_files)
        save_file(
            self.pending, os.path.join(self.out_dir, f".shard-{index}.safetensors"), metadata={"format": "pt"}
        )
        self.shard_files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Name shards ``model-0000i-of-0000N`` now that N is known, and write the index."""
        if self.pending:
            self._flush()
        count = len(self.shard_files)
        weight_map = {}
        for i, names in enumerate(self.shard_files):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(
                os.path.join(self.out_dir, f".shard-{i}.safetensors"), os.path.join(self.out_dir, final)
            )
            weight_map.update({n: final for n in names})
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=1)


class _SliceLoadPlanner(DefaultLoadPlanner):
    """Reads one chunk (offsets, sizes) of each requested tensor instead of the whole tensor.

    Megatron's own loader cannot do this in a world of one process (it assumes the other
    fragments of the grid live on other ranks), so the exporter talks to torch DCP directly:
    the dist checkpoint's ``torch_dist`` format *is* a DCP checkpoint keyed by Megatron's keys.
    """

    def __init__(self, chunks: dict[str, ChunkStorageMetadata]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.chunks = chunks

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn in self.state_dict:
            items += create_read_items_for_chunk_list(
                fqn, self.metadata.state_dict_metadata[fqn], [self.chunks[fqn]]
            )
        return LoadPlan(items)

    def lookup_tensor(self, index) -> torch.Tensor:
        return self.state_dict[index.fqn]


def _load_slices(
    model_dir: str, wanted: list[tuple[TensorRule, int | None]], meta_shapes, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Load whole tensors (layer None) or one layer's row of layer-stacked [L, ...] tensors."""
    buffers, chunks = {}, {}
    for rule, layer in wanted:
        key = rule.megatron.replace("{i}.", "")
        shape = meta_shapes[key]
        if layer is None:
            offsets, sizes = (0,) * len(shape), shape
        else:
            offsets, sizes = (layer,) + (0,) * (len(shape) - 1), (1,) + tuple(shape[1:])
        buffers[key] = torch.empty(sizes, dtype=dtype)
        chunks[key] = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
    dcp.load(
        buffers,
        storage_reader=dcp.FileSystemReader(model_dir),
        planner=_SliceLoadPlanner(chunks),
        no_dist=True,
    )
    return [
        buffers[r.megatron.replace("{i}.", "")].squeeze(0) if layer is not None else buffers[r.megatron]
        for r, layer in wanted
    ]


def export_megatron_to_hf(
    ckpt_dir: str,
    out_dir: str,
    *,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = True,
    fp8: str | None = None,
) -> str:
    """Write an HF checkpoint from a sept_megatron checkpoint (or a root with ``latest``);
    ``fp8="blockwise"`` writes the linear weights as blockwise FP8 (see the module doc)."""
    check_export_recipe(fp8)
    ckpt_dir = ckpt_io.resolve_checkpoint(ckpt_dir)
    meta = ckpt_io.read_meta(ckpt_dir)
    arch, dtype = meta.arch, getattr(torch, meta.params_dtype)
    adapter = adapter_for(arch)
    model_dir = os.path.join(ckpt_dir, "model")
    storage = dcp.FileSystemReader(model_dir).read_metadata().state_dict_metadata
    shapes = {k: tuple(v.size) for k, v in storage.items() if hasattr(v, "size")}
    os.makedirs(out_dir, exist_ok=True)
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    groups = [[(r, None) for r in adapter.pre_rules()]]
    groups += [[(r, i) for r in adapter.layer_rules()] for i in range(arch.num_layers)]
    groups.append([(r, None) for r in adapter.post_rules()])
    quantized = adapter.fp8_hf_names() if fp8 else frozenset()
    for group in tqdm(groups, desc="export to HF", unit="layer", disable=not progress):
        tensors = []
        for (rule, layer), full in zip(group, _load_slices(model_dir, group, shapes, dtype)):
            tensors += [
                (name.format(i=layer) if layer is not None else name, tensor)
                for name, tensor in zip(rule.hf, full_to_hf(rule, full, arch))
            ]
        for name, tensor in quantize_hf_tensors(tensors, quantized):
            writer.add(name, tensor)
    writer.finish()
    _write_hf_config(
        os.path.join(ckpt_dir, "hf"), out_dir, meta.params_dtype, hf_quantization_config() if fp8 else None
    )
    if fp8:
        _warn_partial_blocks(expected_hf_shapes(arch), quantized)
    log.info("exported %s -> %s%s", ckpt_dir, out_dir, f" ({fp8} FP8)" if fp8 else "")
    return out_dir


def _warn_partial_blocks(shapes: dict[str, tuple[int, ...]], quantized) -> None:
    """SGLang/vLLM read partial edge blocks (ceil-sized scale grids, as DeepSeek-V3 ships).
    transformers 5.x's CPU dequantiser infers the block as dim // scale_dim: right for a
    dimension <= BLOCK (one block, e.g. 64 // 1) or a multiple of it, wrong only for a larger
    dimension with a partial edge block (192 // 2 = 96), so warn about exactly those."""
    misread = sorted(n for n in quantized if any(d > BLOCK and d % BLOCK for d in shapes[n]))
    if misread:
        log.warning(
            "%d FP8 weights (e.g. %s %s) have a dimension above %d that is not a multiple "
            "of it: SGLang and vLLM load them, transformers' CPU dequantisation misreads "
            "their blocks",
            len(misread),
            misread[0],
            shapes[misread[0]],
            BLOCK,
        )


def _write_hf_config(side_dir: str, out_dir: str, dtype_name: str, quantization_config: dict | None) -> None:
    for name in os.listdir(side_dir):
        shutil.copy2(os.path.join(side_dir, name), os.path.join(out_dir, name))
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["dtype"] = dtype_name  # the weights we wrote (all but FP8 ones) are in this dtype
    config.pop("torch_dtype", None)
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
