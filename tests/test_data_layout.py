"""The epoch layout arithmetic: equal batches per rank, exact coverage, exactly-once eval shares."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mycodist.data.layout import (
    TrainLayout,
    batches_per_rank,
    derive_seed,
    eval_batch_sizes,
    pieces_for,
    shard_order,
    worker_batches,
    worker_block,
)
from mycodist.data.spec import ShardInfo
from mycodist.errors import UsageError


def shards(*counts: int) -> list[ShardInfo]:
    return [ShardInfo(f"s{i}.tar", c) for i, c in enumerate(counts)]


def positions(pieces) -> list[tuple[str, int]]:
    return [(p.shard.url, i) for p in pieces for i in range(p.begin, p.end)]


def test_pieces_cover_a_range_across_shard_boundaries():
    order = shards(5, 50, 200)
    got = pieces_for(order, 3, 60)
    assert [(p.shard.url, p.begin, p.end) for p in got] == [("s0.tar", 3, 5), ("s1.tar", 0, 50), ("s2.tar", 0, 5)]


def test_pieces_wrap_past_the_end():
    order = shards(3, 4)
    got = pieces_for(order, 5, 10)
    assert positions(got) == [("s1.tar", 2), ("s1.tar", 3), ("s0.tar", 0), ("s0.tar", 1), ("s0.tar", 2)]


def test_remainder_policies():
    assert batches_per_rank(255, 2, 4, "drop") == 31
    assert batches_per_rank(255, 2, 4, "wrap") == 32
    with pytest.raises(UsageError, match="epoch_remainder"):
        batches_per_rank(255, 2, 4, "pad")


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=6), world=st.integers(1, 5),
       workers=st.integers(1, 3), batch=st.integers(1, 6), epoch=st.integers(0, 3),
       remainder=st.sampled_from(["drop", "wrap"]))
def test_every_rank_and_worker_block_is_exact(counts, world, workers, batch, epoch, remainder):
    order = shard_order(shards(*counts), seed=7, epoch=epoch)
    total = sum(counts)
    if total == 0:
        return
    seen: list[tuple[str, int]] = []
    nbs = set()
    for rank in range(world):
        lay = TrainLayout.build(order, 7, epoch, rank, world, batch, remainder)
        nbs.add(lay.num_batches)
        for w in range(workers):
            got = positions(lay.worker_pieces(order, workers, w))
            assert len(got) == worker_batches(lay.num_batches, workers, w) * batch
            seen += got
    assert len(nbs) == 1  # equal batches on every rank
    nb = nbs.pop()
    if remainder == "drop":
        assert len(set(seen)) == len(seen) == nb * batch * world  # no sample twice
        assert total - len(seen) < world * batch  # at most the remainder unused
    else:
        assert len(set(seen)) == total  # every sample used
        assert len(seen) - total < world * batch  # a few used twice


def test_shard_order_depends_on_seed_and_epoch_only():
    s = shards(*range(1, 30))
    assert shard_order(s, 1, 0) == shard_order(s, 1, 0)
    assert shard_order(s, 1, 0) != shard_order(s, 1, 1)
    assert shard_order(s, 1, 0) != shard_order(s, 2, 0)
    assert derive_seed("a", 1) == derive_seed("a", 1) != derive_seed("a", 2)


def test_worker_blocks_follow_the_dataloader_round_robin():
    # 7 batches over 3 workers: worker 0 gets batches 0,3,6; worker 1 1,4; worker 2 2,5
    assert [worker_batches(7, 3, w) for w in range(3)] == [3, 2, 2]
    assert [worker_block(7, 3, w, 4) for w in range(3)] == [(0, 12), (12, 8), (20, 8)]


@pytest.mark.parametrize("total", [0, 1, 2, 5, 13, 64, 65, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_eval_shares_are_exact_and_batch_counts_equal(total, world):
    batch = 4
    covered, counts = [], set()
    for rank in range(world):
        offset, sizes = eval_batch_sizes(total, world, rank, batch)
        counts.add(len(sizes))
        assert all(0 <= s <= batch for s in sizes)
        if total >= world:
            assert all(s > 0 for s in sizes)
        covered += list(range(offset, offset + sum(sizes)))
    assert sorted(covered) == list(range(total))  # exactly once
    assert len(counts) == 1  # same number of eval batches on every rank
