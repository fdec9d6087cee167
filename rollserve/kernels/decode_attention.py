"""Paged decode attention: one new query token per sequence over the sequence's cached blocks."""

import torch

from .dense_attention import dense_attention
from .kv_gather import gather_kv


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of each sequence's newest token over all its tokens (its own K/V already written).

    query: [num_seqs, num_heads, head_dim], the model's dtype.
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], query's dtype (or a 16-bit one, read
        as query's);
        num_heads is a multiple of num_kv_heads (query head h reads KV head h // (num_heads // num_kv_heads)).
    block_tables: [num_seqs, max_blocks] int64, padded with any valid block id.
    context_lens: [num_seqs] int64, tokens of each sequence including the query token (at position len - 1).
    sliding_window: keys at positions > len - 1 - sliding_window only; softcap: see `dense_attention`.
    Returns [num_seqs, num_heads, head_dim] in query's dtype.
    """
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    # Queries of one KV head's group act as a query sequence of length `group`.
    q = query.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    k = gather_kv(k_cache, block_tables).to(query.dtype)  # [num_seqs, num_kv_heads, max_blocks * block_size, D]
    v = gather_kv(v_cache, block_tables).to(query.dtype)
    pos = torch.arange(k.shape[2], device=query.device)
    ctx = context_lens[:, None]
    mask = pos < ctx
    if sliding_window:
        mask &= pos > ctx - 1 - sliding_window
    out = dense_attention(q, k, v, mask[:, None, None, :], scale, softcap)
    return out.reshape(num_seqs, num_heads, head_dim)
