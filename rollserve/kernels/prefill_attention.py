"""Paged prefill attention: varlen causal chunks packed in one row, over earlier context in the cache."""

import torch

from .dense_attention import causal_mask, dense_attention
from .kv_gather import gather_kv


def paged_prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, query_lens: list[int], context_lens: list[int],
                            block_tables: torch.Tensor, scale: float, sliding_window: int | None = None,
                            softcap: float | None = None) -> torch.Tensor:
    """Causal attention of each chunk over its sequence's earlier tokens and itself.

    query: [num_tokens, num_heads, head_dim]; key, value: [num_tokens, num_kv_heads, head_dim]: the chunks'
        tokens packed one after another (chunk i has `query_lens[i]` tokens), the model's dtype. Their K/V are
        already written into the cache.
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], query's dtype (or a 16-bit one, read as
        query's; key and value are then already rounded to it, as `attention.paged_attention` passes them).
    context_lens: [num_chunks], tokens of chunk i's sequence once the chunk is written; its earlier context
        is the first `context_lens[i] - query_lens[i]` (read from the cache).
    block_tables: [num_chunks, max_blocks] int64, padded; the row of a chunk without earlier context is not read.
    sliding_window: query at position p sees keys p - sliding_window < j <= p; softcap: see `dense_attention`.
    Returns [num_tokens, num_heads, head_dim] in query's dtype.
    """
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    group = num_heads // num_kv_heads
    block_size = k_cache.shape[1]
    out = query.new_empty(query.shape)
    start = 0
    for i, (n, context_len) in enumerate(zip(query_lens, context_lens)):
        end = start + n
        q = query[start:end].transpose(0, 1)[None]  # [1, num_heads, n, head_dim]
        fresh = context_len == n
        if fresh:
            k, v = key[start:end].transpose(0, 1)[None], value[start:end].transpose(0, 1)[None]
        else:
            table = block_tables[i, :-(-context_len // block_size)][None]
            k = gather_kv(k_cache, table)[:, :, :context_len].to(query.dtype)  # [1, Hkv, context_len, D]
            v = gather_kv(v_cache, table)[:, :, :context_len].to(query.dtype)
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if fresh and not sliding_window:
            o = dense_attention(q, k, v, None, scale, softcap, is_causal=True)
        else:
            o = dense_attention(q, k, v, causal_mask(n, context_len, sliding_window, q.device), scale, softcap)
        out[start:end] = o[0].transpose(0, 1)
        start = end
    return out
