"""The resharding plan: which stage sends which HF tensor, cut into buckets (pure functions)."""

import itertools

import pytest
from hf_tiny import tiny_config

from sept_megatron.convert import adapter_for, expected_hf_shapes
from sept_megatron.convert.hf_config import arch_from_hf_config
from sept_megatron.trainer import model as mdl
from sept_megatron.trainer.arch import ModelArch
from sept_megatron.weight_sync.plan import plan_buckets, stage_layers, sync_plan


class StubVocab:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

    def __len__(self):
        return 300


def arch_of(family: str, layers: int = 8, **overrides) -> ModelArch:
    return arch_from_hf_config(tiny_config(family, StubVocab(), num_hidden_layers=layers, **overrides))


ARCHS = {
    "llama": dict(family="llama"),
    "qwen2-tied": dict(family="qwen2", tie_word_embeddings=True),
    "qwen3": dict(family="qwen3"),
}
LAYOUTS = [(1, None), (2, None), (4, None), (2, 2), (2, 4)]


@pytest.mark.parametrize("pp, vpp", LAYOUTS)
@pytest.mark.parametrize("name", ARCHS)
def test_every_hf_tensor_is_planned_exactly_once(name, pp, vpp):
    arch = arch_of(**ARCHS[name])
    plan = sync_plan(arch, pp, vpp)
    names = [n for item in plan for n in item.hf_names]
    assert len(names) == len(set(names))
    assert set(names) == set(adapter_for(arch).hf_names())
    shapes = expected_hf_shapes(arch)
    for item in plan:
        assert item.hf_shapes == tuple(shapes[n] for n in item.hf_names)
        assert item.numel == sum(
            shapes[n][0] * (shapes[n][1] if len(shapes[n]) > 1 else 1) for n in item.hf_names
        )


@pytest.mark.parametrize(
    "layers, pp, vpp, expected",
    [
        (8, 1, None, [list(range(8))]),
        (8, 2, None, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (8, 4, None, [[0, 1], [2, 3], [4, 5], [6, 7]]),
        # Megatron's interleaved schedule: model chunk v of stage s holds block v * pp + s.
        (8, 2, 2, [[0, 1, 4, 5], [2, 3, 6, 7]]),
        (8, 2, 4, [[0, 2, 4, 6], [1, 3, 5, 7]]),
        (12, 3, 2, [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]),
    ],
)
def test_stage_layers(layers, pp, vpp, expected):
    stages = stage_layers(layers, pp, vpp)
    assert stages == expected
    assert sorted(itertools.chain(*stages)) == list(range(layers))


@pytest.mark.parametrize("layers, pp, vpp", [(8, 2, None), (8, 4, None), (8, 2, 2), (8, 2, 4), (12, 3, 2)])
def test_stage_layers_agree_with_megatrons_layer_offsets(layers, pp, vpp):
    """Cross-check against the function Megatron builds each model chunk's layers with."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = mdl.transformer_config(
        arch_of("llama", layers=layers), pipeline_parallel=pp, virtual_pipeline=vpp
    )
    per_chunk = layers // (pp * (vpp or 1))
    for stage, expected in enumerate(stage_layers(layers, pp, vpp)):
        megatron_layers = []
        for chunk in range(vpp or 1):
            offset = get_transformer_layer_offset(config, vp_stage=chunk if vpp else None, pp_rank=stage)
            megatron_layers += list(range(offset, offset + per_chunk))
        assert megatron_layers == expected


@pytest.mark.parametrize("pp, vpp", LAYOUTS)
@pytest.mark.parametrize("name", ARCHS)
def test_stage_ownership_follows_stage_layers(name, pp, vpp):
    arch = arch_of(**ARCHS[name])
    owner = {
        layer: stage
        for stage, layers in enumerate(stage_layers(arch.num_layers, pp, vpp))
        for layer in layers
    }
    plan = sync_plan(arch, pp, vpp)
    for item in plan:
        if item.layer is not None:
            assert item.stage == owner[item.layer], item.megatron_name
    by_name = {n: item.stage for item in plan for n in item.hf_names}
    assert by_name["model.embed_tokens.weight"] == 0
    assert by_name["model.norm.weight"] == pp - 1
    if not arch.tie_word_embeddings:
        assert by_name["lm_head.weight"] == pp - 1
    # Each stage's items are contiguous: a stage leader sends its share in one run.
    stages = [item.stage for item in plan]
    assert stages == sorted(stages)


def bucket_bytes(bucket, element_size: int) -> int:
    return sum(item.numel for item in bucket) * element_size


@pytest.mark.parametrize("element_size", [2, 4])
@pytest.mark.parametrize("cap", [1, 4096, 20_000, 10**9])
@pytest.mark.parametrize("pp, vpp", [(1, None), (2, None), (2, 2)])
def test_buckets_respect_the_cap_and_never_mix_stages(pp, vpp, cap, element_size):
    arch = arch_of("qwen2")
    plan = sync_plan(arch, pp, vpp)
    buckets = plan_buckets(plan, cap, element_size)
    assert [item for bucket in buckets for item in bucket] == plan  # order kept, nothing lost
    for bucket in buckets:
        assert bucket, "empty bucket"
        assert len({item.stage for item in bucket}) == 1
        if len(bucket) > 1:
            assert bucket_bytes(bucket, element_size) <= cap
    if cap >= 10**9:
        assert len(buckets) == pp  # one per stage when everything fits


def test_oversized_tensor_gets_its_own_bucket():
    arch = arch_of("llama")  # embedding: 300 x 64 fp32 = 76,800 bytes
    plan = sync_plan(arch, 1)
    cap = 30_000
    buckets = plan_buckets(plan, cap, 4)
    oversized = [item for item in plan if item.numel * 4 > cap]
    assert oversized, "the test needs a tensor above the cap"
    for item in oversized:
        assert [item] in buckets


def test_bucket_count_grows_as_the_cap_shrinks():
    plan = sync_plan(arch_of("qwen3"), 2)
    counts = [len(plan_buckets(plan, cap, 4)) for cap in (10**9, 100_000, 20_000, 1)]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    assert counts[-1] == len(plan)  # a 1-byte cap: one item per bucket


# --- which rows/columns of each HF tensor a TP rank holds -------------------------------------
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", ARCHS)
def test_tp_pieces_of_every_rank_rebuild_each_hf_tensor_exactly(name, tp):
    """Write every TP rank's pieces (from the shard Megatron holds: ``tp_shard`` of the full
    tensor) into empty HF tensors: the result is ``full_to_hf`` of the full tensor, every
    element written once (replicated norms: by each rank, identically)."""
    import torch

    from sept_megatron.convert.adapters import Kind, full_to_hf, hf_to_full, tp_shard
    from sept_megatron.weight_sync.plan import piece_source, piece_target, tp_pieces

    arch = arch_of(**ARCHS[name], layers=2, num_attention_heads=8, num_key_value_heads=4)
    padded = mdl.padded_vocab_size(arch.vocab_size, 128, tp)
    generator = torch.Generator().manual_seed(0)
    for item in sync_plan(arch, 1):
        hf = [torch.randn(shape, generator=generator) for shape in item.hf_shapes]
        full = hf_to_full(item.rule, hf, arch, padded)
        expected = full_to_hf(item.rule, full, arch)
        assembled = [torch.full(shape, float("nan")) for shape in item.hf_shapes]
        writes = [torch.zeros(shape) for shape in item.hf_shapes]
        for tp_rank in range(tp):
            shard = tp_shard(item.rule.kind, full, tp_rank, tp)
            for piece in tp_pieces(item, tp, tp_rank, padded):
                source = piece_source(item, piece, shard, arch)
                piece_target(assembled[piece.hf_index], piece, source.shape).copy_(source)
                piece_target(writes[piece.hf_index], piece, source.shape).add_(1)
                if piece.dim == 0 and not piece.replicated:
                    # sent as is: a contiguous row block of the HF tensor
                    assert assembled[piece.hf_index][piece.start : piece.start + piece.length].is_contiguous()
        for index, (got, want) in enumerate(zip(assembled, expected)):
            assert torch.equal(got, want), (item.megatron_name, index)
            copies = tp if item.rule.kind is Kind.REPLICATED else 1
            assert torch.equal(writes[index], torch.full_like(writes[index], copies)), item.megatron_name


def test_vocab_padding_rows_are_never_sent():
    from sept_megatron.weight_sync.plan import tp_pieces

    arch = arch_of("llama", layers=2)  # vocab 300, padded to 512 at TP=4 (128 rows per rank)
    embedding = sync_plan(arch, 1)[0]
    pieces = [tp_pieces(embedding, 4, rank, 512) for rank in range(4)]
    assert [[(p.start, p.length) for p in rank] for rank in pieces] == [
        [(0, 128)],
        [(128, 128)],
        [(256, 44)],
        [],
    ]
