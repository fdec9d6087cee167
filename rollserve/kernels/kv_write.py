"""Paged KV write: the K/V of a step's tokens go into the cache at their slots."""

import torch


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Writes token `i`'s K/V at slot `slot_mapping[i]` (in place; other slots are left as they are).

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], the model's dtype (or a 16-bit one under
        float32 weights: `EngineConfig.kv_cache_dtype`).
    key, value: [num_tokens, num_kv_heads, head_dim], the model's dtype; rounded to the cache's.
    slot_mapping: [num_tokens] int64, `block * block_size + offset`; distinct within a call.
    """
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))
