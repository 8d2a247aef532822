"""The weight-sync plan: which pipeline stage owns which HF tensor, how the tensors are cut
into buckets, and which rows (or columns) of each HF tensor each TP rank's shard holds.

Pure functions of the model's shapes and the layout (no process group, no tensor of the
model): unit-tested without distributed start-up (tests/weight_sync/test_reshard_plan.py).
The mechanisms beside this module move the bytes it describes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sept_megatron.convert.adapters import Kind, TensorRule, adapter_for
from sept_megatron.convert.hf_import import expected_hf_shapes
from sept_megatron.trainer.arch import ModelArch


@dataclass(frozen=True)
class SyncItem:
    """One Megatron parameter to send: its rule, layer, owning stage and HF output shapes."""

    rule: TensorRule
    layer: int | None
    stage: int
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.hf_shapes)

    @property
    def megatron_name(self) -> str:
        return self.rule.megatron.format(i=self.layer) if self.layer is not None else self.rule.megatron


def stage_layers(
    num_layers: int, pipeline_parallel: int, virtual_pipeline: int | None = None
) -> list[list[int]]:
    """Global layer indices of each pipeline stage, as Megatron splits them evenly (with
    virtual stages, chunk v of stage s holds block v * pp + s)."""
    chunks = pipeline_parallel * (virtual_pipeline or 1)
    per_chunk = num_layers // chunks
    stages: list[list[int]] = [[] for _ in range(pipeline_parallel)]
    for block in range(chunks):
        stages[block % pipeline_parallel] += list(range(block * per_chunk, (block + 1) * per_chunk))
    return stages


def sync_plan(arch: ModelArch, pipeline_parallel: int, virtual_pipeline: int | None = None) -> list[SyncItem]:
    """Every HF tensor of the model, once, with the stage that owns it (pure function)."""
    adapter = adapter_for(arch)
    shapes = expected_hf_shapes(arch)
    last = pipeline_parallel - 1

    def item(rule: TensorRule, layer: int | None, stage: int) -> SyncItem:
        names = tuple(n.format(i=layer) if layer is not None else n for n in rule.hf)
        return SyncItem(rule, layer, stage, names, tuple(shapes[n] for n in names))

    plan = [item(r, None, 0) for r in adapter.pre_rules()]
    for stage, layers in enumerate(stage_layers(arch.num_layers, pipeline_parallel, virtual_pipeline)):
        plan += [item(r, i, stage) for i in layers for r in adapter.layer_rules()]
    return plan + [item(r, None, last) for r in adapter.post_rules()]


@functools.lru_cache(maxsize=8)
def cached_plan(
    arch: ModelArch, pipeline_parallel: int, virtual_pipeline: int | None
) -> tuple[SyncItem, ...]:
    """:func:`sync_plan`, worked out once per layout (a direct sync is otherwise dominated by it)."""
    return tuple(sync_plan(arch, pipeline_parallel, virtual_pipeline))


def plan_buckets(plan: list[SyncItem], bucket_bytes: int, element_size: int) -> list[list[SyncItem]]:
    """Consecutive items of one stage, up to ``bucket_bytes`` each (an oversized tensor alone)."""
    buckets: list[list[SyncItem]] = []
    current: list[SyncItem] = []
    size = 0
    for it in plan:
        nbytes = it.numel * element_size
        if current and (it.stage != current[0].stage or size + nbytes > bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append(it)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


# --- which part of each HF tensor a TP rank holds (pure) -------------------------------------
@dataclass(frozen=True)
class Piece:
    """Rows (``dim`` 0) or columns (``dim`` 1) ``[start, start + length)`` of HF tensor
    ``hf_index`` of an item, as one TP rank's shard holds them. ``replicated``: every TP rank
    holds the whole tensor (norms)."""

    hf_index: int
    dim: int
    start: int
    length: int
    replicated: bool = False


def tp_pieces(item: SyncItem, tp_size: int, tp_rank: int, padded_vocab: int) -> list[Piece]:
    """The pieces of ``item``'s HF tensors in TP rank ``tp_rank``'s shard (empty ones left out).

    Megatron splits every parallel kind evenly (:func:`~sept_megatron.convert.adapters.tp_shard`),
    so each HF tensor's part is one block: fused QKV by whole query groups (the q, k and v rows
    of a rank's groups are consecutive rows of q, k and v), gate/up as a gate and an up block,
    the padded vocabulary by rows (padding rows beyond the real vocabulary dropped), row-parallel
    weights by columns.
    """
    kind = item.rule.kind
    if kind is Kind.REPLICATED:
        return [Piece(0, 0, 0, item.hf_shapes[0][0], replicated=True)]
    if kind is Kind.ROW_PARALLEL:
        columns = item.hf_shapes[0][1] // tp_size
        return [Piece(0, 1, tp_rank * columns, columns)]
    if kind is Kind.VOCAB:
        rows = padded_vocab // tp_size
        start = tp_rank * rows
        length = min(rows, item.hf_shapes[0][0] - start)
        return [Piece(0, 0, start, length)] if length > 0 else []
    pieces = []
    for index, shape in enumerate(item.hf_shapes):  # QKV, GATE_UP: even row blocks
        rows = shape[0] // tp_size
        pieces.append(Piece(index, 0, tp_rank * rows, rows))
    return pieces


def piece_source(item: SyncItem, piece: Piece, shard: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """The view of ``shard`` that holds ``piece``, shaped like :func:`piece_target`'s view."""
    kind = item.rule.kind
    if kind in (Kind.REPLICATED, Kind.ROW_PARALLEL):
        return shard
    if kind is Kind.VOCAB:
        return shard[: piece.length]
    if kind is Kind.GATE_UP:
        return shard.chunk(2, dim=0)[piece.hf_index]
    groups, d = arch.num_query_groups, arch.head_dim  # QKV
    per_group = arch.num_attention_heads // groups
    sizes = (per_group * d, d, d)
    start = sum(sizes[: piece.hf_index])
    grouped = shard.view(-1, (per_group + 2) * d, *shard.shape[1:])
    return grouped[:, start : start + sizes[piece.hf_index]]


def piece_target(hf_tensor: torch.Tensor, piece: Piece, shape: Sequence[int]) -> torch.Tensor:
    """Where ``piece`` goes in its full HF tensor: a contiguous row block viewed as ``shape``
    (the source's shape), or a strided column block."""
    if piece.dim == 1:
        return hf_tensor[:, piece.start : piece.start + piece.length]
    return hf_tensor[piece.start : piece.start + piece.length].view(shape)


def hf_views(bucket: list[SyncItem], flat: torch.Tensor) -> list[list[torch.Tensor]]:
    """Each item's HF tensors as views into the bucket's flat buffer, in plan order."""
    views, start = [], 0
    for it in bucket:
        item_views = []
        for shape in it.hf_shapes:
            n = int(torch.Size(shape).numel())
            item_views.append(flat[start : start + n].view(shape))
            start += n
        views.append(item_views)
    return views
