"""Engine placement and prompt sharding (pure functions, no process group)."""

import pytest

from sept_megatron.rollout.placement import (
    EngineGroup,
    Placement,
    engine_groups,
    group_of,
    longest_first,
    shard_positions,
)


def test_engine_groups_are_consecutive_blocks_owned_by_their_first_rank():
    groups = engine_groups(8, 4)
    assert groups == [EngineGroup(0, (0, 1, 2, 3)), EngineGroup(1, (4, 5, 6, 7))]
    assert [g.owner for g in groups] == [0, 4]
    assert [g.owner for g in engine_groups(3, 1)] == [0, 1, 2]
    assert group_of(groups, 6).index == 1


def test_bad_engine_layouts_name_the_field():
    with pytest.raises(ValueError, match="rollout.engine_tp=3 does not divide the world size 8"):
        engine_groups(8, 3)
    with pytest.raises(ValueError, match="rollout.engine_tp=0"):
        engine_groups(8, 0)
    with pytest.raises(ValueError, match="rank 9 is in no engine group"):
        group_of(engine_groups(8, 2), 9)


def test_placement_of_a_rank():
    placement = Placement(tuple(engine_groups(4, 2)), rank=3)
    assert placement.mine.index == 1 and not placement.is_owner
    assert placement.num_engines == 2 and placement.world_size == 4
    assert Placement(tuple(engine_groups(4, 2)), rank=2).is_owner


def test_longest_first_is_stable():
    assert longest_first([3, 5, 3, 7, 5]) == [3, 1, 4, 0, 2]


@pytest.mark.parametrize("engines", [1, 2, 3, 8])
@pytest.mark.parametrize("unit", [1, 4, 7])
def test_shards_cover_every_prompt_once_and_are_balanced(engines, unit):
    lengths = [(7 * i) % 11 + 1 for i in range(29)]
    shards = shard_positions(lengths, copies=2, num_engines=engines, shard_sequences=unit)
    assert len(shards) == engines
    assert sorted(p for shard in shards for p in shard) == list(range(29))  # order recoverable
    per_block = max(1, unit // 2)
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= per_block
    for shard in shards:  # each engine gets its prompts longest first
        assert [lengths[p] for p in shard] == sorted((lengths[p] for p in shard), reverse=True)


def test_shards_are_whole_engine_batches_of_the_one_engine_order():
    """With a batch of 4 sequences and n = 2, blocks are 2 prompts: engine e gets blocks e,
    e + E, ... of the longest-first order, so each engine batch is one a single engine forms."""
    lengths = [1, 9, 3, 9, 5, 2, 8, 4]  # longest first: 1, 3, 6, 4, 7, 2, 5, 0
    shards = shard_positions(lengths, copies=2, num_engines=2, shard_sequences=4)
    assert shards == [[1, 3, 7, 2], [6, 4, 5, 0]]
    one = shard_positions(lengths, copies=2, num_engines=1, shard_sequences=4)[0]
    batches = [one[i : i + 2] for i in range(0, 8, 2)]
    assert [shards[0][:2], shards[0][2:], shards[1][:2], shards[1][2:]] == [
        batches[0],
        batches[2],
        batches[1],
        batches[3],
    ]


def test_fewer_blocks_than_engines_leaves_engines_idle():
    shards = shard_positions([5, 4, 3], copies=1, num_engines=4, shard_sequences=64)
    assert shards == [[0, 1, 2], [], [], []]


def test_bad_shard_arguments():
    with pytest.raises(ValueError, match="must all be >= 1"):
        shard_positions([1, 2], copies=0, num_engines=2)
