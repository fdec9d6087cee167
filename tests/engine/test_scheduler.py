"""Unit tests for rollserve.engine.scheduler (plain Python, no torch).

`Engine` below stands in for LLMEngine.step: it applies a SchedulerOutput the
way the engine does (num_computed_tokens += n, commit, fork a group when its
prompt is done, append a sampled token to every sequence that reached its end,
finish after a fixed number of completion tokens). It also keeps a shadow KV
cache, one entry per slot holding the token prefix whose KV it stands for, so
the simulation checks that block copies, prefix-cache hits and preemption never
let a sequence read a slot with the wrong contents.
"""

import random
from collections import Counter
from types import SimpleNamespace

import pytest

from rollserve.engine.block_manager import BlockManager
from rollserve.engine.scheduler import WARN_EVERY, Scheduler, SchedulerOutput
from rollserve.engine.sequence import Sequence, SequenceStatus

PARAMS = SimpleNamespace(n=1)  # the scheduler never looks at params
BS = 4


def make_seq(tokens, request_id="r", num_samples=1):
    return Sequence(request_id, list(tokens), PARAMS, num_samples=num_samples)


def make_scheduler(num_blocks=64, block_size=BS, max_num_seqs=8, max_num_batched_tokens=64, prefix_caching=True):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(bm, max_num_seqs, max_num_batched_tokens)


def check_invariants(sched):
    bm = sched.block_manager
    refs = Counter(b for s in list(sched.running) + list(sched.parked.values()) for b in s.block_table)
    for block in bm.blocks:
        assert block.ref_count == refs.get(block.block_id, 0), block.block_id
        assert (block.ref_count == 0) == (block.block_id in bm.free), block.block_id
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(seq.block_table) >= bm.blocks_for(seq.num_computed_tokens)
        assert seq.num_computed_tokens < seq.num_tokens  # something left to compute
    ids = [id(s) for s in list(sched.running) + list(sched.waiting)]
    assert len(ids) == len(set(ids))


class Engine:
    """A torch-free stand-in for LLMEngine.step."""

    def __init__(self, sched, max_completion=None, rng=None, vocab=1000, check_kv=True):
        self.sched = sched
        self.bm = sched.block_manager
        self.max_completion = max_completion or {}
        self.rng = rng or random.Random(0)
        self.vocab = vocab
        self.check_kv = check_kv
        self.kv = {}  # (block_id, offset) -> tuple of token ids whose last token's KV is in the slot
        self.finished = []
        self.steps = 0

    def add(self, seq, max_completion):
        self.max_completion[seq.request_id] = max_completion
        self.sched.add(seq)

    def step(self, out=None):
        sched, bm, bs = self.sched, self.bm, self.bm.block_size
        out = sched.schedule() if out is None else out
        self.steps += 1
        assert sum(out.num_new_tokens) <= sched.max_num_batched_tokens
        assert all(n >= 1 for n in out.num_new_tokens)
        assert len({id(s) for s in out.seqs}) == len(out.seqs)
        assert all(s in sched.running for s in out.seqs)
        if self.check_kv:
            snapshot = dict(self.kv)
            for src, dst in out.block_copies:  # copies happen before the forward pass
                for off in range(bs):
                    if (src, off) in snapshot:
                        self.kv[(dst, off)] = snapshot[(src, off)]
                    else:
                        self.kv.pop((dst, off), None)
            for seq, n in zip(out.seqs, out.num_new_tokens):
                for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                    self.kv[(seq.block_table[p // bs], p % bs)] = tuple(seq.token_ids[:p + 1])
            for seq, n in zip(out.seqs, out.num_new_tokens):  # attention reads every slot up to the new ones
                for p in range(seq.num_computed_tokens + n):
                    assert self.kv.get((seq.block_table[p // bs], p % bs)) == tuple(seq.token_ids[:p + 1]), \
                        f"{seq} reads a wrong KV slot at position {p}"
        sampled = []
        for seq, n in zip(out.seqs, out.num_new_tokens):
            seq.num_computed_tokens += n
            assert seq.num_computed_tokens <= seq.num_tokens
            bm.commit(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                group = [seq]
                if seq.num_samples > 1:
                    children = [seq.fork(i) for i in range(1, seq.num_samples)]
                    seq.num_samples = 1
                    sched.fork(seq, children)
                    group += children
                sampled.extend(group)
        for seq in sampled:
            seq.token_ids.append(self.rng.randrange(self.vocab))
            if seq.num_completion_tokens >= self.max_completion.get(seq.request_id, 1 << 30):
                sched.finish(seq)
                self.finished.append(seq)
        check_invariants(sched)
        return out, sampled


# -- basics -------------------------------------------------------------------------------


def test_empty_schedule():
    sched = make_scheduler()
    assert not sched.has_unfinished()
    out = sched.schedule()
    assert isinstance(out, SchedulerOutput)
    assert out.is_empty and out.num_new_tokens == [] and out.block_copies == []


def test_single_request_prefill_then_decode():
    sched = make_scheduler()
    eng = Engine(sched)
    seq = make_seq(range(10))
    sched.add(seq)
    assert sched.has_unfinished() and list(sched.waiting) == [seq]

    out, sampled = eng.step()
    assert out.seqs == [seq] and out.num_new_tokens == [10]
    assert seq.status is SequenceStatus.RUNNING
    assert sched.running == [seq] and not sched.waiting
    assert len(seq.block_table) == 3
    assert sampled == [seq] and seq.num_tokens == 11

    for k in range(5):
        out, sampled = eng.step()
        assert out.seqs == [seq] and out.num_new_tokens == [1]
        assert out.block_copies == []
    assert seq.num_completion_tokens == 6
    assert len(seq.block_table) == 4

    sched.finish(seq)
    assert seq.is_finished
    assert sched.running == [] and not sched.has_unfinished()
    assert seq.block_table == []
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_chunked_prefill_of_long_prompt():
    sched = make_scheduler(max_num_batched_tokens=8)
    eng = Engine(sched)
    seq = make_seq(range(21))
    sched.add(seq)
    chunks = []
    while seq.num_completion_tokens == 0:
        out, sampled = eng.step()
        assert out.seqs == [seq]
        chunks.append(out.num_new_tokens[0])
        # blocks are allocated chunk by chunk, not for the whole prompt up front
        assert len(seq.block_table) == sched.block_manager.blocks_for(seq.num_computed_tokens)
        if seq.num_computed_tokens < seq.num_prompt_tokens:
            assert sampled == [] and seq.num_tokens == 21  # nothing sampled mid-prompt
    assert chunks == [8, 8, 5]
    assert seq.num_computed_tokens == 21 and seq.num_tokens == 22
    out, _ = eng.step()
    assert out.num_new_tokens == [1]


@pytest.mark.parametrize("budget", [1, 3, 5, 16])
def test_token_budget_is_respected(budget):
    sched = make_scheduler(max_num_batched_tokens=budget, max_num_seqs=16)
    eng = Engine(sched)
    for i in range(6):
        eng.add(make_seq(range(100 * i, 100 * i + 7 + i), request_id=str(i)), max_completion=3)
    used = []
    while sched.has_unfinished():
        out, _ = eng.step()
        assert sum(out.num_new_tokens) <= budget
        used.append(sum(out.num_new_tokens))
        assert eng.steps < 500
    assert len(eng.finished) == 6
    assert max(used) == budget  # the budget is actually used when there is work


def test_decodes_continue_while_a_new_request_is_admitted():
    sched = make_scheduler(max_num_batched_tokens=8)
    eng = Engine(sched)
    a = make_seq(range(5), request_id="a")
    sched.add(a)
    eng.step()
    assert a.num_completion_tokens == 1

    b = make_seq(range(100, 130), request_id="b")  # needs several chunks
    sched.add(b)
    b_chunks = []
    while b.num_completion_tokens == 0:
        out, _ = eng.step()
        # the running decode is served first, every step, and the new prompt gets the rest
        assert out.seqs[0] is a and out.num_new_tokens[0] == 1
        assert out.seqs[1:] == [b]
        b_chunks.append(out.num_new_tokens[1])
    assert b_chunks == [7, 7, 7, 7, 2]
    assert a.num_completion_tokens == 6
    out, _ = eng.step()
    assert out.seqs == [a, b] and out.num_new_tokens == [1, 1]


def test_running_prefill_continues_before_new_admissions():
    sched = make_scheduler(max_num_batched_tokens=6)
    a = make_seq(range(10), request_id="a")
    b = make_seq(range(100, 104), request_id="b")
    sched.add(a)
    sched.add(b)
    eng = Engine(sched)
    out, _ = eng.step()
    assert out.seqs == [a] and out.num_new_tokens == [6]
    assert list(sched.waiting) == [b]
    out, _ = eng.step()
    assert out.seqs == [a, b] and out.num_new_tokens == [4, 2]
    out, _ = eng.step()
    assert out.seqs == [a, b] and out.num_new_tokens == [1, 2]


def test_waiting_queue_is_fifo():
    sched = make_scheduler(num_blocks=4, max_num_seqs=8)
    big = make_seq(range(12), request_id="big")  # 3 blocks
    sched.add(big)
    eng = Engine(sched)
    eng.step()
    too_big = make_seq(range(100, 108), request_id="too_big")  # 2 blocks: does not fit now
    small = make_seq(range(200, 202), request_id="small")  # 1 block: would fit
    sched.add(too_big)
    sched.add(small)
    out, _ = eng.step()
    # the head of the queue does not fit, so nothing behind it jumps ahead
    assert out.seqs == [big]
    assert list(sched.waiting) == [too_big, small]
    assert too_big.block_table == [] and too_big.num_computed_tokens == 0


# -- max_num_seqs ------------------------------------------------------------------------


def test_max_num_seqs_limits_admission():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(range(10 * i, 10 * i + 3), request_id=str(i)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    eng = Engine(sched)
    out, _ = eng.step()
    assert out.seqs == seqs[:2]
    assert list(sched.waiting) == [seqs[2]]
    out, _ = eng.step()
    assert out.seqs == seqs[:2]
    sched.finish(seqs[0])
    out, _ = eng.step()
    assert out.seqs == [seqs[1], seqs[2]]
    assert out.num_new_tokens == [1, 3]


def test_max_num_seqs_counts_samples_of_an_unforked_group():
    sched = make_scheduler(max_num_seqs=4)
    group = make_seq(range(10), request_id="g", num_samples=3)
    pair = make_seq(range(100, 103), request_id="pair", num_samples=2)
    sched.add(group)
    sched.add(pair)
    out = sched.schedule()
    # group counts as 3 before it forks: 3 + 2 > 4 even though only one Sequence runs
    assert out.seqs == [group]
    assert list(sched.waiting) == [pair]


def test_max_num_seqs_across_chunked_prefill_and_fork():
    sched = make_scheduler(max_num_seqs=4, max_num_batched_tokens=4)
    group = make_seq(range(10), request_id="g", num_samples=3)  # 3 chunks of prefill before it forks
    pair = make_seq(range(100, 103), request_id="pair", num_samples=2)
    single = make_seq(range(200, 203), request_id="single")
    for s in (group, pair, single):
        sched.add(s)
    eng = Engine(sched)
    out, _ = eng.step()
    assert out.seqs == [group] and out.num_new_tokens == [4]
    out, _ = eng.step()
    assert out.seqs == [group] and out.num_new_tokens == [4]
    out, sampled = eng.step()  # group's last 2 tokens; 2 budget left but 3 + 2 > 4; single waits behind pair
    assert out.seqs == [group] and out.num_new_tokens == [2]
    assert list(sched.waiting) == [pair, single]
    assert len(sampled) == 3 and len(sched.running) == 3  # forked
    assert sum(s.num_samples for s in sched.running) == 3
    for _ in range(3):
        out, _ = eng.step()
        assert len(out.seqs) == 3 and list(sched.waiting) == [pair, single]
    sched.finish(sched.running[-1])
    out, _ = eng.step()  # 2 running + 2 samples = 4 fits now, with the 2 tokens of budget left
    assert out.seqs[-1] is pair and out.num_new_tokens[-1] == 2
    assert list(sched.waiting) == [single]
    assert sum(s.num_samples for s in sched.running) == 4
    out, _ = eng.step()
    assert single not in out.seqs


def test_max_num_seqs_fits_exactly():
    sched = make_scheduler(max_num_seqs=4)
    a = make_seq(range(3), request_id="a", num_samples=2)
    b = make_seq(range(10, 13), request_id="b", num_samples=2)
    c = make_seq(range(20, 23), request_id="c")
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    assert out.seqs == [a, b]
    assert list(sched.waiting) == [c]


# -- fork and copy-on-write through the scheduler -----------------------------------------------


def test_fork_places_children_after_parent_and_schedules_copies():
    sched = make_scheduler()
    other = make_seq(range(100, 103), request_id="other")
    parent = make_seq(range(6), request_id="p", num_samples=3)
    sched.add(parent)
    sched.add(other)
    eng = Engine(sched)
    out, sampled = eng.step()
    assert out.seqs == [parent, other]
    assert len(sampled) == 4
    children = sampled[1:3]
    assert sched.running == [parent, *children, other]
    assert [c.index for c in children] == [1, 2]
    assert all(c.request_id == "p" and c.num_samples == 1 for c in children)
    assert parent.num_samples == 1
    shared = parent.block_table[1]
    assert sched.block_manager.blocks[shared].ref_count == 3

    out, _ = eng.step()
    assert out.seqs == [parent, *children, other]
    # the shared partial block is copied for the first two; the last owner writes in place
    assert [src for src, _ in out.block_copies] == [shared, shared]
    assert children[1].block_table[1] == shared
    assert {parent.block_table[1], children[0].block_table[1]} == {dst for _, dst in out.block_copies}


# -- preemption ----------------------------------------------------------------------------------


def test_preempts_most_recently_admitted_when_blocks_run_out():
    sched = make_scheduler(num_blocks=4, max_num_batched_tokens=64)
    eng = Engine(sched)
    a = make_seq(range(8), request_id="a")  # 2 full blocks each
    b = make_seq(range(100, 108), request_id="b")
    sched.add(a)
    sched.add(b)
    out, _ = eng.step()
    assert out.seqs == [a, b]
    assert sched.block_manager.num_free_blocks == 0
    c = make_seq(range(200, 202), request_id="c")
    sched.add(c)
    b_tokens = list(b.token_ids)

    out, _ = eng.step()  # a needs a third block: b goes
    assert out.seqs == [a] and out.num_new_tokens == [1]
    assert sched.stats.num_preemptions == 1
    assert sched.running == [a]
    assert b.status is SequenceStatus.WAITING
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_hashed_blocks == 0
    assert b.token_ids == b_tokens  # the sampled token is kept, to be recomputed
    assert list(sched.waiting) == [b, c]  # back to the front, ahead of c
    assert len(a.block_table) == 3
    assert sched.block_manager.num_free_blocks == 1


def test_preemption_step_admits_nothing():
    sched = make_scheduler(num_blocks=5)
    eng = Engine(sched)
    a = make_seq(range(8), request_id="a")
    b = make_seq(range(100, 108), request_id="b")
    sched.add(a)
    sched.add(b)
    eng.step()
    a.token_ids.extend([1, 2, 3, 4])  # a now needs two more blocks: b must go
    tiny = make_seq([7], request_id="tiny")
    sched.add(tiny)
    out = sched.schedule()
    assert out.seqs == [a]
    assert list(sched.waiting) == [b, tiny]


def test_preempts_several_most_recent_first():
    sched = make_scheduler(num_blocks=6, prefix_caching=False)
    eng = Engine(sched)
    seqs = [make_seq(range(100 * i, 100 * i + 8), request_id=str(i)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    eng.step()
    assert sched.block_manager.num_free_blocks == 0
    seqs[0].token_ids.extend(range(8))  # needs 3 more blocks: both later sequences go, last first
    out = sched.schedule()
    assert out.seqs == [seqs[0]] and out.num_new_tokens == [9]
    assert sched.stats.num_preemptions == 2
    assert list(sched.waiting) == [seqs[1], seqs[2]]  # original order kept at the front
    assert sched.running == [seqs[0]]


@pytest.mark.parametrize("before, warns", [(0, True), (1, False), (WARN_EVERY - 1, False), (WARN_EVERY, True)])
def test_preemption_warns_on_the_first_and_every_so_many_naming_the_setting(before, warns, caplog):
    sched = make_scheduler(num_blocks=4, max_num_batched_tokens=64)
    eng = Engine(sched)
    sched.add(make_seq(range(8), request_id="a"))  # 2 full blocks each
    sched.add(make_seq(range(100, 108), request_id="b"))
    eng.step()
    sched.stats.num_preemptions = before
    with caplog.at_level("WARNING", logger="rollserve.scheduler"):
        eng.step()  # a needs a third block: b goes
    assert sched.stats.num_preemptions == before + 1
    warned = [r.getMessage() for r in caplog.records if r.name == "rollserve.scheduler"]
    assert len(warned) == int(warns)
    if warns:
        assert "kv_cache_memory" in warned[0] and "4 blocks" in warned[0] and f"{before + 1} preemptions" in warned[0]


def test_sequence_preempts_itself_when_it_is_last():
    sched = make_scheduler(num_blocks=5)
    eng = Engine(sched)
    a = make_seq(range(8), request_id="a")
    b = make_seq(range(100, 108), request_id="b")
    sched.add(a)
    sched.add(b)
    eng.step()
    assert sched.block_manager.num_free_blocks == 1
    out, _ = eng.step()  # a takes the last block; b has nobody after it to evict
    assert out.seqs == [a]
    assert sched.running == [a]
    assert list(sched.waiting) == [b]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert sched.stats.num_preemptions == 1
    assert sched.block_manager.num_free_blocks == 2


def test_preempted_sequence_is_readmitted_and_recomputed():
    sched = make_scheduler(num_blocks=4, prefix_caching=False)
    eng = Engine(sched)
    a = make_seq(range(8), request_id="a")
    b = make_seq(range(100, 108), request_id="b")
    eng.add(a, max_completion=2)
    eng.add(b, max_completion=3)
    eng.step()
    eng.step()  # b preempted; a samples its second token and finishes
    assert a.is_finished and sched.stats.num_preemptions == 1
    out, _ = eng.step()
    assert out.seqs == [b]
    assert out.num_new_tokens == [9]  # prompt + the token sampled before preemption
    assert b.status is SequenceStatus.RUNNING
    while sched.has_unfinished():
        eng.step()
    assert b.num_completion_tokens == 3


def test_preempted_sequence_reuses_its_cached_prefix():
    sched = make_scheduler(num_blocks=4, prefix_caching=True)
    eng = Engine(sched)
    a = make_seq(range(8), request_id="a")
    b = make_seq(range(100, 108), request_id="b")
    eng.add(a, max_completion=2)
    eng.add(b, max_completion=3)
    eng.step()  # both prompts computed: 4 full blocks, all cached
    b0 = b.block_table[0]
    eng.step()  # a needs a block: b is preempted, a takes b's last block (evicting it) and finishes
    assert a.is_finished and sched.stats.num_preemptions == 1
    out, _ = eng.step()
    # b's first block is still cached; its second was evicted, so 9 - 4 tokens are recomputed
    assert out.seqs == [b] and out.num_new_tokens == [5]
    assert b.block_table[0] == b0
    assert sched.stats.prefix_cache_hits == 4
    while sched.has_unfinished():
        eng.step()
    assert b.num_completion_tokens == 3


def test_preempted_group_keeps_its_samples():
    sched = make_scheduler(num_blocks=4, max_num_batched_tokens=4, max_num_seqs=8)
    eng = Engine(sched)
    a = make_seq(range(4), request_id="a")
    g = make_seq(range(100, 112), request_id="g", num_samples=3)
    eng.add(a, max_completion=6)
    eng.add(g, max_completion=1)
    out, _ = eng.step()
    assert out.seqs == [a] and out.num_new_tokens == [4]
    out, _ = eng.step()
    assert out.seqs == [a, g] and out.num_new_tokens == [1, 3]
    out, _ = eng.step()
    assert out.seqs == [a, g] and out.num_new_tokens == [1, 3]
    assert sched.block_manager.num_free_blocks == 0
    out, _ = eng.step()  # g's next chunk needs a third block: it is last, so it preempts itself mid-prompt
    assert out.seqs == [a]
    assert g.status is SequenceStatus.WAITING and list(sched.waiting) == [g]
    assert g.num_samples == 3 and g.block_table == [] and g.num_computed_tokens == 0
    assert sched.stats.num_preemptions == 1
    while sched.has_unfinished():
        eng.step()
        assert eng.steps < 100
    assert sorted(s.index for s in eng.finished if s.request_id == "g") == [0, 1, 2]


# -- prefix cache stats, finish, abort --------------------------------------------------------------


def test_prefix_cache_hit_on_admission():
    sched = make_scheduler()
    eng = Engine(sched)
    a = make_seq(range(12), request_id="a")
    sched.add(a)
    eng.step()
    b = make_seq(list(range(12)) + [50, 51], request_id="b")
    sched.add(b)
    out, _ = eng.step()
    assert out.seqs == [a, b]
    assert out.num_new_tokens == [1, 2]  # 12 prompt tokens found in the cache
    assert b.block_table[:3] == a.block_table[:3]
    assert sched.stats.prefix_cache_queries == 12 + 14
    assert sched.stats.prefix_cache_hits == 12


def test_prefix_cache_hit_keeps_last_token_to_compute():
    sched = make_scheduler()
    eng = Engine(sched)
    a = make_seq(range(8), request_id="a")
    sched.add(a)
    eng.step()
    sched.finish(a)
    b = make_seq(range(8), request_id="b")
    sched.add(b)
    out, sampled = eng.step()
    assert out.num_new_tokens == [4]
    assert sched.stats.prefix_cache_hits == 4
    assert sampled == [b]


def test_failed_admission_releases_cached_blocks():
    sched = make_scheduler(num_blocks=4)
    eng = Engine(sched)
    a = make_seq(range(8), request_id="a")
    sched.add(a)
    eng.step()  # a holds 2 full, cached blocks
    b = make_seq(list(range(8)) + list(range(200, 209)), request_id="b")  # 17 tokens: 5 blocks, 2 of them cached
    sched.add(b)
    out, _ = eng.step()  # a takes a third block; b would need 3 more but only 1 is free
    assert out.seqs == [a]
    assert list(sched.waiting) == [b]
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_hashed_blocks == 0
    assert all(sched.block_manager.blocks[x].ref_count == 1 for x in a.block_table)
    assert sched.stats.prefix_cache_hits == 0 and sched.stats.prefix_cache_queries == 8
    assert sched.stats.num_preemptions == 0


def test_finish_frees_blocks_and_keeps_shared_ones():
    sched = make_scheduler()
    eng = Engine(sched)
    p = make_seq(range(6), request_id="p", num_samples=2)
    sched.add(p)
    _, sampled = eng.step()
    child = sampled[1]
    shared = p.block_table[0]
    sched.finish(child)
    assert child.is_finished and child.block_table == []
    assert sched.running == [p]
    assert sched.block_manager.blocks[shared].ref_count == 1
    check_invariants(sched)


def test_abort_all_frees_everything():
    sched = make_scheduler(max_num_seqs=2)
    eng = Engine(sched)
    seqs = [make_seq(range(10 * i, 10 * i + 5), request_id=str(i)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    eng.step()
    aborted = sched.abort_all()
    assert sorted(s.seq_id for s in aborted) == sorted(s.seq_id for s in seqs)
    assert sched.running == [] and not sched.waiting and not sched.has_unfinished()
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert all(s.block_table == [] for s in seqs)


# -- long simulations ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("seed,num_blocks,budget,max_num_seqs", [
    (0, 6, 8, 4),
    (1, 5, 3, 8),
    (2, 8, 16, 3),
    (3, 12, 6, 6),
])
def test_tiny_cache_every_sequence_finishes(prefix_caching, seed, num_blocks, budget, max_num_seqs):
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=num_blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                           prefix_caching=prefix_caching)
    eng = Engine(sched, rng=random.Random(seed + 100), vocab=3)  # tiny vocab: siblings often share blocks
    capacity = num_blocks * BS
    prefixes = [[rng.randrange(3) for _ in range(8)] for _ in range(2)]
    requests = {}
    for i in range(12):
        n = rng.choice([1, 1, 2, 3])
        n = min(n, max_num_seqs)
        prompt = rng.choice(prefixes)[:rng.randrange(2, 9)] + [rng.randrange(3) for _ in range(rng.randrange(1, 6))]
        max_new = rng.randrange(1, 10)
        # every sequence must fit the cache on its own: the last sampled token is never computed
        max_new = min(max_new, capacity - len(prompt) + 1)
        seq = make_seq(prompt, request_id=str(i), num_samples=n)
        requests[str(i)] = (n, max_new)
        eng.add(seq, max_completion=max_new)
    while sched.has_unfinished():
        eng.step()
        assert sum(s.num_samples for s in sched.running) <= max_num_seqs
        assert eng.steps < 2000, "no progress"
    done = Counter(s.request_id for s in eng.finished)
    assert done == Counter({r: n for r, (n, _) in requests.items()})
    for s in eng.finished:
        assert s.num_completion_tokens == requests[s.request_id][1]
        assert s.block_table == []
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_tiny_cache_forces_preemptions_and_still_finishes():
    sched = make_scheduler(num_blocks=4, max_num_seqs=8, max_num_batched_tokens=32)
    eng = Engine(sched, rng=random.Random(7))
    for i in range(6):
        eng.add(make_seq(range(100 * i, 100 * i + 5), request_id=str(i)), max_completion=8)
    while sched.has_unfinished():
        eng.step()
        assert eng.steps < 1000
    assert len(eng.finished) == 6
    assert all(s.num_completion_tokens == 8 for s in eng.finished)
    assert sched.stats.num_preemptions > 0
