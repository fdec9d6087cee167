"""Paged prefill / chunked-prefill attention in Triton: `prefill_attention.paged_prefill_attention` on the GPU.

Varlen: the chunks are packed in one row. One program per (chunk, tile of BLOCK_M queries, query head)
walks the cache blocks its tile can see; the chunk's own K/V are read back from the cache (the engine
writes them there before attention), so a fresh prompt and a later chunk take the same path.
"""

import torch
import triton
import triton.language as tl

from .backend import triton_interpreting
from .triton_attention_tile import MIN_DOT, attend_block, dot_precision

BLOCK_M = 16


@triton.jit
def _prefill_kernel(query, k_cache, v_cache, block_tables, query_starts, query_lens, context_lens, out, scale,
                    softcap, window, max_blocks, GROUP: tl.constexpr, NUM_HEADS: tl.constexpr,
                    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, USE_SOFTCAP: tl.constexpr,
                    USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    chunk = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    n = tl.load(query_lens + chunk)
    if tile * BLOCK_M < n:
        start = tl.load(query_starts + chunk)
        ctx = tl.load(context_lens + chunk)
        kv_head = head // GROUP
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        q_pos = ctx - n + offs_m  # positions of the tile's queries in their sequence
        q_ptrs = ((start + offs_m).to(tl.int64) * NUM_HEADS + head)[:, None] * HEAD_DIM + offs_d[None, :]
        q_mask = (offs_m[:, None] < n) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(query + q_ptrs, mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        first = 0
        if USE_WINDOW:
            first = tl.maximum(ctx - n + tile * BLOCK_M - window + 1, 0) // BLOCK_SIZE
        last_pos = tl.minimum(ctx - n + (tile + 1) * BLOCK_M, ctx) - 1
        for b in range(first, last_pos // BLOCK_SIZE + 1):
            block_id = tl.load(block_tables + chunk.to(tl.int64) * max_blocks + b)
            acc, m_i, l_i = attend_block(q, acc, m_i, l_i, k_cache, v_cache, block_id, kv_head, b * BLOCK_SIZE,
                                         q_pos, offs_d, scale, softcap, window, BLOCK_SIZE, NUM_KV_HEADS,
                                         HEAD_DIM, USE_SOFTCAP, USE_WINDOW, PRECISION, UPCAST)
        # Rows past the chunk's end saw no key (l = 0); they are not stored.
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out + q_ptrs, o.to(out.dtype.element_ty), mask=q_mask)


def paged_prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, query_lens: list[int], context_lens: list[int],
                            block_tables: torch.Tensor, scale: float, sliding_window: int | None = None,
                            softcap: float | None = None) -> torch.Tensor:
    """Same contract as `prefill_attention.paged_prefill_attention`; `key` and `value` are not read: the
    chunks' K/V are taken from the cache, where they already are."""
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if not query_lens:
        return out
    starts = [0]
    for n in query_lens[:-1]:
        starts.append(starts[-1] + n)
    lens = torch.tensor([starts, query_lens, context_lens], dtype=torch.int32).to(query.device, non_blocking=True)
    grid = (len(query_lens), triton.cdiv(max(query_lens), BLOCK_M), num_heads)
    _prefill_kernel[grid](
        query.contiguous(), k_cache, v_cache, block_tables.contiguous(), lens[0], lens[1], lens[2], out, scale,
        float(softcap or 1.0), int(sliding_window or 0), block_tables.shape[1], GROUP=num_heads // num_kv_heads,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        D_PAD=max(MIN_DOT, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size, BLOCK_M=BLOCK_M,
        USE_SOFTCAP=bool(softcap), USE_WINDOW=bool(sliding_window), PRECISION=dot_precision(query.dtype),
        UPCAST=triton_interpreting())
    return out
