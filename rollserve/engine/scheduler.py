"""Continuous batching under a token budget, chunked prefill, preemption by recompute.

Plain Python, no torch. Each step, running sequences are served first (a
decode token each, or the next chunk of their prefill); when blocks run out,
the most recently admitted sequence is preempted (its blocks freed, to be
recomputed later). Waiting sequences are admitted with what budget remains.

Parking: a finished sample of a multi-turn episode can keep its KV blocks (`finish(seq, park=key)`)
while its environment runs; a later request that `resumes` the key takes them over when it is
admitted, so it computes only its new tokens. Parked KV is idle, so it is the first to go when
blocks run out (oldest first, before any running sequence is preempted): the resumed request then
recomputes, finding what the prefix cache still holds. A parked entry keeps its sequence (token
ids) until it is resumed or released, with or without its blocks.
"""

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus

LOG = logging.getLogger("rollserve.scheduler")
WARN_EVERY = 50  # preemptions between two warnings (the first one warns)


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    def add(self, seq: Sequence, num_new_tokens: int, copies: list[tuple[int, int]]) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)
        self.block_copies.extend(copies)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which were found
    num_parked_evictions: int = 0  # parked sequences whose KV was freed for others


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.parked: OrderedDict[object, Sequence] = OrderedDict()  # key -> a finished sequence, oldest first
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        preempted = self._schedule_running(out, budget)
        budget -= sum(out.num_new_tokens)
        if not preempted:
            self._admit_waiting(out, budget)
        if out.is_empty and self.waiting:
            # Nothing runnable: running sequences are all idle (beams waiting for their siblings) and hold
            # the blocks the waiting ones need. Preempt idle ones, newest first, to the back of the queue.
            idle = [s for s in self.running if s.num_computed_tokens == s.num_tokens]
            while out.is_empty and idle:
                victim = idle.pop()
                self.running.remove(victim)
                self._preempt(victim, to_front=False)
                self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> bool:
        queue, kept, preempted = deque(self.running), [], False
        while queue:
            seq = queue.popleft()
            kept.append(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new == 0:  # out of budget, or idle (a beam waiting for its siblings' candidates)
                continue
            while not self._make_room(seq, num_new):
                preempted = True
                if queue:
                    self._preempt(queue.pop())
                else:
                    kept.pop()
                    self._preempt(seq)
                    seq = None
                    break
            if seq is None:
                break
            out.add(seq, num_new, self.block_manager.append_slots(seq, num_new))
            budget -= num_new
        self.running = kept
        return preempted

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        num_seqs = sum(s.num_samples for s in self.running)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if num_seqs and num_seqs + seq.num_samples > self.max_num_seqs:
                break
            cached = self._attach_computed(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._make_room(seq, num_new):
                self.block_manager.free_blocks(seq)
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            self.stats.prefix_cache_queries += seq.num_tokens
            self.stats.prefix_cache_hits += cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_seqs += seq.num_samples
            out.add(seq, num_new, self.block_manager.append_slots(seq, num_new))
            budget -= num_new

    def _attach_computed(self, seq: Sequence) -> int:
        """Gives an admitted sequence the KV it can reuse: the parked blocks of the sequence it resumes (when
        still parked with them), else cached prefix blocks. Returns the number of tokens covered."""
        parked = self.parked.pop(seq.resumes, None) if seq.resumes is not None else None
        seq.resumes = None
        if parked is not None and parked.block_table:
            seq.block_table, parked.block_table = parked.block_table, []
            seq.num_computed_tokens, seq.num_hashed_blocks = parked.num_computed_tokens, parked.num_hashed_blocks
            return seq.num_computed_tokens
        return 0 if seq.skip_prefix_cache else self.block_manager.attach_cached_prefix(seq)

    def _make_room(self, seq: Sequence, num_new: int) -> bool:
        """Whether `seq` can get blocks for `num_new` more tokens, after evicting parked KV if need be."""
        while not self.block_manager.can_append(seq, num_new):
            if not self.evict_parked():
                return False
        return True

    def evict_parked(self) -> bool:
        """Frees the blocks of the oldest parked sequence that has any; False when none has."""
        victim = next((s for s in self.parked.values() if s.block_table), None)
        if victim is None:
            return False
        self.block_manager.free_blocks(victim)
        self.stats.num_parked_evictions += 1
        return True

    def release(self, key) -> None:
        """Forgets a parked sequence and frees its blocks (a no-op for an unknown key)."""
        seq = self.parked.pop(key, None)
        if seq is not None:
            self.block_manager.free_blocks(seq)

    def _preempt(self, seq: Sequence, to_front: bool = True) -> None:
        self.block_manager.free_blocks(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        if to_front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)
        self.stats.num_preemptions += 1
        if self.stats.num_preemptions % WARN_EVERY == 1:
            bm = self.block_manager
            LOG.warning("a sequence was preempted (its KV freed, to be recomputed): the KV cache's %d blocks of %d "
                        "tokens are full with %d sequences running; raise kv_cache_memory or lower max_num_seqs "
                        "(%d preemptions so far)", bm.num_blocks, bm.block_size, len(self.running),
                        self.stats.num_preemptions)

    def fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """Put `children` (forked from `parent`, which stays) right after it, running or waiting like it."""
        if parent.status is SequenceStatus.WAITING:  # a preempted parent: the children recompute too
            i = self.waiting.index(parent)
            for j, child in enumerate(children):
                child.block_table, child.num_computed_tokens, child.num_hashed_blocks = [], 0, 0
                child.status = SequenceStatus.WAITING
                self.waiting.insert(i + 1 + j, child)
            return
        for child in children:
            self.block_manager.fork(child)
        i = self.running.index(parent)
        self.running[i + 1:i + 1] = children

    def finish(self, seq: Sequence, park=None) -> None:
        """Takes `seq` out of the running or the waiting queue and frees its blocks, or with `park` (a key,
        which replaces a parked sequence of the same key) keeps them for the request that resumes it."""
        was_waiting = seq.status is SequenceStatus.WAITING
        seq.status = SequenceStatus.FINISHED
        if seq.resumes is not None:  # aborted before it was admitted: the KV it would have taken goes too
            self.release(seq.resumes)
            seq.resumes = None
        if park is None:
            self.block_manager.free_blocks(seq)
        else:
            self.release(park)
            self.parked[park] = seq
        if was_waiting:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)

    def abort_all(self) -> list[Sequence]:
        seqs = list(self.running) + list(self.waiting)
        for seq in self.running:
            self.block_manager.free_blocks(seq)
        for key in list(self.parked):
            self.release(key)
        self.running, self.waiting = [], deque()
        return seqs
