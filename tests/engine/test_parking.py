"""Parked sequences (plain Python, no torch): a finished sample of a multi-turn episode keeps its KV blocks
while its environment runs; the request that resumes it computes only the new tokens; parked KV is evicted
first when blocks run out and the resumed request then recomputes. The shadow KV cache of test_scheduler's
`Engine` checks that no slot is ever read with the wrong contents."""

import random

from rollserve.engine.scheduler import Scheduler
from rollserve.engine.sequence import Sequence

from test_scheduler import BS, PARAMS, Engine, check_invariants, make_scheduler, make_seq


def park_on_finish(sched):
    """Every sequence `Engine` finishes is parked under (request id, index)."""
    sched.finish = lambda seq, park=None: Scheduler.finish(sched, seq, (seq.request_id, seq.index))


def resume(sched, key, extra, request_id):
    seq = Sequence(request_id, sched.parked[key].token_ids + list(extra), PARAMS)
    seq.resumes = key
    sched.add(seq)
    return seq


def run_until_finished(eng, limit=500):
    while eng.sched.waiting or eng.sched.running:
        eng.step()
        assert eng.steps < limit, "no progress"


def test_a_resumed_sequence_computes_only_what_was_appended():
    sched = make_scheduler(num_blocks=16)
    park_on_finish(sched)
    eng = Engine(sched)
    eng.add(make_seq(range(10), request_id="t1"), max_completion=5)
    run_until_finished(eng)
    parked = sched.parked[("t1", 0)]
    assert parked.num_tokens == 15 and parked.num_computed_tokens == 14 and len(parked.block_table) == 4
    free = sched.block_manager.num_free_blocks
    eng.max_completion["t2"] = 3
    seq = resume(sched, ("t1", 0), [900, 901, 902], "t2")
    out, _ = eng.step()
    assert out.seqs == [seq] and out.num_new_tokens == [4]  # the parked sample's last token + the 3 appended
    assert ("t1", 0) not in sched.parked and parked.block_table == []
    assert sched.block_manager.num_free_blocks == free - 1  # 18 tokens: one more block
    run_until_finished(eng)
    check_invariants(sched)


def test_parked_kv_is_evicted_before_running_sequences_are_preempted():
    sched = make_scheduler(num_blocks=6, max_num_batched_tokens=64)
    park_on_finish(sched)
    eng = Engine(sched)
    eng.add(make_seq(range(8), request_id="a"), max_completion=4)  # 12 tokens: 3 blocks parked
    run_until_finished(eng)
    eng.add(make_seq(range(100, 108), request_id="b"), max_completion=12)  # needs 5 blocks in the end
    run_until_finished(eng)
    assert sched.stats.num_parked_evictions == 1 and sched.stats.num_preemptions == 0
    assert sched.parked[("a", 0)].block_table == []  # the entry (its tokens) stays, its KV is gone
    eng.max_completion["a2"] = 2
    seq = resume(sched, ("a", 0), [7, 7], "a2")
    out, _ = eng.step()
    recomputed = out.num_new_tokens[out.seqs.index(seq)]
    # No parked KV left: more than the 3 tokens a parked resume computes, less only what the prefix cache kept.
    assert recomputed > 3 and (seq.num_prompt_tokens - recomputed) % BS == 0
    run_until_finished(eng)
    check_invariants(sched)


def test_release_frees_the_parked_blocks():
    sched = make_scheduler(num_blocks=8)
    park_on_finish(sched)
    eng = Engine(sched)
    eng.add(make_seq(range(6), request_id="a"), max_completion=3)
    run_until_finished(eng)
    assert sched.block_manager.num_free_blocks < 8
    sched.release(("a", 0))
    sched.release(("a", 0))  # a no-op the second time
    assert sched.block_manager.num_free_blocks == 8 and not sched.parked
    check_invariants(sched)


def test_finishing_a_waiting_resumed_sequence_frees_the_kv_it_would_have_taken():
    sched = make_scheduler(num_blocks=8)
    park_on_finish(sched)
    eng = Engine(sched)
    eng.add(make_seq(range(6), request_id="a"), max_completion=3)
    run_until_finished(eng)
    seq = resume(sched, ("a", 0), [1], "a2")
    Scheduler.finish(sched, seq)  # an abort before admission
    assert not sched.parked and sched.block_manager.num_free_blocks == 8


def test_abort_all_frees_parked_blocks():
    sched = make_scheduler(num_blocks=8)
    park_on_finish(sched)
    eng = Engine(sched)
    eng.add(make_seq(range(6), request_id="a"), max_completion=3)
    run_until_finished(eng)
    sched.abort_all()
    assert sched.block_manager.num_free_blocks == 8 and not sched.parked


def test_many_episodes_in_a_tiny_cache_all_finish_with_correct_kv():
    """Random multi-turn episodes (samples of n-requests included) in a cache too small for them: parked KV
    is evicted and recomputed, sequences are preempted, and every slot read holds the right prefix."""
    rng = random.Random(3)
    sched = make_scheduler(num_blocks=10, max_num_batched_tokens=12, max_num_seqs=4)
    park_on_finish(sched)
    eng = Engine(sched, rng=random.Random(4), vocab=3)
    turns = {}
    for i in range(6):
        rid = f"e{i}.0"
        n = rng.choice([1, 2])
        eng.add(make_seq([rng.randrange(3) for _ in range(rng.randrange(2, 7))], request_id=rid, num_samples=n),
                max_completion=rng.randrange(1, 4))
        for s in range(n):
            turns[(rid, s)] = 1
    finished = 0
    while sched.waiting or sched.running or finished < len(eng.finished):
        eng.step()
        for seq in eng.finished[finished:]:
            key = (seq.request_id, seq.index)
            episode, turn = key[0].split(".")[0] + f"-{key[1]}", turns.pop(key)
            if turn < 4 and seq.num_tokens < 24:
                rid = f"{episode}.{turn}"
                eng.max_completion[rid] = rng.randrange(1, 4)
                resume(sched, key, [rng.randrange(3) for _ in range(rng.randrange(1, 4))], rid)
                turns[(rid, 0)] = turn + 1
            else:
                sched.release(key)
        finished = len(eng.finished)
        assert eng.steps < 3000, "no progress"
    assert not turns and not sched.parked
    assert sched.stats.num_parked_evictions > 0
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks
