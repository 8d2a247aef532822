"""Megatron layout -> full HF tensors for every rollout engine, every round.

Two parts, kept apart so the first can be tested without any process group:

- the *plan* (:func:`sync_plan`, :func:`plan_buckets`, :func:`tp_pieces`): which pipeline stage
  owns which HF tensor, in a fixed order, cut into per-stage, per-dtype buckets of at most
  ``bucket_bytes``; and which rows (or columns) of each HF tensor each TP rank's shard holds;
- the *transport* (:func:`stream_hf_buckets`): every rank that hosts an engine assembles each
  full HF bucket in one flat buffer, one bucket at a time, and yields ``[(hf_name, view)]``.

Data path of one bucket, within each model replica (the TP x PP ranks of one data-parallel
rank; replicas hold bitwise-equal weights after every optimizer step, since Megatron
all-gathers updated parameters synchronously, so each replica serves its own ranks and
nothing crosses data-parallel ranks): each TP rank of the bucket's stage writes its own pieces
(:func:`tp_pieces`) into their places in the bucket's flat buffer, and the other ranks' pieces
arrive in place by one of two transports (:mod:`sept_megatron.sync_transport`): one batched
point-to-point exchange (GPU, or CPU across hosts), or a shared-memory buffer that every rank
of the replica maps (CPU ranks on one host). No ``torch.cat``, no per-tensor collective, no
leader that forwards the whole bucket. Every rank then hands the same buckets to its engine's
``update_weights`` in :func:`sync_weights`, the one place buckets meet an engine. On the CPU
ranks of one host with hf engines, :func:`sync_weights` skips buckets altogether: the engines'
weights live in the replica's shared buffer and each TP rank writes its pieces straight into
them (:func:`sept_megatron.sync_transport.direct_sync`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from sept_megatron.convert.adapters import Kind, TensorRule, adapter_for, canonical_name
from sept_megatron.convert.fp8 import rollout_bucket_transform
from sept_megatron.convert.hf_import import expected_hf_shapes, layer_offset
from sept_megatron.model import MegatronModel, ModelArch


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


def stage_layers(num_layers: int, pipeline_parallel: int,
                 virtual_pipeline: int | None = None) -> list[list[int]]:
    """Global layer indices of each pipeline stage, as Megatron splits them evenly (with
    virtual stages, chunk v of stage s holds block v * pp + s)."""
    chunks = pipeline_parallel * (virtual_pipeline or 1)
    per_chunk = num_layers // chunks
    stages: list[list[int]] = [[] for _ in range(pipeline_parallel)]
    for block in range(chunks):
        stages[block % pipeline_parallel] += list(range(block * per_chunk, (block + 1) * per_chunk))
    return stages


def sync_plan(arch: ModelArch, pipeline_parallel: int,
              virtual_pipeline: int | None = None) -> list[SyncItem]:
    """Every HF tensor of the model, once, with the stage that owns it (pure function)."""
    adapter = adapter_for(arch)
    shapes = expected_hf_shapes(arch)
    last = pipeline_parallel - 1

    def item(rule: TensorRule, layer: int | None, stage: int) -> SyncItem:
        names = tuple(n.format(i=layer) if layer is not None else n for n in rule.hf)
        return SyncItem(rule, layer, stage, names, tuple(shapes[n] for n in names))

    plan = [item(r, None, 0) for r in adapter.pre_rules()]
    for stage, layers in enumerate(stage_layers(arch.num_layers, pipeline_parallel,
                                                virtual_pipeline)):
        plan += [item(r, i, stage) for i in layers for r in adapter.layer_rules()]
    return plan + [item(r, None, last) for r in adapter.post_rules()]


@functools.lru_cache(maxsize=8)
def _cached_plan(arch: ModelArch, pipeline_parallel: int,
                 virtual_pipeline: int | None) -> tuple[SyncItem, ...]:
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
    return grouped[:, start: start + sizes[piece.hf_index]]


def piece_target(hf_tensor: torch.Tensor, piece: Piece, shape: Sequence[int]) -> torch.Tensor:
    """Where ``piece`` goes in its full HF tensor: a contiguous row block viewed as ``shape``
    (the source's shape), or a strided column block."""
    if piece.dim == 1:
        return hf_tensor[:, piece.start: piece.start + piece.length]
    return hf_tensor[piece.start: piece.start + piece.length].view(shape)


# --- transport ---------------------------------------------------------------------------
def _live_params(model: MegatronModel) -> dict[str, torch.Tensor]:
    """Canonical Megatron name -> this rank's parameter shard (a detached view)."""
    return {name: param.detach() for name, param in _model_params(model).items()}


def _model_params(model: MegatronModel) -> dict[str, torch.nn.Parameter]:
    """Canonical Megatron name -> this rank's parameter."""
    params = {}
    for chunk in model.chunks:
        module = chunk
        while hasattr(module, "module"):
            module = module.module
        offset = layer_offset(module)
        for name, param in module.named_parameters():
            canonical = canonical_name(name, offset)
            if canonical is not None:
                params[canonical] = param
    return params


def stream_hf_buckets(model: MegatronModel, bucket_bytes: int, *, receive: bool = True,
                      transport: str = "auto") -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Collective over all ranks: a rank with ``receive`` yields every HF-named bucket of the
    model, in plan order; a rank without yields nothing but must exhaust the iterator (it
    sends its pieces). A bucket's tensors are views into a buffer that a later bucket reuses:
    consume (copy) each one before asking for the next. ``transport``: auto, peer or shared
    (see :func:`sept_megatron.sync_transport.choose_transport`; the same on every rank)."""
    from megatron.core import parallel_state as ps

    from sept_megatron.sync_transport import choose_transport

    plan = sync_plan(model.arch, ps.get_pipeline_model_parallel_world_size(),
                     ps.get_virtual_pipeline_model_parallel_world_size())
    element_size = model.config.params_dtype.itemsize
    buckets = plan_buckets(plan, bucket_bytes, element_size)
    largest = max(sum(it.numel for it in bucket) for bucket in buckets)
    mover = choose_transport(model, _live_params(model), largest, receive, transport)
    for index, bucket in enumerate(buckets):
        with torch.no_grad():
            views = mover.assemble(index, bucket)
        if receive:
            yield [(name, view) for it, item_views in zip(bucket, views)
                   for name, view in zip(it.hf_names, item_views)]
    mover.finish()


def sync_weights(model: MegatronModel, engine, bucket_bytes: int, *,
                 weights: str = "native", direct: bool = True) -> int:
    """Push the trainer's current weights into this rank's engine (None: this rank only
    sends); collective over all ranks. Returns the number of buckets the engine received.
    ``weights`` is ``rollout.weights``: ``fp8`` quantises each bucket on every receiving rank
    (linear weights -> e4m3 + ``weight_scale_inv``, the export's quantiser). ``direct``: where
    the replica can (CPU ranks of one host, hf engines, native weights), write straight into
    engine weights that live in shared memory (:func:`~sept_megatron.sync_transport.direct_sync`;
    one "bucket"); ``False`` always streams buckets (the same on every rank)."""
    from sept_megatron.sync_transport import direct_sync, forget_other_engine

    if not direct:
        forget_other_engine(model, engine)
    else:
        from megatron.core import parallel_state as ps

        plan = _cached_plan(model.arch, ps.get_pipeline_model_parallel_world_size(),
                            ps.get_virtual_pipeline_model_parallel_world_size())
        done = direct_sync(model, engine, plan, lambda: _model_params(model), weights)
        if done is not None:
            return done
    stream = rollout_bucket_transform(weights, model.arch)(
        stream_hf_buckets(model, bucket_bytes, receive=engine is not None))
    if engine is None:
        return sum(1 for _ in stream)
    count = 0

    def counted():
        nonlocal count
        for bucket in stream:
            count += 1
            yield bucket

    engine.update_weights(counted())
    for _ in stream:  # keep collective order even if the engine stopped early
        pass
    return count
