"""Paged decode attention in Triton: `decode_attention.paged_decode_attention` on the GPU.

One program per (sequence, KV head): the group of query heads sharing that KV head is one [group, D]
tile, so each K/V block is read once per group, not once per query head.
"""

import torch
import triton
import triton.language as tl

from .backend import triton_interpreting
from .triton_attention_tile import MIN_DOT, attend_block, dot_precision


@triton.jit
def _decode_kernel(query, k_cache, v_cache, block_tables, context_lens, out, scale, softcap, window,
                   max_blocks, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    ctx = tl.load(context_lens + seq).to(tl.int32)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    heads = kv_head * GROUP + offs_g
    q_ptrs = (seq.to(tl.int64) * NUM_KV_HEADS * GROUP + heads)[:, None] * HEAD_DIM + offs_d[None, :]
    q_mask = (offs_g[:, None] < GROUP) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(query + q_ptrs, mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = tl.zeros([GROUP_PAD], dtype=tl.int32) + (ctx - 1)
    acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    first = 0
    if USE_WINDOW:
        first = tl.maximum(ctx - window, 0) // BLOCK_SIZE
    last = (ctx + BLOCK_SIZE - 1) // BLOCK_SIZE
    for b in range(first, last):
        block_id = tl.load(block_tables + seq.to(tl.int64) * max_blocks + b)
        acc, m_i, l_i = attend_block(q, acc, m_i, l_i, k_cache, v_cache, block_id, kv_head, b * BLOCK_SIZE,
                                     q_pos, offs_d, scale, softcap, window, BLOCK_SIZE, NUM_KV_HEADS,
                                     HEAD_DIM, USE_SOFTCAP, USE_WINDOW, PRECISION, UPCAST)
    o = acc / l_i[:, None]
    tl.store(out + q_ptrs, o.to(out.dtype.element_ty), mask=q_mask)


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Same contract as `decode_attention.paged_decode_attention`."""
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_seqs == 0:
        return out
    _decode_kernel[(num_seqs, num_kv_heads)](
        query.contiguous(), k_cache, v_cache, block_tables.contiguous(), context_lens, out, scale,
        float(softcap or 1.0), int(sliding_window or 0), block_tables.shape[1],
        GROUP=group, GROUP_PAD=max(MIN_DOT, triton.next_power_of_2(group)), NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim, D_PAD=max(MIN_DOT, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
        USE_SOFTCAP=bool(softcap), USE_WINDOW=bool(sliding_window), PRECISION=dot_precision(query.dtype),
        UPCAST=triton_interpreting())
    return out
