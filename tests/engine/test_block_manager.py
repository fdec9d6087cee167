"""Unit tests for rollserve.engine.block_manager (plain Python, no torch)."""

from collections import Counter
from types import SimpleNamespace

import pytest

from rollserve.engine.block_manager import BlockManager
from rollserve.engine.sequence import Sequence

PARAMS = SimpleNamespace(n=1)  # the block manager never looks at params
BS = 4


def make_seq(tokens, request_id="r", num_samples=1):
    return Sequence(request_id, list(tokens), PARAMS, num_samples=num_samples)


def compute(bm, seq, n=None):
    """What the engine does for one scheduled chunk: allocate, run the model, commit."""
    if n is None:
        n = seq.num_tokens - seq.num_computed_tokens
    assert bm.can_append(seq, n)
    copies = bm.append_slots(seq, n)
    seq.num_computed_tokens += n
    bm.commit(seq)
    return copies


def fork(bm, parent, index=1):
    child = parent.fork(index)
    bm.fork(child)
    return child


def check_invariants(bm, seqs):
    """Ref counts equal the references held by `seqs`; the free list holds exactly the unreferenced blocks."""
    refs = Counter(b for s in seqs for b in s.block_table)
    for block in bm.blocks:
        assert block.ref_count == refs.get(block.block_id, 0), block.block_id
        assert (block.ref_count == 0) == (block.block_id in bm.free), block.block_id
    assert bm.num_free_blocks == sum(1 for b in bm.blocks if b.ref_count == 0)
    for h, block in bm.cached.items():
        assert block.hash == h
        assert block.token_ids is not None and len(block.token_ids) == bm.block_size


def ids(start, n=BS):
    return list(range(start, start + n))


# -- construction / sizing ------------------------------------------------------


@pytest.mark.parametrize("num_blocks,block_size", [(0, 4), (4, 0), (-1, 4), (4, -2)])
def test_rejects_invalid_sizes(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


def test_initial_state():
    bm = BlockManager(6, BS)
    assert bm.num_blocks == 6
    assert bm.num_free_blocks == 6
    assert bm.block_size == BS
    assert bm.cached == {}
    assert all(b.ref_count == 0 and b.hash is None for b in bm.blocks)


@pytest.mark.parametrize("num_tokens,expected", [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (100, 25)])
def test_blocks_for(num_tokens, expected):
    assert BlockManager(1, BS).blocks_for(num_tokens) == expected


def test_blocks_for_block_size_one():
    bm = BlockManager(1, 1)
    assert [bm.blocks_for(n) for n in range(5)] == [0, 1, 2, 3, 4]


# -- allocation, free, ref counts ------------------------------------------------


def test_allocate_and_free_ref_counts():
    bm = BlockManager(8, BS)
    seq = make_seq(range(10))
    assert bm.blocks_needed(seq, 10) == 3
    assert bm.can_append(seq, 10)
    copies = bm.append_slots(seq, 10)
    assert copies == []
    assert len(seq.block_table) == 3
    assert len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    check_invariants(bm, [seq])

    seq.num_computed_tokens = 10
    assert bm.blocks_needed(seq, 2) == 0  # 12 tokens still fit in 3 blocks
    assert bm.blocks_needed(seq, 3) == 1

    bm.free_blocks(seq)
    assert seq.block_table == []
    assert seq.num_hashed_blocks == 0
    assert bm.num_free_blocks == 8
    check_invariants(bm, [])


def test_append_slots_is_incremental():
    bm = BlockManager(8, BS)
    seq = make_seq(range(3))
    compute(bm, seq)
    assert len(seq.block_table) == 1
    table_lens = []
    for tok in range(100, 110):  # decode one token at a time
        seq.token_ids.append(tok)
        compute(bm, seq, 1)
        table_lens.append(len(seq.block_table))
        assert len(seq.block_table) == bm.blocks_for(seq.num_computed_tokens)
    # a new block exactly when the 5th, 9th, 13th token is computed
    assert table_lens == [1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    assert len(set(seq.block_table)) == 4
    check_invariants(bm, [seq])


def test_append_zero_tokens_allocates_nothing():
    bm = BlockManager(2, BS)
    seq = make_seq(range(4))
    compute(bm, seq)
    assert bm.blocks_needed(seq, 0) == 0
    assert bm.append_slots(seq, 0) == []
    assert len(seq.block_table) == 1


def test_can_append_when_cache_is_full():
    bm = BlockManager(2, BS)
    a = make_seq(range(8))
    assert bm.can_append(a, 8)
    assert not bm.can_append(a, 9)
    compute(bm, a)
    assert bm.num_free_blocks == 0
    b = make_seq(range(1))
    assert not bm.can_append(b, 1)
    assert bm.can_append(b, 0)
    a.token_ids.append(99)
    assert bm.blocks_needed(a, 1) == 1
    assert not bm.can_append(a, 1)
    bm.free_blocks(a)
    assert bm.can_append(b, 1)


def test_distinct_sequences_get_distinct_blocks():
    bm = BlockManager(10, BS)
    seqs = [make_seq(range(i, i + 7), request_id=str(i)) for i in range(5)]
    for s in seqs:
        compute(bm, s)
    all_blocks = [b for s in seqs for b in s.block_table]
    assert len(all_blocks) == 10 and len(set(all_blocks)) == 10
    assert bm.num_free_blocks == 0
    check_invariants(bm, seqs)
    for s in seqs[::2]:
        bm.free_blocks(s)
    check_invariants(bm, seqs[1::2])
    assert bm.num_free_blocks == 6


def test_freed_unfindable_blocks_are_reused_first():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(range(6))
    b = make_seq(range(50, 56))
    compute(bm, a)
    compute(bm, b)
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    bm.free_blocks(a)
    # a's blocks go to the front of the free list, ahead of never-used 4..7
    assert list(bm.free)[:2] == [0, 1]
    c = make_seq(range(100, 112))
    compute(bm, c)
    assert c.block_table == [0, 1, 4]
    check_invariants(bm, [b, c])


# -- fork / copy-on-write ----------------------------------------------------------


def test_fork_shares_blocks_and_bumps_ref_counts():
    bm = BlockManager(8, BS)
    parent = make_seq(range(6), num_samples=3)
    compute(bm, parent)
    c1, c2 = fork(bm, parent, 1), fork(bm, parent, 2)
    assert c1.block_table == parent.block_table == c2.block_table
    assert c1.block_table is not parent.block_table
    assert all(bm.blocks[b].ref_count == 3 for b in parent.block_table)
    assert (c1.num_computed_tokens, c1.num_hashed_blocks) == (parent.num_computed_tokens, parent.num_hashed_blocks)
    assert (c1.index, c2.index) == (1, 2)
    assert c1.request_id == parent.request_id and c1.seq_id != parent.seq_id
    check_invariants(bm, [parent, c1, c2])

    bm.free_blocks(c1)
    assert all(bm.blocks[b].ref_count == 2 for b in parent.block_table)
    assert bm.num_free_blocks == 6
    bm.free_blocks(parent)
    assert bm.num_free_blocks == 6  # c2 still holds them
    bm.free_blocks(c2)
    assert bm.num_free_blocks == 8
    check_invariants(bm, [])


def test_copy_on_write_when_last_block_is_partial():
    bm = BlockManager(8, BS)
    parent = make_seq(range(6), num_samples=2)  # 2 blocks, the second holds 2 of 4 tokens
    compute(bm, parent)
    child = fork(bm, parent)
    shared_full, shared_partial = parent.block_table
    parent.token_ids.append(100)
    child.token_ids.append(200)

    # writing the 7th token into the shared partial block needs a private copy
    assert bm.blocks_needed(parent, 1) == 1
    free_before = bm.num_free_blocks
    copies = bm.append_slots(parent, 1)
    assert len(copies) == 1
    src, dst = copies[0]
    assert src == shared_partial and dst != shared_partial
    assert parent.block_table == [shared_full, dst]
    assert child.block_table == [shared_full, shared_partial]
    assert bm.blocks[shared_full].ref_count == 2
    assert bm.blocks[shared_partial].ref_count == 1
    assert bm.blocks[dst].ref_count == 1
    assert bm.num_free_blocks == free_before - 1
    parent.num_computed_tokens += 1

    # the child is now the only owner of the old block: it writes in place
    assert bm.blocks_needed(child, 1) == 0
    assert bm.append_slots(child, 1) == []
    assert child.block_table == [shared_full, shared_partial]
    child.num_computed_tokens += 1
    check_invariants(bm, [parent, child])


def test_copy_on_write_when_child_goes_first():
    bm = BlockManager(8, BS)
    parent = make_seq(range(5), num_samples=2)
    compute(bm, parent)
    child = fork(bm, parent)
    old = parent.block_table[1]
    child.token_ids.append(1)
    copies = bm.append_slots(child, 1)
    assert copies == [(old, child.block_table[1])]
    assert child.block_table[1] != old
    parent.token_ids.append(2)
    assert bm.append_slots(parent, 1) == []
    assert parent.block_table[1] == old
    check_invariants(bm, [parent, child])


def test_copy_on_write_with_several_children():
    bm = BlockManager(8, BS)
    parent = make_seq(range(3), num_samples=3)
    compute(bm, parent)
    group = [parent] + [fork(bm, parent, i) for i in (1, 2)]
    old = parent.block_table[0]
    assert bm.blocks[old].ref_count == 3
    all_copies = []
    for s in group:
        s.token_ids.append(7)
        all_copies.append(bm.append_slots(s, 1))
        s.num_computed_tokens += 1
    # the first two get private copies of the partial block; the last owner keeps it
    assert [len(c) for c in all_copies] == [1, 1, 0]
    assert all(c[0][0] == old for c in all_copies[:2])
    tables = [s.block_table[0] for s in group]
    assert len(set(tables)) == 3 and tables[2] == old
    assert all(bm.blocks[b].ref_count == 1 for b in tables)
    check_invariants(bm, group)


def test_copy_on_write_combined_with_growth():
    bm = BlockManager(8, BS)
    parent = make_seq(range(6), num_samples=2)
    compute(bm, parent)
    child = fork(bm, parent)
    parent.token_ids.extend([1, 2, 3, 4])  # 4 new tokens: fill the partial block and spill into a new one
    assert bm.blocks_needed(parent, 4) == 2  # one copy + one new block
    copies = bm.append_slots(parent, 4)
    assert len(copies) == 1 and copies[0][0] == child.block_table[1]
    assert len(parent.block_table) == 3
    assert parent.block_table[0] == child.block_table[0]
    assert len({parent.block_table[1], parent.block_table[2], child.block_table[1]}) == 3
    check_invariants(bm, [parent, child])


def test_no_copy_when_last_block_is_full():
    bm = BlockManager(8, BS)
    parent = make_seq(range(8), num_samples=2)  # exactly two full blocks
    compute(bm, parent)
    child = fork(bm, parent)
    assert bm.blocks_needed(parent, 1) == 1  # one new block, no copy
    parent.token_ids.append(1)
    child.token_ids.append(2)
    assert bm.append_slots(parent, 1) == []
    assert bm.append_slots(child, 1) == []
    assert parent.block_table[:2] == child.block_table[:2]
    assert parent.block_table[2] != child.block_table[2]
    assert all(bm.blocks[b].ref_count == 2 for b in parent.block_table[:2])
    check_invariants(bm, [parent, child])


def test_copy_on_write_counts_towards_can_append():
    bm = BlockManager(2, BS)
    parent = make_seq(range(6), num_samples=2)
    compute(bm, parent)
    child = fork(bm, parent)
    parent.token_ids.append(1)
    assert bm.num_free_blocks == 0
    assert bm.blocks_needed(parent, 1) == 1
    assert not bm.can_append(parent, 1)
    bm.free_blocks(child)  # sole owner again: no copy needed
    assert bm.blocks_needed(parent, 1) == 0
    assert bm.can_append(parent, 1)
    assert bm.append_slots(parent, 1) == []


# -- prefix cache ----------------------------------------------------------------------


def test_commit_makes_full_blocks_findable():
    bm = BlockManager(8, BS)
    a = make_seq(range(10))
    compute(bm, a)
    assert a.num_hashed_blocks == 2  # the third block is partial
    assert len(bm.cached) == 2
    cached_ids = {blk.block_id for blk in bm.cached.values()}
    assert cached_ids == set(a.block_table[:2])
    assert bm.blocks[a.block_table[2]].hash is None
    assert bm.blocks[a.block_table[0]].token_ids == (0, 1, 2, 3)

    b = make_seq(range(10), request_id="b")
    free_before = bm.num_free_blocks
    assert bm.attach_cached_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert b.num_computed_tokens == 8
    assert b.num_hashed_blocks == 2
    assert all(bm.blocks[x].ref_count == 2 for x in a.block_table[:2])
    assert bm.num_free_blocks == free_before  # in-use blocks are shared, nothing allocated
    compute(bm, b)
    assert b.block_table[2] != a.block_table[2]
    check_invariants(bm, [a, b])


def test_commit_follows_chunked_progress():
    bm = BlockManager(8, BS)
    a = make_seq(range(13))
    compute(bm, a, 3)
    assert bm.cached == {} and a.num_hashed_blocks == 0
    compute(bm, a, 2)
    assert len(bm.cached) == 1 and a.num_hashed_blocks == 1
    compute(bm, a, 6)
    assert len(bm.cached) == 2 and a.num_hashed_blocks == 2
    compute(bm, a, 2)
    assert len(bm.cached) == 3 and a.num_hashed_blocks == 3
    bm.commit(a)  # idempotent
    assert len(bm.cached) == 3
    check_invariants(bm, [a])


def test_commit_covers_generated_tokens():
    bm = BlockManager(8, BS)
    a = make_seq(range(6))
    compute(bm, a)
    for tok in (90, 91):
        a.token_ids.append(tok)
        compute(bm, a, 1)
    assert a.num_hashed_blocks == 2
    b = make_seq(list(range(6)) + [90, 91, 5], request_id="b")
    assert bm.attach_cached_prefix(b) == 8
    assert b.block_table == a.block_table


def test_attach_never_reuses_the_block_with_the_last_token():
    bm = BlockManager(8, BS)
    a = make_seq(range(8))  # exactly two full blocks
    compute(bm, a)
    assert len(bm.cached) == 2

    same = make_seq(range(8), request_id="same")
    assert bm.attach_cached_prefix(same) == 4  # capped at num_tokens - 1
    assert same.block_table == a.block_table[:1]
    assert same.num_computed_tokens < same.num_tokens

    longer = make_seq(range(9), request_id="longer")
    assert bm.attach_cached_prefix(longer) == 8
    assert longer.block_table == a.block_table

    tiny = make_seq(range(4), request_id="tiny")  # one full block: nothing may be reused
    assert bm.attach_cached_prefix(tiny) == 0
    assert tiny.block_table == []
    check_invariants(bm, [a, same, longer, tiny])


def test_attach_stops_at_first_mismatch():
    bm = BlockManager(8, BS)
    a = make_seq(ids(0) + ids(10) + ids(20) + [1])
    compute(bm, a)
    b = make_seq(ids(0) + ids(99) + ids(20) + [1], request_id="b")  # differs in the middle block
    assert bm.attach_cached_prefix(b) == 4
    assert b.block_table == a.block_table[:1]
    check_invariants(bm, [a, b])


def test_chain_hash_same_block_after_different_prefix_does_not_hit():
    bm = BlockManager(8, BS)
    a = make_seq(ids(0) + ids(10) + [1])
    compute(bm, a)
    # the second block's tokens match a's second block, but its prefix differs
    b = make_seq(ids(50) + ids(10) + [1], request_id="b")
    assert bm.attach_cached_prefix(b) == 0
    assert b.block_table == [] and b.num_computed_tokens == 0
    # a block that appears first in `a` must not match at a later position either
    c = make_seq(ids(10) + ids(0) + [1], request_id="c")
    assert bm.attach_cached_prefix(c) == 0
    check_invariants(bm, [a, b, c])


def test_hash_collision_is_not_a_false_hit(monkeypatch):
    monkeypatch.setattr(BlockManager, "_chain_hash", lambda self, prev, tokens: 12345)
    bm = BlockManager(8, BS)
    a = make_seq(ids(0) + ids(10) + [1])
    compute(bm, a)
    # every full block hashes the same: the first one committed owns the cache slot
    assert len(bm.cached) == 1
    assert bm.cached[12345].block_id == a.block_table[0]

    b = make_seq(ids(50) + ids(10) + [1], request_id="b")  # same hash, different tokens
    assert bm.attach_cached_prefix(b) == 0
    assert b.block_table == []
    c = make_seq(ids(10) + [1], request_id="c")  # tokens of a's *uncached* second block
    assert bm.attach_cached_prefix(c) == 0
    d = make_seq(ids(0) + ids(77) + [1], request_id="d")  # a true hit still works
    assert bm.attach_cached_prefix(d) == 4
    assert d.block_table == a.block_table[:1]
    check_invariants(bm, [a, b, c, d])

    # a colliding block that is not the cached one is unfindable: once freed it is reused first
    a0, a1, a2 = a.block_table
    bm.free_blocks(d)
    bm.free_blocks(a)
    order = list(bm.free)
    assert order[:2] == [a1, a2]
    assert order[-1] == a0
    assert bm.cached[12345].block_id == a0


def test_duplicate_content_keeps_first_cached_block():
    bm = BlockManager(8, BS)
    a = make_seq(range(9))
    b = make_seq(range(9), request_id="b")
    compute(bm, a)
    b.num_computed_tokens = 0
    compute(bm, b)  # computed independently (e.g. admitted in the same step): same hashes
    assert len(bm.cached) == 2
    assert {blk.block_id for blk in bm.cached.values()} == set(a.block_table[:2])
    b_blocks = list(b.block_table)
    bm.free_blocks(b)
    # b's duplicates are not findable: they are reused before anything cached
    assert set(list(bm.free)[:3]) == set(b_blocks)
    c = make_seq(range(9), request_id="c")
    assert bm.attach_cached_prefix(c) == 8
    assert c.block_table == a.block_table[:2]
    check_invariants(bm, [a, c])


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(range(10))
    compute(bm, a)
    assert bm.cached == {}
    assert a.num_hashed_blocks == 0
    b = make_seq(range(10), request_id="b")
    assert bm.attach_cached_prefix(b) == 0
    assert b.block_table == [] and b.num_computed_tokens == 0


def test_attach_revives_a_freed_cached_block():
    bm = BlockManager(6, BS)
    a = make_seq(range(9))
    compute(bm, a)
    a_blocks = list(a.block_table)
    bm.free_blocks(a)
    assert bm.num_free_blocks == 6
    assert len(bm.cached) == 2  # still findable after free

    b = make_seq(range(9), request_id="b")
    assert bm.attach_cached_prefix(b) == 8
    assert b.block_table == a_blocks[:2]
    assert bm.num_free_blocks == 4
    assert all(x not in bm.free for x in b.block_table)
    assert all(bm.blocks[x].ref_count == 1 for x in b.block_table)
    check_invariants(bm, [b])


def test_lazy_eviction_reuses_cached_blocks_last():
    bm = BlockManager(4, BS)
    a = make_seq(range(9))  # blocks 0,1 full (cached), block 2 partial
    compute(bm, a)
    assert a.block_table == [0, 1, 2]
    bm.free_blocks(a)
    # the partial block is reused first, then never-cached ones, then cached ones (last block of the chain first)
    assert list(bm.free) == [2, 3, 1, 0]
    assert len(bm.cached) == 2

    probe = lambda: bm.attach_cached_prefix(make_seq(range(9), request_id="probe"))  # noqa: E731

    other = make_seq(range(100, 108), request_id="other")
    bm.append_slots(other, other.num_tokens)  # needs two blocks: takes 2 and 3, the cache survives
    assert other.block_table == [2, 3]
    assert len(bm.cached) == 2

    more = make_seq(range(200, 201), request_id="more")
    bm.append_slots(more, 1)  # evicts block 1 (the tail of a's chain)
    assert more.block_table == [1]
    assert len(bm.cached) == 1
    assert bm.blocks[1].hash is None and bm.blocks[1].token_ids is None
    assert all(blk.block_id != 1 for blk in bm.cached.values())

    p = make_seq(range(9), request_id="p")
    assert bm.attach_cached_prefix(p) == 4  # only block 0 left
    assert p.block_table == [0]
    bm.free_blocks(p)
    assert list(bm.free) == [0]

    last = make_seq(range(300, 301), request_id="last")
    bm.append_slots(last, 1)  # evicts block 0
    assert last.block_table == [0]
    assert bm.cached == {}
    assert probe() == 0


def test_least_recently_freed_cached_block_is_evicted_first():
    bm = BlockManager(4, BS)
    a = make_seq(ids(0) + [1])
    b = make_seq(ids(10) + [1], request_id="b")
    compute(bm, a)
    compute(bm, b)
    a0, b0 = a.block_table[0], b.block_table[0]
    bm.free_blocks(a)
    bm.free_blocks(b)
    # unfindable partial blocks first, then a's cached block (freed earlier), then b's
    order = list(bm.free)
    assert order.index(a0) < order.index(b0)
    assert order[-2:] == [a0, b0]
    filler = make_seq(range(100, 100 + 3 * BS), request_id="filler")
    compute(bm, filler)
    assert a0 in filler.block_table and b0 not in filler.block_table
    assert bm.attach_cached_prefix(make_seq(ids(0) + [1], request_id="x")) == 0
    y = make_seq(ids(10) + [1], request_id="y")
    assert bm.attach_cached_prefix(y) == 4


def test_reset_prefix_cache():
    bm = BlockManager(6, BS)
    a = make_seq(range(9))
    compute(bm, a)
    b = make_seq(range(9), request_id="b")
    assert len(bm.cached) == 2
    bm.reset_prefix_cache()
    assert bm.cached == {}
    assert bm.attach_cached_prefix(b) == 0
    # blocks in use are untouched
    assert all(bm.blocks[x].ref_count == 1 for x in a.block_table)
    check_invariants(bm, [a])
    # freed stale-hash blocks are no longer findable, so they go to the front of the free list
    a_blocks = list(a.block_table)
    bm.free_blocks(a)
    assert set(list(bm.free)[:3]) == set(a_blocks)
    # and new commits work again after a reset
    c = make_seq(range(9), request_id="c")
    compute(bm, c)
    assert len(bm.cached) == 2
    d = make_seq(range(9), request_id="d")
    assert bm.attach_cached_prefix(d) == 8
    check_invariants(bm, [c, d])


def test_preempted_sequence_recomputes_via_cache():
    """Free then re-attach: what the scheduler does when it preempts and readmits a sequence."""
    bm = BlockManager(8, BS)
    a = make_seq(range(6))
    compute(bm, a)
    for tok in (7, 8, 9):
        a.token_ids.append(tok)
        compute(bm, a, 1)
    a.token_ids.append(10)  # sampled, not yet computed
    table = list(a.block_table)
    bm.free_blocks(a)
    a.num_computed_tokens = 0
    assert bm.attach_cached_prefix(a) == 8
    assert a.block_table == table[:2]
    assert a.num_hashed_blocks == 2
    compute(bm, a)
    assert a.num_computed_tokens == a.num_tokens == 10
    check_invariants(bm, [a])


def test_blocks_after_a_duplicate_prefix_are_findable():
    """Two sequences compute the same prefix in the same step, then differ: what follows the duplicate is found
    after the cached original (a multi-turn episode re-submitted with its shared system prompt)."""
    bm = BlockManager(12, BS)
    a = make_seq(ids(0) + ids(10) + [1])
    b = make_seq(ids(0) + ids(20) + ids(30) + [2], request_id="b")
    compute(bm, a)
    compute(bm, b)  # b's block 0 duplicates a's
    assert bm.cached[bm.blocks[b.block_table[0]].hash] is bm.blocks[a.block_table[0]]
    c = make_seq(b.token_ids + [3], request_id="c")
    assert bm.attach_cached_prefix(c) == 3 * BS
    assert c.block_table == [a.block_table[0]] + b.block_table[1:3]
    check_invariants(bm, [a, b, c])


def test_hash_collision_with_equal_block_tokens_at_another_position_is_not_a_false_hit(monkeypatch):
    monkeypatch.setattr(BlockManager, "_chain_hash", lambda self, prev, tokens: 12345)
    bm = BlockManager(8, BS)
    a = make_seq(ids(0) + [9])
    compute(bm, a)
    # block 1 of `b` holds the same tokens as a's cached block 0 but follows a different prefix
    b = make_seq(ids(0) + ids(0) + [7], request_id="b")
    assert bm.attach_cached_prefix(b) == BS
    assert b.block_table == a.block_table[:1]
    check_invariants(bm, [a, b])


# -- reset while sequences run (weight updates) ------------------------------------


def test_reset_makes_blocks_in_use_unfindable_forever():
    """A running sequence's KV predates the reset: neither its old blocks nor the ones it fills later are cached."""
    bm = BlockManager(8, BS)
    s = make_seq(ids(0) + ids(10, 2))  # block 0 full, block 1 half computed before the reset
    compute(bm, s)
    bm.reset_prefix_cache()
    assert bm.cached == {} and all(b.hash is None for b in bm.blocks)
    s.token_ids.extend(ids(12, 2) + [1])  # completes block 1 (with stale KV), starts block 2
    compute(bm, s)
    assert bm.cached == {}
    bm.free_blocks(s)
    assert bm.cached == {}
    # A fresh request recomputes the prefix; the stale block ids it may recycle must not complete a chain.
    r = make_seq(ids(0) + ids(10) + [2], request_id="r")
    assert bm.attach_cached_prefix(r) == 0
    compute(bm, r)
    q = make_seq(ids(0) + ids(10) + [3], request_id="q")
    assert bm.attach_cached_prefix(q) == 2 * BS
    assert q.block_table == r.block_table[:2]
    assert all(not bm.blocks[b].stale for b in q.block_table)
    check_invariants(bm, [r, q])


def test_reset_with_a_recycled_block_id_is_not_a_false_hit():
    """Before the fix: the stale block 1 stayed cached, and once block 0's id was recycled for the
    same tokens (fresh KV) the chain check passed and a new request got the stale KV."""
    bm = BlockManager(6, BS)
    s = make_seq(ids(0) + ids(10, 2))
    compute(bm, s)
    s1 = s.block_table[1]
    bm.reset_prefix_cache()
    s.token_ids.extend(ids(12, 2) + [1])
    compute(bm, s)
    bm.free_blocks(s)
    r = make_seq(ids(0) + [5], request_id="r")  # recomputes block 0's tokens, likely in a recycled block
    compute(bm, r)
    q = make_seq(ids(0) + ids(10) + [3], request_id="q")
    hit = bm.attach_cached_prefix(q)
    assert hit == BS and q.block_table == r.block_table[:1]
    assert s1 not in q.block_table


def test_reset_during_chunked_prefill_does_not_cache_the_mixed_block():
    bm = BlockManager(8, BS)
    s = make_seq(ids(0) + ids(10) + [1])
    compute(bm, s, 2)  # half of block 0 before the reset
    bm.reset_prefix_cache()
    compute(bm, s, 2 + BS)  # rest of block 0 and all of block 1 after it
    assert bm.cached == {}
    # a sequence admitted after the reset caches as usual
    t = make_seq(ids(0) + ids(10) + [1], request_id="t")
    compute(bm, t)
    assert len(bm.cached) == 2 and all(blk.block_id in t.block_table for blk in bm.cached.values())
    check_invariants(bm, [s, t])


def test_copy_on_write_of_a_stale_block_stays_stale():
    bm = BlockManager(8, BS)
    parent = make_seq(ids(0, 2), num_samples=2)
    compute(bm, parent)
    child = fork(bm, parent)
    bm.reset_prefix_cache()
    parent.token_ids.extend([7, 8])
    copies = compute(bm, parent)  # copies the shared, stale partial block, then fills it
    assert len(copies) == 1 and bm.blocks[copies[0][1]].stale
    assert bm.cached == {}
    child.token_ids.extend([7, 8])
    compute(bm, child)
    assert bm.cached == {}
    check_invariants(bm, [parent, child])


def test_reset_moves_freed_cached_blocks_to_the_front():
    bm = BlockManager(6, BS)
    a = make_seq(range(9))
    compute(bm, a)
    full = a.block_table[:2]
    bm.free_blocks(a)
    assert list(bm.free)[-2:] == full[::-1]
    bm.reset_prefix_cache()
    assert set(list(bm.free)[:2]) == set(full)
    check_invariants(bm, [])
