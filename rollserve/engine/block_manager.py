"""Paged KV blocks: ref counts, copy-on-write and a chain-hashed prefix cache.

Plain Python, no torch: the model runner turns block tables into tensors.
A full block is findable by `hash((previous block's hash, its token ids))`;
its token ids and its predecessor's block id are kept and compared on
lookup, so a hit verifies the whole prefix, not just the hash. Freed blocks stay
findable until their slot is needed again (lazy, least-recently-freed first).
"""

from collections import OrderedDict


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids", "prev_block", "stale")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None
        self.prev_block: int | None = None
        self.stale = False  # holds KV written before the last reset_prefix_cache: never cache it


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must both be >= 1")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, Block] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------
    def _chain_hash(self, prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    def attach_cached_prefix(self, seq) -> int:
        """Attach the cached full blocks of `seq`'s tokens; returns the number of tokens they cover.

        At most `num_tokens - 1` tokens are reused so the last one is always computed (its logits are needed).
        """
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        bs, prev, prev_block = self.block_size, None, None
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            prev = self._chain_hash(prev, tokens)
            block = self.cached.get(prev)
            if block is None or block.token_ids != tokens or block.prev_block != prev_block:
                break
            prev_block = block.block_id
            if block.ref_count == 0:
                del self.free[block.block_id]
            block.ref_count += 1
            seq.block_table.append(block.block_id)
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * bs
        return seq.num_computed_tokens

    def commit(self, seq) -> None:
        """Make the blocks that `seq` has filled completely findable by later requests."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        for i in range(seq.num_hashed_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            prev = self.blocks[seq.block_table[i - 1]].hash if i else None
            if block.stale or (i and prev is None):
                break  # its KV, or its prefix's, predates the last reset
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            block.hash = self._chain_hash(prev, tokens)
            block.token_ids = tokens
            block.prev_block = self._findable(seq.block_table[i - 1]) if i else None
            self.cached.setdefault(block.hash, block)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    def _findable(self, block_id: int) -> int:
        """The block a lookup reaches for `block_id`'s prefix: itself, or the cached block of the same content
        (same hash, tokens and predecessor) when `block_id` duplicates it (two sequences that computed the
        same prefix in the same step). A block chains to that one, so what follows a duplicate is findable."""
        block = self.blocks[block_id]
        found = self.cached.get(block.hash)
        if found is not None and found.token_ids == block.token_ids and found.prev_block == block.prev_block:
            return found.block_id
        return block_id

    def reset_prefix_cache(self) -> None:
        """Nothing computed so far is findable again, including blocks that running sequences still hold."""
        self.cached.clear()
        for block in self.blocks:
            if block.ref_count == 0 and block.hash is not None:
                self.free.move_to_end(block.block_id, last=False)  # no longer findable: reuse it first
            block.hash, block.token_ids, block.prev_block = None, None, None
            block.stale = block.ref_count > 0

    # -- allocation ---------------------------------------------------------
    def _allocate(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) is block:
            del self.cached[block.hash]
        block.hash, block.token_ids, block.prev_block, block.ref_count = None, None, None, 1
        block.stale = False
        return block_id

    def _needs_copy_on_write(self, seq) -> bool:
        idx, offset = divmod(seq.num_computed_tokens, self.block_size)
        return offset != 0 and self.blocks[seq.block_table[idx]].ref_count > 1

    def blocks_needed(self, seq, num_new_tokens: int) -> int:
        new = max(0, self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))
        return new + self._needs_copy_on_write(seq)

    def can_append(self, seq, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free)

    def append_slots(self, seq, num_new_tokens: int) -> list[tuple[int, int]]:
        """Give `seq` room for `num_new_tokens` more computed tokens; returns (src, dst) block copies to do first."""
        copies = []
        if self._needs_copy_on_write(seq):
            idx = seq.num_computed_tokens // self.block_size
            old = seq.block_table[idx]
            new = self._allocate()
            self.blocks[new].stale = self.blocks[old].stale  # the copy carries the old block's KV
            self._release(old)
            seq.block_table[idx] = new
            copies.append((old, new))
        while len(seq.block_table) < self.blocks_for(seq.num_computed_tokens + num_new_tokens):
            seq.block_table.append(self._allocate())
        return copies

    def fork(self, child) -> None:
        """`child` was copied from a sequence and now shares its blocks."""
        for block_id in child.block_table:
            self.blocks[block_id].ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block_id] = None
            if block.hash is None or self.cached.get(block.hash) is not block:
                self.free.move_to_end(block_id, last=False)  # not findable: reuse it first

    def free_blocks(self, seq) -> None:
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_hashed_blocks = 0
